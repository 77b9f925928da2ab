//! The lifetime of one listener and its connections: accepted under the listener's caps, drained
//! together (stop accepting, let them finish), cut together at a deadline — each cut connection
//! told why, so its report and access-log line say "drained" or "pod removed", not nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::limits::{Admission, ConnectionLimiter};
use crate::report::Reporter;
use crate::stats::Stats;

pin_project! {
    /// A task that is dropped at the hard stop unless it finished first. It is polled before the
    /// stop, so a task watching the stop itself (a connection reporting why it was cut) gets to
    /// finish. A plain struct rather than an `async` block with `select!`: those hold the task
    /// twice in their state (the captured value and the pinned one), and an idle connection's
    /// task is what every idle connection costs.
    pub struct UntilCut<F> {
        #[pin]
        task: F,
        #[pin]
        cut: WaitForCancellationFutureOwned,
    }
}

impl<F: Future<Output = ()>> Future for UntilCut<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() || this.cut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// `task`, cut when `hard` is cancelled.
pub fn until_cut<F: Future<Output = ()>>(task: F, hard: &CancellationToken) -> UntilCut<F> {
    UntilCut {
        task,
        cut: hard.clone().cancelled_owned(),
    }
}

/// Pause after a failed accept (out of file descriptors, usually) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct ListenerScope {
    /// Cancelled when the listener drains: it stops accepting, HBONE servers send GOAWAY.
    pub draining: CancellationToken,
    /// Cancelled at the drain deadline: every remaining connection is cut.
    pub hard: CancellationToken,
    pub tracker: TaskTracker,
    pub limiter: Arc<ConnectionLimiter>,
    /// Why connections are cut when `hard` fires (set just before it fires).
    cut_reason: Arc<Mutex<Option<String>>>,
}

impl ListenerScope {
    pub fn new(
        draining: CancellationToken,
        hard: CancellationToken,
        limiter: Arc<ConnectionLimiter>,
    ) -> Self {
        Self {
            draining,
            hard,
            tracker: TaskTracker::new(),
            limiter,
            cut_reason: Arc::new(Mutex::new(None)),
        }
    }

    /// Run `task` as part of this listener: a drain waits for it. At the hard stop the task is
    /// polled once more first (so a connection watching [`cut`](Self::cut) reports itself), then
    /// dropped if it has not finished.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(until_cut(task, &self.hard));
    }

    /// Resolves with the reason when this listener's connections are cut.
    pub async fn cut(&self) -> String {
        self.hard.cancelled().await;
        self.cut_now().expect("the hard stop fired")
    }

    /// The reason if this listener's connections are being cut now.
    pub fn cut_now(&self) -> Option<String> {
        self.hard.is_cancelled().then(|| {
            self.cut_reason
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| "cut: the listener was closed".into())
        })
    }

    /// Set why connections are cut, unless a reason is already set.
    pub fn set_cut_reason(&self, reason: &str) {
        self.cut_reason
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_string());
    }

    /// Accept connections until the listener drains, each handled as its own task holding its
    /// place under the listener's caps. Connections over a cap are closed at once, counted in
    /// `over_cap` and reported.
    pub async fn accept_loop<F, Fut>(
        &self,
        listener: TcpListener,
        stats: &Stats,
        reporter: &Reporter,
        what: &str,
        handle: F,
    ) where
        F: Fn(TcpStream, SocketAddr, Admission) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        loop {
            let next = tokio::select! {
                // A drain wins over a connection waiting in the queue: nothing is accepted after.
                biased;
                _ = self.draining.cancelled() => return,
                next = listener.accept() => next,
            };
            match next {
                Ok((tcp, peer)) => {
                    Stats::inc(&stats.connections_accepted);
                    match self.limiter.admit(peer) {
                        Ok(admission) => self.spawn(handle(tcp, peer, admission)),
                        Err(over) => {
                            // Counted before the close, which the peer may see at once.
                            Stats::inc(&stats.connections_over_cap);
                            drop(tcp);
                            log::warn!("{what} connection from {peer} {over}");
                            reporter.early(peer, &local, Instant::now(), over.to_string());
                        }
                    }
                }
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                    log::warn!("{what} accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    /// Stop accepting, let connections finish until `deadline`, then cut what is left, telling
    /// each `reason`. True when everything finished on its own.
    pub async fn drain(&self, deadline: Duration, reason: &str) -> bool {
        self.draining.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        if !finished {
            self.set_cut_reason(reason);
            self.hard.cancel();
            self.tracker.wait().await;
        }
        finished
    }
}
