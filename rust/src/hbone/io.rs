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
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())), // the peer ended the stream: EOF
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
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
