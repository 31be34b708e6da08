//! The `cairn` binary: parses arguments, runs the command, maps errors to exit codes
//! (0 success, 1 a step or check failed, 2 invalid input).

use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix filters, die quietly when the reader goes away (`cairn ... | head`)
    // instead of panicking in `println!` on a broken pipe.
    // SAFETY: setting a signal disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    cairn::cli::main()
}
