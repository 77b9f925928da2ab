//! A load generator and connectivity check over HBONE, run entirely in the core so what it
//! measures is the data plane, not Python: `count` CONNECT streams, `concurrency` at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use pyo3::prelude::*;

use crate::copy::{H2Reader, Reader};
use crate::core::Shared;
use crate::hbone::client::{self, HboneError};
use crate::plan::HboneTarget;
use crate::pool::PoolKey;
use crate::stats::Stats;

pub struct Options {
    pub count: usize,
    pub concurrency: usize,
    pub payload: usize,
    pub fresh_connections: bool,
}

#[derive(Default)]
pub struct Report {
    pub ok: usize,
    pub failed: usize,
    pub seconds: f64,
    pub bytes_received: usize,
    pub first_error: Option<String>,
}

/// One stream: CONNECT, send the payload, half-close, read the answer to its end.
async fn one_stream(
    target: &HboneTarget,
    key: &PoolKey,
    payload: &Bytes,
    fresh: bool,
    shared: &Arc<Shared>,
) -> Result<usize, String> {
    let fresh_conn;
    let lease;
    let conn = if fresh {
        fresh_conn = client::dial(key, shared).await.map_err(|e| e.to_string())?;
        &fresh_conn
    } else {
        lease = shared
            .pool
            .lease(key, shared)
            .await
            .map_err(|e| e.to_string())?;
        &*lease.conn
    };
    let (mut send, recv) = match conn
        .connect(&target.authority, &target.headers, None, None)
        .await
    {
        Ok(streams) => {
            Stats::inc(&shared.stats.hbone_streams_opened);
            streams
        }
        Err(e) => {
            Stats::inc(&shared.stats.hbone_streams_failed);
            return Err(e.to_string());
        }
    };
    send.send_data(payload.clone(), true)
        .map_err(|e| HboneError::Http2(target.address, e).to_string())?;
    let mut reader = H2Reader(recv);
    let mut received = 0;
    while let Some(chunk) = reader.read_chunk().await.map_err(|e| e.to_string())? {
        received += chunk.len();
    }
    Ok(received)
}

pub async fn run(target: Arc<Py<HboneTarget>>, options: Options, shared: Arc<Shared>) -> Report {
    let t = target.get();
    let key = PoolKey {
        source_identity: t.source_identity.clone(),
        identities: t.identities.clone(),
        address: t.address,
        source_ip: t.source_ip,
        sockets: shared.sockets.clone(),
    };
    let payload = Bytes::from(vec![0u8; options.payload]);
    let next = Arc::new(AtomicUsize::new(0));
    let report = Arc::new(Mutex::new(Report::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.min(options.count.max(1)) {
        let (target, key, payload, next, report, shared) = (
            target.clone(),
            key.clone(),
            payload.clone(),
            next.clone(),
            report.clone(),
            shared.clone(),
        );
        let (count, fresh) = (options.count, options.fresh_connections);
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let result = one_stream(target.get(), &key, &payload, fresh, &shared).await;
                let mut r = report.lock().unwrap();
                match result {
                    Ok(n) => {
                        r.ok += 1;
                        r.bytes_received += n;
                    }
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut report = Arc::try_unwrap(report)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap();
    report.seconds = started.elapsed().as_secs_f64();
    report
}
