//! Request and response bodies as the proxy forwards them.
//!
//! A request body is recorded while it streams to the first upstream, up to
//! [`REPLAY_LIMIT`], so that a retry or a mirror can send it again; a larger one disables both
//! for that request, as in Envoy. A response body counts its bytes, watches for `grpc-status`
//! in the trailers and tells its [`Finish`] when it ended — or was dropped by a client that
//! went away — so metrics and the access log describe the whole exchange.

use std::{
    error::Error as StdError,
    future::Future as _,
    mem,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Largest request body kept for retries and mirrors.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The body of a request sent upstream.
pub enum RequestBody {
    Empty,
    /// The downstream body, recorded as it goes.
    Tee {
        inner: Incoming,
        tape: Arc<Tape>,
    },
    /// A recorded body, sent again.
    Replay {
        chunks: std::vec::IntoIter<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

/// What a [`RequestBody::Tee`] recorded.
#[derive(Default)]
pub struct Tape(Mutex<TapeState>);

#[derive(Default)]
struct TapeState {
    chunks: Vec<Bytes>,
    bytes: u64,
    complete: bool,
    overflowed: bool,
    trailers: Option<HeaderMap>,
}

impl Tape {
    /// Bytes of request body forwarded so far.
    pub fn bytes(&self) -> u64 {
        self.0.lock().expect("tape poisoned").bytes
    }

    /// The body again, if it was read to the end and was small enough to keep.
    pub fn replay(&self) -> Option<RequestBody> {
        let state = self.0.lock().expect("tape poisoned");
        (state.complete && !state.overflowed).then(|| RequestBody::Replay {
            chunks: state.chunks.clone().into_iter(),
            trailers: state.trailers.clone(),
        })
    }
}

impl RequestBody {
    /// Wraps a downstream body; returns the body to send and its tape (`None` when the
    /// request has no body: it can always be replayed).
    pub fn record(inner: Incoming) -> (Self, Option<Arc<Tape>>) {
        if inner.is_end_stream() {
            return (RequestBody::Empty, None);
        }
        let tape = Arc::new(Tape::default());
        (
            RequestBody::Tee {
                inner,
                tape: tape.clone(),
            },
            Some(tape),
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Tee { inner, tape } => {
                let frame = match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(frame) => frame,
                };
                let mut state = tape.0.lock().expect("tape poisoned");
                // A body of known length ends with its last byte: hyper does not poll again.
                if inner.is_end_stream() {
                    state.complete = true;
                }
                match &frame {
                    None => state.complete = true,
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            state.bytes += data.len() as u64;
                            if !state.overflowed {
                                if state.bytes as usize > REPLAY_LIMIT {
                                    state.overflowed = true;
                                    state.chunks = Vec::new();
                                } else {
                                    state.chunks.push(data.clone());
                                }
                            }
                        } else if let Some(trailers) = frame.trailers_ref() {
                            state.trailers = Some(trailers.clone());
                            state.complete = true;
                        }
                    }
                    Some(Err(_)) => state.overflowed = true,
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            RequestBody::Replay { chunks, trailers } => match chunks.next() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Tee { inner, .. } => inner.is_end_stream(),
            RequestBody::Replay { chunks, trailers } => chunks.len() == 0 && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Tee { inner, .. } => inner.size_hint(),
            RequestBody::Replay { chunks, trailers } if trailers.is_none() => {
                SizeHint::with_exact(chunks.as_slice().iter().map(|c| c.len() as u64).sum())
            }
            RequestBody::Replay { .. } => SizeHint::default(),
        }
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyEnd {
    pub bytes: u64,
    /// `grpc-status` from the trailers, if any.
    pub grpc_status: Option<u32>,
    /// The upstream failed mid-body.
    pub upstream_error: bool,
    /// Dropped before its end: the client went away.
    pub cancelled: bool,
    /// Cut off by the route timeout.
    pub timed_out: bool,
}

/// Told once when a response body ended.
pub trait Finish: Send + 'static {
    fn finish(self, end: BodyEnd);
}

/// The body of a response sent downstream.
pub struct ResponseBody<F: Finish> {
    source: Source,
    end: BodyEnd,
    finish: Option<F>,
    /// The route timeout, when the body must end by then.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Source {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

impl<F: Finish> ResponseBody<F> {
    pub fn upstream(body: Incoming, finish: F) -> Self {
        Self {
            source: Source::Upstream(body),
            end: BodyEnd::default(),
            finish: Some(finish),
            deadline: None,
        }
    }

    /// Ends the body with an error at `deadline`, as Envoy resets a response that outlives
    /// the route timeout.
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        self
    }

    /// A response the proxy makes itself.
    pub fn local(body: Bytes, finish: F) -> Self {
        Self {
            source: Source::Local((!body.is_empty()).then_some(body)),
            end: BodyEnd::default(),
            finish: Some(finish),
            deadline: None,
        }
    }

    fn ended(&self) -> bool {
        match &self.source {
            Source::Local(body) => body.is_none(),
            Source::Upstream(body) => body.is_end_stream(),
        }
    }

    fn done(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.finish(mem::take(&mut self.end));
        }
    }
}

impl<F: Finish> Drop for ResponseBody<F> {
    fn drop(&mut self) {
        if self.finish.is_some() {
            // An empty body may never be polled; only a body cut short is a cancellation.
            self.end.cancelled = !self.ended();
            self.done();
        }
    }
}

impl<F: Finish + Unpin> Body for ResponseBody<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline {
            if this.finish.is_some() && deadline.as_mut().poll(cx).is_ready() {
                this.end.timed_out = true;
                this.done();
                return Poll::Ready(Some(Err("upstream request timeout".into())));
            }
        }
        let frame = match &mut this.source {
            Source::Local(body) => body.take().map(|b| Ok(Frame::data(b))),
            Source::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame.map(|f| f.map_err(BoxError::from)),
            },
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.end.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.end.grpc_status = grpc_status(trailers);
                }
            }
            Some(Err(_)) => {
                this.end.upstream_error = true;
                this.done();
            }
            None => this.done(),
        }
        if matches!(frame, Some(Ok(ref f)) if f.is_trailers()) {
            // Trailers are the last frame: finish now, not when the client drops the body.
            this.done();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
            Source::Upstream(body) => body.size_hint(),
        }
    }
}

/// `grpc-status` of a header or trailer map.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
