//! `stu`: the STU-Net research harness on the command line.

fn main() -> std::process::ExitCode {
    stu_harness::cli::main()
}
