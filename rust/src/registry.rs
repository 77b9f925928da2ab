//! Live connections, so a decision can be revisited: when policies change, Python lists the
//! connections still open (with the plan or verdict they were given) and closes those no longer
//! allowed. Registration is one map insert and remove per connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::report::Subject;

pub struct LiveConnection {
    pub subject: Subject,
    pub source: SocketAddr,
    pub destination: String,
    cancel: CancellationToken,
    reason: std::sync::Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
pub struct ConnectionRegistry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, LiveConnection>>,
}

impl ConnectionRegistry {
    /// Run `carry` as a registered live connection; if it is closed from outside, the copy is
    /// dropped (both sockets close) and the result says why.
    pub async fn run(
        &self,
        subject: Subject,
        source: SocketAddr,
        destination: String,
        carry: impl Future<Output = io::Result<()>>,
    ) -> io::Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let reason = std::sync::Arc::new(Mutex::new(None));
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
        let result = tokio::select! {
            result = carry => result,
            _ = cancel.cancelled() => {
                let why = reason.lock().unwrap().take().unwrap_or_default();
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, format!("closed: {why}")))
            }
        };
        self.live.lock().unwrap().remove(&id);
        result
    }

    /// Visit every live connection (id, subject, source, destination).
    pub fn for_each(&self, mut visit: impl FnMut(u64, &LiveConnection)) {
        for (id, conn) in self.live.lock().unwrap().iter() {
            visit(*id, conn);
        }
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
