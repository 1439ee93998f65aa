//! TotalSegmentator's 104 classes as STU-Net numbers them, and the five expert groups.

use serde::{Deserialize, Serialize};

pub use crate::stunet_classes::CLASSES;

/// TotalSegmentator v1 `class_map_5_parts`: the paper's five expert groups. The names are
/// historical ("cardiac" also holds brain, bowel and bladder; "muscles" long bones and hips).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertGroup {
    /// 17 classes, e.g. liver, aorta, kidneys, lungs.
    Organs,
    /// 24 classes: C1–L5.
    Vertebrae,
    /// 18 classes: heart parts, vessels, bowel, bladder, brain, …
    Cardiac,
    /// 21 classes: muscles, hips, femurs, scapulae, …
    Muscles,
    /// 24 classes: ribs 1–12, left and right.
    Ribs,
}

impl ExpertGroup {
    /// All five, in the paper's order.
    pub const ALL: [ExpertGroup; 5] = [Self::Organs, Self::Vertebrae, Self::Cardiac, Self::Muscles, Self::Ribs];

    /// Lower-case name, as in specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Organs => "organs",
            Self::Vertebrae => "vertebrae",
            Self::Cardiac => "cardiac",
            Self::Muscles => "muscles",
            Self::Ribs => "ribs",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|g| g.name() == s).ok_or_else(|| {
            format!("unknown expert group `{s}`; expected one of: {}", Self::ALL.map(Self::name).join(", "))
        })
    }

    /// STU-Net labels (1-based) of this group, ascending.
    pub fn labels(self) -> Vec<u16> {
        CLASSES.iter().enumerate().filter(|(_, c)| c.2 == self).map(|(i, _)| i as u16 + 1).collect()
    }
}

/// STU-Net label of a class name.
pub fn label_of(name: &str) -> Option<u16> {
    CLASSES.iter().position(|c| c.0 == name).map(|i| i as u16 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_partition_the_104_classes_as_stunet_md_says() {
        let counts: Vec<usize> = ExpertGroup::ALL.iter().map(|g| g.labels().len()).collect();
        assert_eq!(counts, [17, 24, 18, 21, 24]);
        assert_eq!(ExpertGroup::Organs.labels(), [1, 2, 3, 15, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 77, 78]);
        assert_eq!(ExpertGroup::Ribs.labels(), (49..=72).collect::<Vec<_>>());
        assert_eq!(ExpertGroup::Vertebrae.labels(), (81..=104).collect::<Vec<_>>());
        let mut names: Vec<&str> = CLASSES.iter().map(|c| c.0).collect();
        let sorted = { let mut s = names.clone(); s.sort(); s };
        assert_eq!(names, sorted, "STU-Net order is ASCII order");
        names.dedup();
        assert_eq!(names.len(), 104);
        let mut ts: Vec<u16> = CLASSES.iter().map(|c| c.1).collect();
        ts.sort();
        assert_eq!(ts, (1..=104).collect::<Vec<_>>(), "TSv1 ids are a permutation of 1..104");
        assert_eq!(label_of("rib_left_10"), Some(50));
        assert_eq!(label_of("vertebrae_T9"), Some(104));
    }
}
