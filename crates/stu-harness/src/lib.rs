//! The runner library behind the `stu` command line.
//!
//! Each command is a plain function taking a typed options struct, so `tests/` can call it
//! without spawning processes; `main.rs` only parses arguments, installs logging and maps errors
//! to exit codes.
//!
//! **Invariant:** this is the only crate that links `zoo`; models are reached by registry name.

pub mod bench;
pub mod best;
pub mod checkops;
pub mod cli;
pub mod ensemble;
pub mod forward;
pub mod labelmap;
pub mod modelzip;
pub mod nnunet_cli;
pub mod npz;
pub mod plans;
pub mod postprocess;
pub mod predict;
pub mod quickstart;
pub mod run;
pub mod spec;
pub mod train;
pub mod validation;

use stu_engine::model::PresetSummary;

/// An error and its causes on one line, as `{:#}` writes them but without repeats: a cause
/// whose text the line already holds (an I/O error that a message quotes and also keeps as its
/// source) is left out, and a context that the next message starts with (the file name a
/// caller adds to an error that names it already) gives way to that message.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for link in e.chain().map(|c| c.to_string()) {
        if parts.iter().any(|p| p.contains(&link)) {
            continue;
        }
        if parts.last().is_some_and(|last| link.starts_with(last.as_str())) {
            parts.pop();
        }
        parts.push(link);
    }
    parts.join(": ")
}

/// Every registered model's presets with their counts, in registry order.
pub fn zoo_rows() -> Vec<PresetSummary> {
    zoo::link();
    stu_engine::model::registry()
        .iter()
        .flat_map(|e| (e.presets)())
        .collect()
}

/// The model table as text.
pub fn zoo_table(rows: &[PresetSummary]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!("{:<w$} {:<14} {:<28} {:>15} {:>20}\n", "name", "blocks", "widths", "params", "MACs @1×1×128³");
    for r in rows {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        s.push_str(&format!("{:<w$} {:<14} {:<28} {:>15} {:>20}\n", r.name, join(&r.blocks), join(&r.widths), group_digits(r.params), group_digits(r.macs_128)));
    }
    s.push_str(
        "(1 input channel, 105 classes, isotropic strides. MACs: every conv incl. bias for STU-Net and nnU-Net;\n \
         torch's FlopCounterMode ÷ 2 for UNETR, SwinUNETR and nnFormer (weights and attention products, no bias).\n \
         blocks per stage: residual blocks (STU-Net), convs (nnU-Net), transformer blocks (UNETR, SwinUNETR, nnFormer))\n",
    );
    s
}

/// `1234567` → `1,234,567`.
pub fn group_digits(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    #[test]
    fn error_lines_drop_repeated_causes_and_contexts() {
        // A message that quotes its source, under a context that names the same file.
        #[derive(Debug)]
        struct Quoting {
            path: String,
            source: std::io::Error,
        }
        impl std::fmt::Display for Quoting {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}: cannot read: {}", self.path, self.source)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(Quoting { path: "a.pth".into(), source: io() });
        assert_eq!(format!("{e:#}"), "a.pth: cannot read: No such file or directory (os error 2): No such file or directory (os error 2)");
        assert_eq!(super::error_line(&e), "a.pth: cannot read: No such file or directory (os error 2)");
        let named = Err::<(), _>(anyhow::anyhow!("p/x.nii: truncated")).context("p/x.nii").unwrap_err();
        assert_eq!(super::error_line(&named), "p/x.nii: truncated");
        // Distinct contexts and causes all stay.
        let chain = Err::<(), _>(io()).context("reading plans.json").context("case `a`").unwrap_err();
        assert_eq!(super::error_line(&chain), "case `a`: reading plans.json: No such file or directory (os error 2)");
    }
}
