//! Bidirectional copy between the two sides of a proxied connection.
//!
//! Each side is a [`Reader`] (chunks in, `None` at end of stream) and a [`Writer`] (chunks out,
//! `finish` to half-close). The two directions run concurrently and end independently: a FIN one
//! way is forwarded as a FIN (or HTTP/2 END_STREAM) while the other way keeps flowing, as TCP
//! half-close requires. As in Istio's ztunnel, an error one way ends only that way (its writer is
//! still half-closed, so the far end learns of it) and the other way runs to its own end; the
//! connection's result is the first error. A peer that resets or hangs up (ECONNRESET, EPIPE,
//! ENOTCONN, an unexpected EOF, an HTTP/2 `RST_STREAM` with `NO_ERROR` or `CANCEL`) has simply
//! ended its direction: that is a normal end, not an error.
//!
//! Chunks are `Bytes`, so data read from a socket goes into an HTTP/2 DATA frame without another
//! copy, and HTTP/2 data goes to a socket straight from the frame's buffer.
//!
//! A connection the proxy itself cuts (a drain deadline, a removed pod, a policy that no longer
//! allows it) is aborted on both sides, not closed: a socket gets a TCP RST, an HBONE stream an
//! `RST_STREAM` with `CONNECT_ERROR` (RFC 9113 §8.5). A plain close would end each side with a
//! FIN or a CANCEL — which a peer reads as a normal end — and an application would take a
//! truncated answer for a whole one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::future::poll_fn;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::metrics::Counters;
use crate::stats::Stats;

/// Read buffers start small (most connections are short request/response exchanges) and grow
/// once a flow has shown it is bulk: the thresholds Istio's ztunnel settled on. The larger sizes
/// are whole TLS records less room for the HTTP/2 frame header and the record's overhead, so a
/// read becomes one DATA frame in one 16 KiB record (or sixteen of them), never one full record
/// and a sliver.
const INITIAL_BUFFER_SIZE: usize = 1024;
const TLS_RECORD: usize = 16 * 1024;
const RECORD_HEADROOM: usize = 64;
const LARGE_BUFFER_SIZE: usize = TLS_RECORD - RECORD_HEADROOM;
const JUMBO_BUFFER_SIZE: usize = 16 * TLS_RECORD - RECORD_HEADROOM;
const RESIZE_THRESHOLD_LARGE: u64 = 128 * 1024;
const RESIZE_THRESHOLD_JUMBO: u64 = 10 * 1024 * 1024;

pub trait Reader: Send {
    /// The next chunk, or `None` when the peer has finished sending.
    fn read_chunk(&mut self)
        -> impl std::future::Future<Output = io::Result<Option<Bytes>>> + Send;
}

pub trait Writer: Send {
    fn write_chunk(
        &mut self,
        chunk: Bytes,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Half-close: no more data will be written this way.
    fn finish(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Resolves if the far end can no longer take data (an HTTP/2 stream reset, its connection
    /// gone), so a direction waiting to read knows its writes are pointless. A socket cannot tell
    /// without writing: never resolves.
    fn closed(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }
    /// End this side abruptly instead of half-closing it: the other side reported an error, not
    /// an end (RFC 9113 §8.5: a stream error becomes a TCP RST, and back).
    fn abort(&mut self) {}
}

/// Reads from a byte stream with a buffer that grows as the flow proves to be bulk.
pub struct StreamReader<R> {
    inner: R,
    buf: BytesMut,
    size: usize,
    total: u64,
}

impl<R> StreamReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            size: INITIAL_BUFFER_SIZE,
            total: 0,
        }
    }

    fn grow(&mut self, n: usize) {
        let before = self.total;
        self.total += n as u64;
        if before < RESIZE_THRESHOLD_LARGE && self.total >= RESIZE_THRESHOLD_LARGE {
            self.size = LARGE_BUFFER_SIZE;
        }
        if before < RESIZE_THRESHOLD_JUMBO && self.total >= RESIZE_THRESHOLD_JUMBO {
            self.size = JUMBO_BUFFER_SIZE;
        }
    }
}

