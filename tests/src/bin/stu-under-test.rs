//! The `stu` command line, built inside this package so its tests get `CARGO_BIN_EXE_…`
//! (cargo only builds binaries of the package under test). Same code as `stu`.

fn main() -> std::process::ExitCode {
    stu_harness::cli::main()
}
