//! Live connections, so a decision can be revisited: when policies change, Python lists the
//! connections still open (with the plan or verdict they were given) and closes those no longer
//! allowed. Registration is one map insert and remove per connection; the remove is a drop guard,
//! so a connection leaves the registry however it ends — finished, failed, closed from outside,
//! or dropped with its task (a listener cut at pod removal, a runtime shutting down).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::report::Subject;

pub struct LiveConnection {
    pub subject: Subject,
    pub source: SocketAddr,
    pub destination: String,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
pub struct ConnectionRegistry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, LiveConnection>>,
}

/// Removes a connection from the registry when dropped.
struct Registered<'a> {
    registry: &'a ConnectionRegistry,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.live.lock().unwrap().remove(&self.id);
    }
}

impl ConnectionRegistry {
    /// Run `carry` as a registered live connection. `Err(reason)` when it was closed from
    /// outside ([`close`](Self::close)): `cancel` is then cancelled and `carry` dropped, which
    /// aborts both sides (the writers watch `cancel`).
    pub async fn run<T>(
        &self,
        subject: Subject,
        source: SocketAddr,
        destination: String,
        cancel: CancellationToken,
        carry: impl Future<Output = T>,
    ) -> Result<T, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reason = Arc::new(Mutex::new(None));
        self.live.lock().unwrap().insert(
            id,
            LiveConnection {
                subject,
                source,
                destination,
                cancel: cancel.clone(),
                reason: reason.clone(),
            },
        );
        let _registered = Registered { registry: self, id };
        tokio::select! {
            result = carry => Ok(result),
            _ = cancel.cancelled() => Err(reason.lock().unwrap().take().unwrap_or_default()),
        }
    }

    /// Visit every live connection (id, subject, source, destination).
    pub fn for_each(&self, mut visit: impl FnMut(u64, &LiveConnection)) {
        for (id, conn) in self.live.lock().unwrap().iter() {
            visit(*id, conn);
        }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// Close one live connection; false if it had already ended.
    pub fn close(&self, id: u64, reason: String) -> bool {
        match self.live.lock().unwrap().get(&id) {
            Some(conn) => {
                *conn.reason.lock().unwrap() = Some(reason);
                conn.cancel.cancel();
                true
            }
            None => false,
        }
    }
}