impl<R: AsyncRead + Unpin + Send> Reader for StreamReader<R> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        // `split` below leaves the rest of the allocation in `buf`, so small reads share one
        // allocation until it is used up; only then is a new one of the current size made.
        if self.buf.capacity() < self.size / 2 {
            self.buf.reserve(self.size);
        }
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Ok(None);
        }
        self.grow(n);
        Ok(Some(self.buf.split().freeze()))
    }
}

/// Whether the proxy has cut a connection: any of the tokens that cut it (its listener's hard
/// stop, its own close) has fired. Writers abort their side on drop when it has.
#[derive(Clone, Default)]
pub struct Cut(Vec<CancellationToken>);

impl Cut {
    pub fn by(tokens: impl IntoIterator<Item = CancellationToken>) -> Self {
        Self(tokens.into_iter().collect())
    }

    fn happened(&self) -> bool {
        self.0.iter().any(CancellationToken::is_cancelled)
    }
}

/// A stream that can be ended abruptly: a TCP socket is reset.
pub trait Abort {
    fn abort(self);
}

impl Abort for tokio::net::tcp::OwnedWriteHalf {
    fn abort(self) {
        // Closing with a zero linger time sends RST instead of FIN. `forget`: tokio would
        // otherwise shut the write side down (a FIN, which the peer reads as a clean end) when
        // the half is dropped; the socket now closes, with its RST, when the read half goes.
        let _ = socket2::SockRef::from(self.as_ref()).set_linger(Some(std::time::Duration::ZERO));
        self.forget();
    }
}

impl Abort for tokio::net::unix::OwnedWriteHalf {
    fn abort(self) {} // a Unix socket has no reset; its close is all there is
}

/// The writing half of a socket; `None` once aborted.
pub struct StreamWriter<W: Abort>(Option<W>, Cut);

impl<W: Abort> StreamWriter<W> {
    pub fn new(inner: W, cut: Cut) -> Self {
        Self(Some(inner), cut)
    }

    fn inner(&mut self) -> io::Result<&mut W> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "aborted"))
    }
}

impl<W: Abort> Drop for StreamWriter<W> {
    fn drop(&mut self) {
        if self.1.happened() {
            if let Some(inner) = self.0.take() {
                inner.abort();
            }
        }
    }
}

impl<W: AsyncWrite + Abort + Unpin + Send> Writer for StreamWriter<W> {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.inner()?.write_all(&chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.inner()?.shutdown().await
    }

    fn abort(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.abort();
        }
    }
}

fn h2_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err.into_io().unwrap();
    }
    match err.reason() {
        // Name the code (INTERNAL_ERROR...), as the access log should say it; the kind tells
        // the copy to abort the other side rather than half-close it.
        Some(reason) if err.is_remote() => io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("the peer reset the stream with {reason:?} ({err})"),
        ),
        _ => io::Error::other(err),
    }
}

/// Whether the peer has reset `stream`, without waiting: `Some(reason)` if it has.
fn reset_by_peer(stream: &mut SendStream<Bytes>) -> Option<h2::Reason> {
    let waker = futures_util::task::noop_waker_ref();
    match stream.poll_reset(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(Ok(reason)) => Some(reason),
        _ => None,
    }
}

/// A stream reset with one of these is the peer hanging up, as Istio's ztunnel reads it.
fn is_hang_up(reason: Option<h2::Reason>) -> bool {
    matches!(
        reason,
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL | h2::Reason::STREAM_CLOSED)
    )
}

/// The receiving half of an HBONE stream.
pub struct H2Reader(pub RecvStream);

impl Reader for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self.0.data().await {
            None => Ok(None),
            Some(Ok(chunk)) => {
                // Reopen the window as soon as the chunk is ours: we hold at most one chunk, so
                // h2's own buffering (one stream window) bounds memory.
                let _ = self.0.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            // The peer reset its sending side: with NO_ERROR or CANCEL it is done sending.
            Some(Err(e)) if is_hang_up(e.reason()) && !e.is_io() => Ok(None),
            // The whole HBONE connection died under an open stream: the stream did not end,
            // it was aborted, and the local side must learn so (a FIN would pass for an end).
            Some(Err(e)) if e.is_io() || e.is_go_away() => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the HBONE connection ended under the stream: {e}"),
            )),
            Some(Err(e)) => Err(h2_io(e)),
        }
    }
}

