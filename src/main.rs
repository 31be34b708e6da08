//! The `cairn` binary: parses arguments, runs the command, maps errors to exit codes
//! (0 success, 1 a step or check failed, 2 invalid input).

use std::process::ExitCode;

fn main() -> ExitCode {
    cairn::cli::main()
}
