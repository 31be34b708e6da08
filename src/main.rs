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
    // again and again (~10% of a no-op rerun). Grow and keep the heap in larger steps, and
    // ask for it in 2 MiB pages where the kernel has transparent huge pages on request
    // (Debian's default): a no-op rerun of 1000 steps then takes ~800 page faults instead
    // of ~2,000 (a third of its system time) at the same peak RSS.
    // SAFETY: mallopt only tunes glibc's allocator, and the block below is freed before
    // any thread exists; madvise only advises on pages of this process's own heap.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        let before = libc::sbrk(0) as usize;
        // black_box: a malloc whose block is never used may be optimized away.
        let block = std::hint::black_box(libc::malloc(8 << 20));
        let after = libc::sbrk(0) as usize;
        if after > before {
            let start = (before + 4095) & !4095;
            libc::madvise(
                start as *mut libc::c_void,
                after - start,
                libc::MADV_HUGEPAGE,
            );
        }
        libc::free(block);
    }
    cairn::cli::main()
}
