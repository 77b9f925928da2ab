//! Writes of one HBONE connection gathered per pass of its task, so frames that several streams
//! queued at about the same time leave in one TLS record and one `writev`, not one each.
//!
//! h2 flushes its transport after every large DATA frame it encodes, and rustls turns each flush
//! into a record and a system call. Under load many streams of one connection have a frame ready
//! in the same scheduler pass (a burst of requests through a waypoint, their responses coming
//! back): one send per frame was a third of the waypoint's CPU, most of it in the kernel's
//! transmit path. [`Batched`] holds small writes and, on the first flush of a task pass, only
//! wakes the task again; what is held leaves at the first flush of a later pass (by then the other
//! streams' frames are in), when it would pass a TLS record's worth of plaintext, or at shutdown.
//! Writes of a record's size or more go straight through, so bulk streams are not copied.
//!
//! A pass is one poll of the task that drives the connection, counted by [`Passes::drive`].

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Plaintext held at most: a TLS record's (16 KiB) less room for the record's overhead.
const HELD_MAX: usize = 16 * 1024 - 64;

/// How many times the task driving a connection has been polled.
#[derive(Clone, Default)]
pub struct Passes(Arc<AtomicU64>);

impl Passes {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// `future`, counting each of its polls as a pass.
    pub fn drive<F: Future>(self, future: F) -> Driven<F> {
        Driven {
            passes: self,
            future,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Driven<F> {
        passes: Passes,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Driven<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.passes.0.fetch_add(1, Ordering::Relaxed);
        this.future.poll(cx)
    }
}

/// A transport whose small writes are held until a later pass of its task (see the module).
pub struct Batched<T> {
    inner: T,
    held: Vec<u8>,
    /// Bytes of `held` the transport already took.
    sent: usize,
    /// The pass in which a flush was first put off, while bytes are held.
    deferred: Option<u64>,
    passes: Passes,
}

impl<T> Batched<T> {
    pub fn new(inner: T, passes: Passes) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            deferred: None,
            passes,
        }
    }

    #[cfg(test)]
    fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> Batched<T> {
    /// Hand everything held to the transport.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Freed, not kept: an idle connection holds no buffer.
        self.held = Vec::new();
        self.sent = 0;
        self.deferred = None;
        Poll::Ready(Ok(()))
    }

    /// Room for `len` more bytes, or Ready(false) when they should go straight through.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if !self.held.is_empty() && self.held.len() + len > HELD_MAX {
            ready!(self.poll_send_held(cx))?;
        }
        Poll::Ready(Ok(self.held.is_empty() && len >= HELD_MAX))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Batched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Batched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if ready!(self.poll_room(cx, buf.len()))? {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if ready!(self.poll_room(cx, len))? {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            self.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent < self.held.len() {
            let now = self.passes.now();
            match self.deferred {
                // Later in the pass that first held them: other frames may still come.
                Some(pass) if pass == now => return Poll::Ready(Ok(())),
                Some(_) => ready!(self.poll_send_held(cx))?,
                None => {
                    // Come back once the streams that are ready have had their turn.
                    self.deferred = Some(now);
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A transport that counts the writes it gets.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn writes_flushed_in_one_pass_leave_together_in_the_next() {
        run(async {
            let passes = Passes::default();
            let mut io = Batched::new(Counting::default(), passes.clone());
            let mut step = 0;
            passes
                .drive(std::future::poll_fn(|cx| {
                    step += 1;
                    let mut io = Pin::new(&mut io);
                    if step == 1 {
                        for part in [&b"one "[..], b"two ", b"three"] {
                            assert!(io.as_mut().poll_write(cx, part).is_ready());
                            // h2 flushes after each large frame: the first defers, the rest wait.
                            assert!(io.as_mut().poll_flush(cx).is_ready());
                        }
                        assert_eq!(io.get_ref().writes, 0, "nothing sent in the first pass");
                        return Poll::Pending; // the deferral woke this task: a second pass
                    }
                    assert!(io.as_mut().poll_flush(cx).is_ready());
                    Poll::Ready(())
                }))
                .await;
            assert_eq!(io.get_ref().writes, 1);
            assert_eq!(io.get_ref().bytes, b"one two three");
        });
    }

    #[test]
    fn a_record_sized_write_goes_straight_through_after_what_was_held() {
        run(async {
            let passes = Passes::default();
            let mut io = Batched::new(Counting::default(), passes);
            io.write_all(b"head").await.unwrap();
            let big = vec![7u8; HELD_MAX];
            io.write_all(&big).await.unwrap();
            assert_eq!(io.get_ref().writes, 2);
            assert_eq!(&io.get_ref().bytes[..4], b"head");
            assert_eq!(io.get_ref().bytes.len(), 4 + HELD_MAX);
            io.write_all(b"tail").await.unwrap();
            io.shutdown().await.unwrap();
            assert_eq!(io.get_ref().writes, 3, "shutdown sends what was held");
        });
    }

    #[test]
    fn reads_pass_through() {
        run(async {
            let (a, mut b) = tokio::io::duplex(64);
            let mut io = Batched::new(a, Passes::default());
            b.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        });
    }
}
