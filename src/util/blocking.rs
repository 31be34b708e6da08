//! Blocking work (hashing, copying, SQLite) called from async code without stalling the
//! runtime's other tasks.

/// Runs `work` where blocking is allowed: on a multi-threaded tokio runtime the current
/// worker first hands its queued tasks to another thread (`block_in_place`), so running
/// steps and timers keep going; outside a runtime, or on a current-thread runtime (where
/// nothing else could run meanwhile anyway), it runs inline.
pub fn blocking<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inline_without_a_runtime() {
        assert_eq!(blocking(|| 41 + 1), 42);
    }

    #[test]
    fn lets_other_tasks_run_on_a_multi_threaded_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let (tx, rx) = std::sync::mpsc::channel();
            let blocked = tokio::spawn(async move {
                blocking(|| {
                    started_tx.send(()).unwrap();
                    rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok()
                })
            });
            // The only worker is now inside `blocking`: the next task can run only if that
            // worker handed its queue off to another thread.
            started_rx.recv().unwrap();
            let other = tokio::spawn(async move { tx.send(()).unwrap() });
            assert!(blocked.await.unwrap());
            other.await.unwrap();
        });
    }
}