/// A reader whose first chunk was already read (by a protocol detector) and is given back first.
pub struct Prefixed<R> {
    pub first: Option<Bytes>,
    pub inner: R,
}

impl<R: Reader> Reader for Prefixed<R> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self.first.take() {
            Some(chunk) if !chunk.is_empty() => Ok(Some(chunk)),
            _ => self.inner.read_chunk().await,
        }
    }
}

/// The sending half of an HBONE stream; waits for HTTP/2 flow-control capacity.
pub struct H2Writer(pub SendStream<Bytes>, pub Cut);

impl Drop for H2Writer {
    fn drop(&mut self) {
        if self.1.happened() {
            // Dropped unfinished, h2 would send CANCEL, which the peer takes for a hang-up.
            self.0.send_reset(h2::Reason::CONNECT_ERROR);
        }
    }
}

impl Writer for H2Writer {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        // `closed()`, polled while this direction waited to read, left this task's waker in the
        // stream's send slot; `reserve_capacity` below wakes that slot when it assigns capacity,
        // so the task would wake itself, and tokio reschedules a self-woken task by waking the
        // other worker: a futex wake and a spurious poll per chunk (measured: 1.7 of the 3.1
        // futex calls per keep-alive request). Polling for a reset with a no-op waker takes the
        // slot back; a wait for capacity below registers the real waker again. A reset found
        // here is reported by `poll_capacity` as before.
        let _ = reset_by_peer(&mut self.0);
        while !chunk.is_empty() {
            self.0.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| self.0.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) if is_hang_up(e.reason()) => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                }
                Some(Err(e)) => return Err(h2_io(e)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    ))
                }
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            if let Err(e) = self.0.send_data(part, false) {
                return Err(match reset_by_peer(&mut self.0) {
                    Some(reason) if is_hang_up(Some(reason)) => {
                        io::Error::new(io::ErrorKind::BrokenPipe, "the peer hung up")
                    }
                    _ => h2_io(e),
                });
            }
        }
        Ok(())
    }

    async fn closed(&mut self) {
        let _ = poll_fn(|cx| self.0.poll_reset(cx)).await;
    }

    fn abort(&mut self) {
        self.0.send_reset(h2::Reason::CONNECT_ERROR);
    }

    async fn finish(&mut self) -> io::Result<()> {
        match self.0.send_data(Bytes::new(), true) {
            Ok(()) => Ok(()),
            Err(e) => match reset_by_peer(&mut self.0) {
                // Already reset by the peer: nothing left to half-close.
                Some(reason) if is_hang_up(Some(reason)) => Ok(()),
                Some(reason) => Err(io::Error::other(format!(
                    "the peer reset the stream with {reason:?}"
                ))),
                None => Err(h2_io(e)),
            },
        }
    }
}

/// Bytes carried each way by one proxied connection, readable while it runs and after it failed.
#[derive(Debug, Default)]
pub struct Transferred {
    /// From the initiator (the `a` side) towards the destination.
    pub sent: AtomicU64,
    /// From the destination back to the initiator.
    pub received: AtomicU64,
}

impl Transferred {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// The peer went away mid-stream: for a proxy that is the end of this direction, not a failure.
fn is_hang_up_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
    )
}

