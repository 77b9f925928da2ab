//! One HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), for what speaks a protocol
//! inside the tunnel: the waypoint's HTTP server on the stream it accepted, and its HTTP clients
//! on the streams it opened. Flow control follows h2's rules: received bytes give their window
//! back once read; a write waits for send capacity and sends at most what was granted.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A CONNECT stream's two halves, read and written as one byte stream.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read (a DATA frame larger than the reader's buffer, or bytes a
    /// protocol detector looked at and put back).
    pending: Bytes,
    /// The END_STREAM flag was sent: further writes are an error.
    shut: bool,
    /// An error met after a read had already taken some bytes, for the next read to return.
    failed: Option<io::Error>,
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("checked is_io");
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
            failed: None,
        }
    }

    /// The stream's halves again, with what was received but not read yet.
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Bytes) {
        (self.send, self.recv, self.pending)
    }

    /// The first bytes the peer sends (None at once if it ends the stream first), kept to be
    /// read again: a protocol detector looks at them, then the protocol's parser reads them.
    pub async fn peek(&mut self) -> io::Result<&[u8]> {
        if self.pending.is_empty() {
            if let Some(data) = self.recv.data().await {
                let data = data.map_err(h2_to_io)?;
                let _ = self.recv.flow_control().release_capacity(data.len());
                self.pending = data;
            }
        }
        Ok(&self.pending)
    }
}

impl AsyncRead for H2Io {
    /// Fills `buf` with every DATA frame already received, not just the first: a sender whose
    /// reads were split (Istio's ztunnel reads a connection 1 KiB at a time at first) sends one
    /// request as several frames in one TLS record, and handing them over one per read would
    /// make the HTTP layer forward each piece as its own write and TLS record.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let mut filled = false;
        while buf.remaining() > 0 {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                filled = true;
                continue;
            }
            match self.recv.poll_data(cx) {
                Poll::Pending if filled => break,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => break, // the peer ended the stream: EOF (after what was read)
                Poll::Ready(Some(Err(e))) if filled => {
                    // Deliver what was read first; the error is the next read's answer.
                    self.failed = Some(h2_to_io(e));
                    break;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let granted = loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n.min(buf.len()),
            }
        };
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..granted]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(granted))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes what `send_data` queued as its connection task runs; nothing to push here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // The stream may already be reset by the peer; then there is nothing to end.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
