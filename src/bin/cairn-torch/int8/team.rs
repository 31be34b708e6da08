//! Runs the row kernels on libtorch's own OpenMP threads. Between libtorch's products its
//! OpenMP workers spin for a while waiting for the next parallel region; a second pool
//! (rayon) started in that window competes with them for the same cores, and measured
//! 2-3x slower than one thread. GNU OpenMP's entry point `GOMP_parallel` (the ABI GCC
//! emits for `#pragma omp parallel`, also exported by LLVM's and Intel's runtimes) runs
//! a function on that same team, so the kernels take the cores the workers hold. It is
//! looked up in the process at run time: where libtorch brought no OpenMP runtime, the
//! parts run one after another on the calling thread.

use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

fn gomp_parallel() -> Option<ParallelFn> {
    static FOUND: OnceLock<Option<ParallelFn>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; a non-null result is the address of
        // `void GOMP_parallel(void (*)(void *), void *, unsigned, unsigned)`.
        let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        (!address.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut c_void, ParallelFn>(address) })
    })
}

struct Job<'a> {
    next: AtomicUsize,
    parts: usize,
    body: &'a (dyn Fn(usize) + Sync),
}

impl Job<'_> {
    fn run(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::Relaxed);
            if part >= self.parts {
                return;
            }
            (self.body)(part);
        }
    }
}

extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `for_each_part` keeps alive until `GOMP_parallel`
    // returns, which is after every thread of the team has left this function.
    let job = unsafe { &*(data as *const Job<'_>) };
    // A panic must not unwind into C; the kernels index checked slices and do not panic
    // on well-formed shapes, so abort rather than leave the team in an unknown state.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
        std::process::abort();
    }
}

/// Runs `body(part)` for every part in `0..parts`, spread over libtorch's threads (as many
/// as `tch::get_num_threads`), and returns when all are done.
pub fn for_each_part(parts: usize, body: &(dyn Fn(usize) + Sync)) {
    let threads = tch::get_num_threads().max(1) as usize;
    let job = Job {
        next: AtomicUsize::new(0),
        parts,
        body,
    };
    match gomp_parallel() {
        Some(parallel) if threads > 1 && parts > 1 => {
            let team = threads.min(parts) as c_uint;
            // SAFETY: `trampoline` only reads `job`, which outlives the call; the runtime
            // returns after the whole team has finished.
            unsafe { parallel(trampoline, &job as *const Job<'_> as *mut c_void, team, 0) };
        }
        _ => job.run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        let counts: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for_each_part(counts.len(), &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }
}
