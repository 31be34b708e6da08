//! Whether cached outputs exist, asked ahead of the walk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::store::{ObjectArea, ObjectDigest};

/// Whether the outputs of the prefetched cache entries exist, checked on a thread of
/// its own in walk order while the walk computes keys: a no-op rerun asks about every
/// output once, and the answers are mostly ready when it does. An answer not yet known
/// is looked up on the spot and shared, so the thread, when it starts late (a thread can
/// wait milliseconds for a CPU), skips what the walk already asked instead of asking again.
pub(super) struct Presence {
    known: Arc<HashMap<ObjectDigest, AtomicU8>>,
}

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;

/// Fewer outputs than this are checked inline (a thread costs more than it saves).
const PRESENCE_THREAD_MIN: usize = 64;

impl Presence {
    pub(super) fn none() -> Self {
        Self {
            known: Arc::new(HashMap::new()),
        }
    }

    /// Starts checking `digests` (in the order the walk will ask) in `objects`.
    pub(super) fn check_ahead(objects: &ObjectArea, digests: Vec<ObjectDigest>) -> Self {
        if digests.len() < PRESENCE_THREAD_MIN {
            return Self::none();
        }
        let known: Arc<HashMap<ObjectDigest, AtomicU8>> = Arc::new(
            digests
                .iter()
                .map(|d| (*d, AtomicU8::new(UNKNOWN)))
                .collect(),
        );
        let (objects, shared) = (objects.clone(), known.clone());
        let spawned = std::thread::Builder::new()
            .name("cairn-presence".into())
            .spawn(move || {
                for digest in digests {
                    let state = &shared[&digest];
                    if state.load(Ordering::Acquire) == UNKNOWN {
                        state.store(answer(objects.contains(&digest)), Ordering::Release);
                    }
                }
            });
        match spawned {
            Ok(_) => Self { known },
            Err(_) => Self::none(),
        }
    }

    pub(super) fn contains(&self, objects: &ObjectArea, digest: &ObjectDigest) -> bool {
        let state = self.known.get(digest);
        match state.map(|s| s.load(Ordering::Acquire)) {
            Some(PRESENT) => true,
            Some(ABSENT) => false,
            _ => {
                let present = objects.contains(digest);
                if let Some(state) = state {
                    state.store(answer(present), Ordering::Release);
                }
                present
            }
        }
    }
}

fn answer(present: bool) -> u8 {
    if present {
        PRESENT
    } else {
        ABSENT
    }
}
