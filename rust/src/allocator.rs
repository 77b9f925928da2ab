//! The core's memory allocator, and giving memory back when a worker goes idle.
//!
//! The copy loops allocate buffers of up to 256 KiB at a high rate; glibc serves those with
//! mmap/munmap and page faults on every one, mimalloc reuses them. But mimalloc returns freed
//! memory to the system only when the thread that owns it allocates or collects again: after a
//! burst of connections closes, idle tokio workers would keep their memory forever (measured:
//! 3,000 closed HBONE connections left ~80 KiB each in the proxy's RSS). So a worker that parks
//! — has nothing to do — collects its heap, at most once per `COLLECT_EVERY`.

use std::cell::Cell;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An idle worker collects at most this often: collecting is cheap but not free, and a lightly
/// loaded worker parks thousands of times a second.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

extern "C" {
    /// mimalloc: free this thread's delayed frees and return unused pages to the system.
    fn mi_collect(force: bool);
}

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called when a runtime worker parks.
pub fn release_idle_memory() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: a plain call into the allocator linked into this library.
        unsafe { mi_collect(false) };
    }
}
