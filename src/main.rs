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
    // A command is short-lived and allocates in bursts (a 1000-step plan, its records):
    // glibc's defaults grow the heap a page run at a time, serve every buffer over 128 kB
    // with a fresh mmap and hand freed memory straight back, so the same pages fault in
    // again and again (~10% of a no-op rerun). Grow and keep the heap in larger steps.
    // SAFETY: mallopt only tunes glibc's allocator; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    cairn::cli::main()
}
