//! The committed reports are what the report code makes of the committed records: `stu-report
//! --check` rebuilds every study's tables and figures into a scratch folder and compares them
//! file by file, so a change to the tables or figures that is not regenerated fails here. Local
//! runs (`runs/`) are left out: only the committed records count.

#[test]
fn committed_reports_are_up_to_date() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stu-report")).args(["--check", "--runs", "target/no-runs-here"]).current_dir(&root).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "stu-report --check failed (run `cargo xtask report`):\n{out}\n{err}");
    assert!(out.contains("reports are up to date"), "{out}");
}
