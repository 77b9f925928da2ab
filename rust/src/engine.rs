//! The tokio runtime a `Core` runs on, and how it stops.
//!
//! With several workers it is tokio's multi-thread scheduler. With exactly one (`--workers 1`:
//! a small pod, or the benchmark's match for HAProxy's one thread) it is the current-thread
//! scheduler, driven by a thread of its own: a lone multi-thread worker still pays for work
//! stealing it can never do (atomics on every wake, the searching and parking protocol), which
//! measured a few percent of the waypoint's CPU per request (benchmarks/README.md).
//!
//! Either way Python threads reach the runtime through its [`Handle`] (`spawn`, `block_on`,
//! `enter`); with the current-thread scheduler that works because the driver thread is always
//! inside `Runtime::block_on`, polling the I/O and timer drivers.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

/// Tokio's pool for blocking work; nothing of ours runs there (decisions have their own
/// threads), so it only needs to be bounded.
const MAX_BLOCKING_THREADS: usize = 16;

/// How the driver thread of a one-worker runtime is told to stop.
pub enum Stop {
    /// Give tasks this long, then return (`close`, which waits for it).
    Within(Duration),
    /// Stop at once without waiting on anything (`Drop`, possibly with the GIL held).
    Background,
}

pub enum Engine {
    Multi(Runtime),
    Single {
        handle: Handle,
        stop: oneshot::Sender<Stop>,
        driver: JoinHandle<()>,
    },
}

impl Engine {
    /// `workers`: None for one per CPU.
    pub fn start(workers: Option<usize>) -> io::Result<Engine> {
        if workers == Some(1) {
            return Self::single();
        }
        let mut builder = Builder::new_multi_thread();
        configure(&mut builder);
        if let Some(n) = workers {
            builder.worker_threads(n);
        }
        Ok(Engine::Multi(builder.build()?))
    }

    fn single() -> io::Result<Engine> {
        let mut builder = Builder::new_current_thread();
        configure(&mut builder);
        let runtime = builder.build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel();
        let driver = std::thread::Builder::new()
            .name("ambient-core".into())
            .spawn(move || {
                // Dropping the sender (the Core gone without `close`) stops it as `Background`.
                let how = runtime.block_on(stopped).unwrap_or(Stop::Background);
                match how {
                    Stop::Within(timeout) => runtime.shutdown_timeout(timeout),
                    Stop::Background => runtime.shutdown_background(),
                }
            })?;
        Ok(Engine::Single {
            handle,
            stop,
            driver,
        })
    }

    pub fn handle(&self) -> &Handle {
        match self {
            Engine::Multi(runtime) => runtime.handle(),
            Engine::Single { handle, .. } => handle,
        }
    }

    /// Stop, giving running tasks up to `timeout`; returns once the runtime is gone.
    pub fn shutdown_timeout(self, timeout: Duration) {
        match self {
            Engine::Multi(runtime) => runtime.shutdown_timeout(timeout),
            Engine::Single { stop, driver, .. } => {
                let _ = stop.send(Stop::Within(timeout));
                let _ = driver.join();
            }
        }
    }

    /// Stop without waiting for anything.
    pub fn shutdown_background(self) {
        match self {
            Engine::Multi(runtime) => runtime.shutdown_background(),
            Engine::Single { stop, .. } => {
                let _ = stop.send(Stop::Background);
            }
        }
    }
}

fn configure(builder: &mut Builder) {
    builder
        .enable_all()
        .thread_name("ambient-core")
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        // An idle worker gives back the memory its connections freed (see `allocator`).
        .on_thread_park(crate::allocator::release_idle_memory);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker: tasks spawned through the handle run, `block_on` from another thread works
    /// (timers and sockets too), and the driver thread ends on shutdown.
    #[test]
    fn single_worker_runs_spawned_tasks_and_stops() {
        let engine = Engine::start(Some(1)).unwrap();
        assert!(matches!(engine, Engine::Single { .. }));
        let handle = engine.handle().clone();
        let task = handle.spawn(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (accepted, connected) =
                tokio::join!(listener.accept(), tokio::net::TcpStream::connect(address));
            accepted.is_ok() && connected.is_ok()
        });
        assert!(handle.block_on(task).unwrap());
        engine.shutdown_timeout(Duration::from_secs(1));
    }

    #[test]
    fn several_workers_are_the_multi_thread_scheduler() {
        let engine = Engine::start(Some(2)).unwrap();
        assert!(matches!(engine, Engine::Multi(_)));
        assert_eq!(engine.handle().block_on(async { 1 + 1 }), 2);
        engine.shutdown_background();
    }
}
