//! The bodies that flow through the waypoint: the response on its way back (bytes counted, its
//! endpoint counted busy, its request reported when it ends), the request body on its way to the
//! endpoint (bytes counted), and the bodies the waypoint writes itself.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use super::balance::Active;
use super::telemetry::Exchange;
use super::upstream::Body;
use super::Waypoint;

pub(super) fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A response body on its way to the client: its bytes counted, its endpoint counted as busy,
/// and its request reported once it is done (or the client went away: `DC`).
pub(super) struct Tracked<B> {
    pub(super) body: B,
    pub(super) exchange: Arc<Exchange>,
    pub(super) status: u16,
    pub(super) waypoint: Arc<Waypoint>,
    pub(super) _active: Option<Active>,
    pub(super) ended: bool,
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        let (flags, details) = if self.ended {
            ("-", None)
        } else {
            (
                "DC",
                Some("the client went away before the whole response was sent"),
            )
        };
        self.exchange.finish(
            self.status,
            flags,
            details,
            &self.waypoint.table.get().metrics,
            self.waypoint.access_log.as_ref(),
        );
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                count_data(frame, &self.exchange.response_bytes);
                if self.body.is_end_stream() {
                    self.ended = true;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Add a DATA frame's length to `bytes` (trailers count nothing).
fn count_data(frame: &Frame<Bytes>, bytes: &AtomicU64) {
    if let Some(data) = frame.data_ref() {
        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

/// A request body as the client sends it, or as read whole for a Python filter that asked to see
/// it (bounded by the filter's limit).
pub(super) enum RequestBody {
    Streamed(Incoming),
    Buffered(Option<Bytes>),
}

impl RequestBody {
    /// The body read whole, refused past `limit` bytes (`Ok(None)`).
    pub(super) async fn buffered(self, limit: usize) -> Result<Option<Self>, hyper::Error> {
        let body = match self {
            RequestBody::Streamed(body) => body,
            buffered => return Ok(Some(buffered)),
        };
        match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                Ok(Some(RequestBody::Buffered(
                    (!bytes.is_empty()).then_some(bytes),
                )))
            }
            Err(e) => match e.downcast::<hyper::Error>() {
                Ok(e) => Err(*e),
                Err(_) => Ok(None),
            },
        }
    }

    pub(super) fn bytes(&self) -> Option<Bytes> {
        match self {
            RequestBody::Buffered(b) => Some(b.clone().unwrap_or_default()),
            RequestBody::Streamed(_) => None,
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// A request body on its way to the endpoint, its bytes counted for the report.
pub(super) struct CountedRequest {
    pub(super) body: RequestBody,
    pub(super) bytes: Arc<AtomicU64>,
}

impl HttpBody for CountedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            count_data(frame, &self.bytes);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pub(super) fn empty_body() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}
