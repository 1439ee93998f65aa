//! A name-keyed registry of `inventory` plugins.
//!
//! `inventory` gives no ordering and no duplicate detection, so every registry is built once into
//! a `BTreeMap`, duplicate names are a hard error naming both modules, and every name must match
//! the id grammar `[a-z0-9][a-z0-9-]*`.

use std::collections::BTreeMap;

/// What a registry needs to know about its entries.
pub trait RegistryEntry: Sync + 'static {
    /// Kind of plugin, for messages ("model", "scaling rule", "dataset").
    const KIND: &'static str;
    /// Stable registry id.
    fn name(&self) -> &'static str;
    /// `module_path!()` of the registration, for diagnostics.
    fn module_path(&self) -> &'static str;
}

/// Errors from building or querying a registry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// Two plugins registered the same name.
    #[error("duplicate {kind} `{name}`: registered in `{first}` and in `{second}`")]
    Duplicate {
        /// Plugin kind.
        kind: &'static str,
        /// The clashing name.
        name: &'static str,
        /// Module of the first registration.
        first: &'static str,
        /// Module of the second registration.
        second: &'static str,
    },
    /// A name does not follow the id grammar.
    #[error("{kind} name `{name}` (in `{module}`) must match [a-z0-9][a-z0-9-]*")]
    BadName {
        /// Plugin kind.
        kind: &'static str,
        /// The bad name.
        name: &'static str,
        /// Module of the registration.
        module: &'static str,
    },
    /// A lookup found nothing.
    #[error("unknown {kind} `{name}`{}; available: {}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default(), available.join(", "))]
    Unknown {
        /// Plugin kind.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The closest registered name, if any is close.
        suggestion: Option<String>,
        /// Every registered name.
        available: Vec<String>,
    },
}

/// A validated, ordered set of plugins of one kind.
pub struct Registry<E: RegistryEntry> {
    entries: BTreeMap<&'static str, &'static E>,
}

/// True when `name` matches `[a-z0-9][a-z0-9-]*`.
pub fn is_valid_id(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl<E: RegistryEntry> Registry<E> {
    /// Builds a registry, rejecting duplicates and ungrammatical names.
    pub fn build(items: impl IntoIterator<Item = &'static E>) -> Result<Self, RegistryError> {
        let mut entries: BTreeMap<&'static str, &'static E> = BTreeMap::new();
        for item in items {
            let name = item.name();
            if !is_valid_id(name) {
                return Err(RegistryError::BadName {
                    kind: E::KIND,
                    name,
                    module: item.module_path(),
                });
            }
            if let Some(prev) = entries.insert(name, item) {
                let (mut first, mut second) = (prev.module_path(), item.module_path());
                if first > second {
                    std::mem::swap(&mut first, &mut second);
                }
                return Err(RegistryError::Duplicate {
                    kind: E::KIND,
                    name,
                    first,
                    second,
                });
            }
        }
        Ok(Self { entries })
    }

    /// Builds the registry of `inventory` registrations; an inconsistent set (a duplicate or
    /// ungrammatical name) is a programming error and panics with both modules named.
    pub fn from_registrations(items: impl IntoIterator<Item = &'static E>) -> Self {
        Self::build(items).unwrap_or_else(|e| panic!("{} registry is inconsistent: {e}", E::KIND))
    }

    /// Looks a plugin up by name; the error suggests the closest name.
    pub fn get(&self, name: &str) -> Result<&'static E, RegistryError> {
        self.entries.get(name).copied().ok_or_else(|| {
            let suggestion = self
                .entries
                .keys()
                .map(|k| (edit_distance(k, name), *k))
                .filter(|(d, k)| *d <= (k.len().max(name.len()) / 3).max(1))
                .min()
                .map(|(_, k)| k.to_string());
            RegistryError::Unknown {
                kind: E::KIND,
                name: name.to_string(),
                suggestion,
                available: self.names().map(str::to_string).collect(),
            }
        })
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.keys().copied()
    }

    /// Entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = &'static E> + '_ {
        self.entries.values().copied()
    }

    /// Number of plugins.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The value named `name` in a fixed table of named choices (a setting's values: losses,
/// optimisers, schedules), or an error naming the setting `what` and listing the names.
pub fn choice<T: Copy>(table: &[(&'static str, T)], what: &str, name: &str) -> Result<T, String> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| format!("unknown {what} `{name}`; expected one of {}", table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")))
}

/// The name of `value` in a table of named choices ([`choice`]).
pub fn choice_name<T: PartialEq>(table: &[(&'static str, T)], value: &T) -> &'static str {
    table.iter().find(|(_, v)| v == value).map(|(n, _)| *n).expect("every value is in its table")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(&'static str, &'static str);
    impl RegistryEntry for E {
        const KIND: &'static str = "thing";
        fn name(&self) -> &'static str {
            self.0
        }
        fn module_path(&self) -> &'static str {
            self.1
        }
    }

    static A: E = E("stunet", "zoo::stunet");
    static B: E = E("unet", "zoo::unet");
    static A2: E = E("stunet", "zoo::other");
    static BAD: E = E("StuNet", "zoo::bad");

    #[test]
    fn duplicates_and_bad_names_are_errors() {
        let err = Registry::build([&A, &B, &A2]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "duplicate thing `stunet`: registered in `zoo::other` and in `zoo::stunet`"
        );
        assert!(matches!(
            Registry::build([&BAD]).err().unwrap(),
            RegistryError::BadName { .. }
        ));
    }

    #[test]
    fn unknown_names_get_a_suggestion() {
        let reg = Registry::build([&A, &B]).unwrap();
        let msg = reg.get("stunett").err().unwrap().to_string();
        assert_eq!(
            msg,
            "unknown thing `stunett` (did you mean `stunet`?); available: stunet, unet"
        );
        assert_eq!(reg.get("unet").unwrap().1, "zoo::unet");
        let msg = reg.get("zzzzzz").err().unwrap().to_string();
        assert!(!msg.contains("did you mean"), "{msg}");
    }

    #[test]
    fn id_grammar() {
        assert!(is_valid_id("stunet-b"));
        assert!(is_valid_id("3d"));
        assert!(!is_valid_id("-x"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a_b"));
    }
}