/// Copy one way until the reader ends, then half-close the writer — also after an error, so the
/// far end learns this direction is over. Hang-ups are a normal end.
async fn one_way(
    reader: &mut impl Reader,
    writer: &mut impl Writer,
    counters: [Option<&AtomicU64>; 3],
) -> io::Result<()> {
    let copied = async {
        loop {
            let next = tokio::select! {
                biased;
                next = reader.read_chunk() => next?,
                // The far end is gone: waiting for the reader (an app that may never send or
                // close) would only hold this connection's sockets.
                _ = writer.closed() => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the far end reset"))
                }
            };
            let Some(chunk) = next else { break };
            let n = chunk.len() as u64;
            writer.write_chunk(chunk).await?;
            for counter in counters.iter().flatten() {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    let copied = copied.or_else(|e| if is_hang_up_io(&e) { Ok(()) } else { Err(e) });
    if let Err(e) = &copied {
        if e.kind() == io::ErrorKind::ConnectionAborted {
            // The peer aborted its stream: pass the abort on rather than a clean FIN.
            writer.abort();
            return copied;
        }
    }
    let finished = writer
        .finish()
        .await
        .or_else(|e| if is_hang_up_io(&e) { Ok(()) } else { Err(e) });
    copied.and(finished)
}

/// Copy `a` → `b` and `b` → `a` until both directions have finished, keeping half-close; the
/// result is the first direction's error, if any. Bytes are counted as they flow: globally
/// (`stats`), for this connection (`transferred`) and for its metric labels (`labelled`), each
/// with one relaxed atomic add per chunk.
pub async fn bidirectional(
    (mut a_read, mut a_write): (impl Reader, impl Writer),
    (mut b_read, mut b_write): (impl Reader, impl Writer),
    stats: &Stats,
    transferred: &Transferred,
    labelled: Option<&Counters>,
) -> io::Result<()> {
    let (sent, received) = tokio::join!(
        one_way(
            &mut a_read,
            &mut b_write,
            [
                Some(&transferred.sent),
                Some(&stats.bytes_sent),
                labelled.map(|c| &c.sent)
            ]
        ),
        one_way(
            &mut b_read,
            &mut a_write,
            [
                Some(&transferred.received),
                Some(&stats.bytes_received),
                labelled.map(|c| &c.received)
            ]
        ),
    );
    sent.and(received)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// A scripted reader: chunks, then an end or an error.
    struct Script(VecDeque<io::Result<Option<Bytes>>>);

    impl Reader for Script {
        async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
            self.0.pop_front().unwrap_or(Ok(None))
        }
    }

    /// A writer that records what it got and whether it was finished.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, bool)>>, Arc<Mutex<bool>>);

    impl Writer for Sink {
        async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
            self.0.lock().unwrap().0.extend_from_slice(&chunk);
            Ok(())
        }
        async fn finish(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().1 = true;
            Ok(())
        }
        fn abort(&mut self) {
            *self.1.lock().unwrap() = true;
        }
    }

    fn data(text: &'static str) -> io::Result<Option<Bytes>> {
        Ok(Some(Bytes::from_static(text.as_bytes())))
    }

    fn run(a: Script, b: Script) -> (io::Result<()>, Sink, Sink) {
        let (to_a, to_b) = (Sink::default(), Sink::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let stats = Stats::default();
        let transferred = Transferred::default();
        let result = rt.block_on(bidirectional(
            (a, to_a.clone()),
            (b, to_b.clone()),
            &stats,
            &transferred,
            None,
        ));
        (result, to_a, to_b)
    }

    #[test]
    fn an_error_one_way_lets_the_other_way_finish_and_still_half_closes() {
        let a = Script(VecDeque::from([
            data("ping"),
            Err(io::Error::new(io::ErrorKind::InvalidData, "garbled")),
        ]));
        let b = Script(VecDeque::from([data("pong"), data("more"), Ok(None)]));
        let (result, to_a, to_b) = run(a, b);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(*to_b.0.lock().unwrap(), (b"ping".to_vec(), true));
        assert_eq!(*to_a.0.lock().unwrap(), (b"pongmore".to_vec(), true));
    }

    #[test]
    fn a_stream_aborted_by_the_peer_aborts_the_other_side_instead_of_half_closing_it() {
        let a = Script(VecDeque::from([
            data("partial"),
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "CONNECT_ERROR",
            )),
        ]));
        let b = Script(VecDeque::from([Ok(None)]));
        let (result, _, to_b) = run(a, b);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(*to_b.0.lock().unwrap(), (b"partial".to_vec(), false));
        assert!(
            *to_b.1.lock().unwrap(),
            "the far side must be aborted, not finished"
        );
    }

    #[test]
    fn a_reset_or_broken_pipe_is_a_normal_end() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::NotConnected,
            io::ErrorKind::UnexpectedEof,
        ] {
            let a = Script(VecDeque::from([data("x"), Err(kind.into())]));
            let b = Script(VecDeque::from([Ok(None)]));
            let (result, _, to_b) = run(a, b);
            assert!(result.is_ok(), "{kind:?} should end the copy cleanly");
            assert_eq!(*to_b.0.lock().unwrap(), (b"x".to_vec(), true));
        }
    }
}
