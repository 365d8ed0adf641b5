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

use super::UpstreamBody;

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
    /// Counted for a gRPC request.
    messages: Option<GrpcMessages>,
    complete: bool,
    overflowed: bool,
    /// The client's body broke off or was malformed (invalid chunked framing...).
    failed: bool,
    trailers: Option<HeaderMap>,
}

impl Tape {
    /// Bytes of request body forwarded so far.
    pub fn bytes(&self) -> u64 {
        self.0.lock().expect("tape poisoned").bytes
    }

    /// gRPC messages forwarded so far (0 for a request that is not gRPC).
    pub fn messages(&self) -> u64 {
        let state = self.0.lock().expect("tape poisoned");
        state.messages.map_or(0, |m| m.count())
    }

    /// Whether reading the client's body failed: what went wrong upstream is then the
    /// client's doing (`400 DPE`), not the upstream's.
    pub fn downstream_failed(&self) -> bool {
        self.0.lock().expect("tape poisoned").failed
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
    /// request has no body: it can always be replayed). The tape of a `grpc` request counts
    /// its messages too.
    pub fn record(inner: Incoming, grpc: bool) -> (Self, Option<Arc<Tape>>) {
        if inner.is_end_stream() {
            return (RequestBody::Empty, None);
        }
        let tape = Arc::new(Tape(Mutex::new(TapeState {
            messages: grpc.then(GrpcMessages::default),
            ..TapeState::default()
        })));
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
                            if let Some(messages) = &mut state.messages {
                                messages.feed(data);
                            }
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
                    Some(Err(_)) => {
                        state.overflowed = true;
                        state.failed = true;
                    }
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
    /// gRPC messages (0 for a response that is not gRPC).
    pub messages: u64,
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

    /// Whether the response is gRPC's, whose messages are counted.
    fn grpc(&self) -> bool {
        false
    }
}

/// The body of a response sent downstream.
pub struct ResponseBody<F: Finish> {
    source: Source,
    end: BodyEnd,
    messages: Option<GrpcMessages>,
    finish: Option<F>,
    /// The route timeout, when the body must end by then.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Source {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

impl<F: Finish> ResponseBody<F> {
    pub fn upstream(body: impl Into<UpstreamBody>, finish: F) -> Self {
        Self {
            source: Source::Upstream(body.into()),
            end: BodyEnd::default(),
            messages: finish.grpc().then(GrpcMessages::default),
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
            messages: None,
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
            self.end.messages = self.messages.map_or(0, |m| m.count());
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
                    if let Some(messages) = &mut this.messages {
                        messages.feed(data);
                    }
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

/// Counts the messages of a gRPC body as its bytes go by, however frames split them: each
/// message is a 5-byte prefix (a compression flag, then its length, big-endian) and that
/// many bytes. A message counts from its first byte, as Envoy's gRPC statistics count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcMessages {
    count: u64,
    /// Bytes of the current message's prefix seen so far (0: the next byte starts one).
    prefix_seen: u8,
    /// The length read from the prefix so far.
    length: u32,
    /// Bytes of the current message still to come after its prefix.
    left: u64,
}

impl GrpcMessages {
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let skipped = data
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= skipped as u64;
                data = &data[skipped..];
                continue;
            }
            if self.prefix_seen == 0 {
                // gRPC-Web sends its trailers as a frame with the flag's top bit set.
                if data[0] & 0x80 == 0 {
                    self.count += 1;
                }
            } else {
                self.length = (self.length << 8) | u32::from(data[0]);
            }
            data = &data[1..];
            self.prefix_seen += 1;
            if self.prefix_seen == 5 {
                self.left = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
            }
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{header, HeaderValue, Request, Response};
    use http_body_util::{BodyExt as _, Full};
    use hyper::{
        client::conn::{http1, http2},
        service::service_fn,
    };
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
    };
    use tokio::{sync::mpsc, task::JoinHandle, time::Duration};

    use super::*;

    /// A body fed one frame at a time by the test; it ends when the sender is dropped.
    struct Feed(mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for Feed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    type Feeder = mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

    fn feed(chunks: &[&'static str]) -> (Feeder, Feed) {
        let (tx, rx) = mpsc::unbounded_channel();
        for chunk in chunks {
            tx.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
                .unwrap();
        }
        (tx, Feed(rx))
    }

    fn trailers(name: &'static str, value: &'static str) -> Frame<Bytes> {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_static(value));
        Frame::trailers(map)
    }

    /// Bounds every await, so a body that never ends fails the test instead of hanging it.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("the body did not make progress")
    }

    /// `body` as the proxy receives it from a client: the server half of an HTTP/1.1 (or h2c)
    /// exchange over an in-memory pipe. Aborting the returned task cuts the client off.
    async fn received<B>(h2: bool, body: B) -> (Incoming, JoinHandle<()>)
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
    {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let _ = tx.send(request.into_body());
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let uri = if h2 { "http://upstream/" } else { "/" };
        let request = Request::post(uri)
            .header(header::HOST, "upstream")
            .body(body)
            .unwrap();
        let client = tokio::spawn(async move {
            let io = TokioIo::new(client);
            if h2 {
                let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
                let _ = tokio::join!(conn, sender.send_request(request));
            } else {
                let (mut sender, conn) = http1::handshake(io).await.unwrap();
                let _ = tokio::join!(conn, sender.send_request(request));
            }
        });
        (within(rx.recv()).await.unwrap(), client)
    }

    /// An upstream's response with `body`, as the proxy's client half receives it.
    async fn upstream_response<B>(h2: bool, body: B) -> Incoming
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
    {
        let (client, server) = tokio::io::duplex(1 << 20);
        let body = Arc::new(Mutex::new(Some(body)));
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<Incoming>| {
                let body = body.lock().unwrap().take().expect("one request");
                async move { Ok::<_, Infallible>(Response::new(body)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let io = TokioIo::new(client);
        let empty = || Full::new(Bytes::new());
        let response = if h2 {
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let request = Request::get("http://upstream/").body(empty()).unwrap();
            within(sender.send_request(request)).await.unwrap()
        } else {
            let (mut sender, conn) = http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let request = Request::get("/")
                .header(header::HOST, "upstream")
                .body(empty())
                .unwrap();
            within(sender.send_request(request)).await.unwrap()
        };
        response.into_body()
    }

    /// Reads `body` to its end: the data, and the trailers if any.
    async fn read_all<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B::Error: std::fmt::Debug,
    {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = within(body.frame()).await {
            let frame = frame.expect("the body ends without an error");
            if let Some(chunk) = frame.data_ref() {
                data.extend_from_slice(chunk);
            } else if let Ok(t) = frame.into_trailers() {
                trailers = Some(t);
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn a_recorded_body_under_the_limit_replays_byte_exact() {
        let (feeder, body) = feed(&["hello ", "mesh ", "world"]);
        drop(feeder);
        let (incoming, _client) = received(false, body).await;
        let (mut first, tape) = RequestBody::record(incoming, false);
        let tape = tape.expect("a request with a body has a tape");
        assert!(
            tape.replay().is_none(),
            "nothing can be replayed before the end"
        );

        assert_eq!(read_all(&mut first).await.0, b"hello mesh world");
        assert_eq!(tape.bytes(), 16);
        // Every retry gets the same bytes again.
        for _ in 0..2 {
            let mut again = tape.replay().expect("a small body is replayable");
            assert_eq!(again.size_hint().exact(), Some(16));
            assert_eq!(
                read_all(&mut again).await,
                (b"hello mesh world".to_vec(), None)
            );
        }
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_replayable_once_its_last_byte_was_read() {
        let (incoming, _client) = received(
            false,
            Full::new(Bytes::from_static(b"0123456789")).map_err(BoxError::from),
        )
        .await;
        let (mut first, tape) = RequestBody::record(incoming, false);
        let tape = tape.unwrap();
        // Read as hyper writes a body of known length: until it says it ended, no further.
        let mut forwarded = Vec::new();
        while !first.is_end_stream() {
            let frame = within(first.frame()).await.unwrap().unwrap();
            forwarded.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(forwarded, b"0123456789");
        let mut again = tape.replay().expect("the whole body was read");
        assert_eq!(read_all(&mut again).await.0, b"0123456789");
    }

    #[tokio::test]
    async fn a_body_at_the_limit_replays_and_one_byte_more_does_not() {
        for (size, replayable) in [(REPLAY_LIMIT, true), (REPLAY_LIMIT + 1, false)] {
            let payload = Bytes::from(vec![b'x'; size]);
            let (incoming, _client) =
                received(true, Full::new(payload.clone()).map_err(BoxError::from)).await;
            let (mut first, tape) = RequestBody::record(incoming, false);
            let tape = tape.unwrap();
            // The body is forwarded whole either way.
            assert_eq!(read_all(&mut first).await.0, payload);
            assert_eq!(tape.bytes(), size as u64, "the tape counts every byte");
            match tape.replay() {
                Some(mut again) => {
                    assert!(replayable, "{size} bytes must not be kept");
                    assert_eq!(read_all(&mut again).await.0, payload);
                }
                None => assert!(!replayable, "{size} bytes must be replayable"),
            }
        }
    }

    #[tokio::test]
    async fn a_body_read_in_part_cannot_be_replayed() {
        let (feeder, body) = feed(&["first"]);
        let (incoming, _client) = received(true, body).await;
        let (mut first, tape) = RequestBody::record(incoming, false);
        let tape = tape.unwrap();
        let frame = within(first.frame()).await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap(), "first");
        assert_eq!(tape.bytes(), 5);
        assert!(
            tape.replay().is_none(),
            "the rest of the body is still to come"
        );
        drop(feeder);
    }

    #[tokio::test]
    async fn request_trailers_are_replayed_after_the_data() {
        let (feeder, body) = feed(&["payload"]);
        feeder.send(Ok(trailers("x-checksum", "abc"))).unwrap();
        drop(feeder);
        let (incoming, _client) = received(true, body).await;
        let (mut first, tape) = RequestBody::record(incoming, false);
        let tape = tape.unwrap();
        let (data, sent_trailers) = read_all(&mut first).await;
        assert_eq!(data, b"payload");
        assert_eq!(sent_trailers.unwrap()["x-checksum"], "abc");
        let (data, replayed) = read_all(&mut tape.replay().unwrap()).await;
        assert_eq!(data, b"payload");
        assert_eq!(replayed.unwrap()["x-checksum"], "abc");
    }

    #[tokio::test]
    async fn a_body_the_client_cut_off_cannot_be_replayed() {
        let (feeder, body) = feed(&["partial"]);
        let (incoming, client) = received(false, body).await;
        let (mut first, tape) = RequestBody::record(incoming, false);
        let tape = tape.unwrap();
        let frame = within(first.frame()).await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap(), "partial");
        client.abort();
        let _ = client.await;
        let end = within(first.frame()).await;
        assert!(
            matches!(end, Some(Err(_))),
            "a cut-off body ends in an error"
        );
        assert!(tape.replay().is_none());
        drop(feeder);
    }

    #[tokio::test]
    async fn a_request_without_body_needs_no_tape() {
        let (incoming, _client) =
            received(false, Full::new(Bytes::new()).map_err(BoxError::from)).await;
        let (body, tape) = RequestBody::record(incoming, false);
        assert!(matches!(body, RequestBody::Empty));
        assert!(tape.is_none());
        assert!(body.is_end_stream());
    }

    /// Collects what each response body reports, to check it is told exactly once.
    #[derive(Clone, Default)]
    struct Ends(Arc<Mutex<Vec<BodyEnd>>>);

    impl Finish for Ends {
        fn finish(self, end: BodyEnd) {
            self.0.lock().unwrap().push(end);
        }
    }

    impl Ends {
        fn told(&self) -> Vec<BodyEnd> {
            self.0.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn a_response_body_reports_its_bytes_and_the_grpc_status_of_its_trailers() {
        let (feeder, body) = feed(&["hello", " world"]);
        feeder.send(Ok(trailers("grpc-status", "3"))).unwrap();
        drop(feeder);
        let ends = Ends::default();
        let mut response =
            ResponseBody::upstream(upstream_response(true, body).await, ends.clone());
        let (data, trailers) = read_all(&mut response).await;
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["grpc-status"], "3");
        let expected = BodyEnd {
            bytes: 11,
            grpc_status: Some(3),
            ..BodyEnd::default()
        };
        assert_eq!(
            ends.told(),
            [expected],
            "told at the end, before the body is dropped"
        );
        drop(response);
        assert_eq!(ends.told(), [expected], "told once");
    }

    #[tokio::test]
    async fn a_response_body_read_to_its_last_byte_is_not_a_cancellation() {
        let ends = Ends::default();
        let upstream = upstream_response(
            false,
            Full::new(Bytes::from_static(b"12345")).map_err(BoxError::from),
        )
        .await;
        let mut response = ResponseBody::upstream(upstream, ends.clone());
        // A client that stops reading once the announced length arrived.
        while !response.is_end_stream() {
            within(response.frame()).await.unwrap().unwrap();
        }
        drop(response);
        assert_eq!(
            ends.told(),
            [BodyEnd {
                bytes: 5,
                ..BodyEnd::default()
            }]
        );
    }

    #[tokio::test]
    async fn a_response_body_dropped_before_its_end_is_cancelled() {
        let (feeder, body) = feed(&["part"]);
        let ends = Ends::default();
        let mut response =
            ResponseBody::upstream(upstream_response(true, body).await, ends.clone());
        let frame = within(response.frame()).await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap(), "part");
        assert!(ends.told().is_empty(), "still streaming");
        drop(response);
        assert_eq!(
            ends.told(),
            [BodyEnd {
                bytes: 4,
                cancelled: true,
                ..BodyEnd::default()
            }]
        );
        drop(feeder);
    }

    #[tokio::test]
    async fn a_response_body_past_the_route_deadline_is_cut_off() {
        let (feeder, body) = feed(&[]);
        let ends = Ends::default();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut response =
            ResponseBody::upstream(upstream_response(true, body).await, ends.clone())
                .with_deadline(Some(deadline));
        // The upstream sends nothing more: the deadline ends the body with an error.
        let end = within(response.frame()).await;
        assert!(matches!(end, Some(Err(_))), "the body ends in an error");
        drop(response);
        let told = ends.told();
        assert_eq!(told.len(), 1);
        assert!(told[0].timed_out);
        assert!(!told[0].cancelled, "the proxy cut it off, not the client");
        drop(feeder);
    }

    #[tokio::test]
    async fn a_response_body_the_upstream_broke_reports_an_upstream_error() {
        let (feeder, body) = feed(&["some"]);
        let ends = Ends::default();
        let mut response =
            ResponseBody::upstream(upstream_response(true, body).await, ends.clone());
        within(response.frame()).await.unwrap().unwrap();
        feeder.send(Err("backend crashed".into())).unwrap();
        let end = within(response.frame()).await;
        assert!(matches!(end, Some(Err(_))), "the break reaches the client");
        let told = ends.told();
        assert_eq!(told.len(), 1);
        assert!(told[0].upstream_error);
        assert!(!told[0].timed_out);
        assert_eq!(told[0].bytes, 4);
    }

    #[tokio::test]
    async fn local_bodies_report_their_bytes_and_an_empty_one_is_never_cancelled() {
        let ends = Ends::default();
        let mut reply = ResponseBody::local(Bytes::from_static(b"route not found"), ends.clone());
        assert_eq!(reply.size_hint().exact(), Some(15));
        assert_eq!(read_all(&mut reply).await.0, b"route not found");
        drop(reply);
        // A body-less reply the client never polls (a redirect, a HEAD answer).
        drop(ResponseBody::local(Bytes::new(), ends.clone()));
        assert_eq!(
            ends.told(),
            [
                BodyEnd {
                    bytes: 15,
                    ..BodyEnd::default()
                },
                BodyEnd::default()
            ]
        );
    }

    #[test]
    fn grpc_status_is_read_from_headers_or_trailers() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(14));
        headers.insert("grpc-status", HeaderValue::from_static("unavailable"));
        assert_eq!(grpc_status(&headers), None, "not a number: no status");
    }

    #[test]
    fn grpc_messages_are_counted_however_frames_split_them() {
        let message = |len: usize| {
            let mut m = vec![0u8];
            m.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len));
            m
        };
        // An empty message, a small one, one longer than 2^16 (every prefix byte counts).
        let stream: Vec<u8> = [message(0), message(3), message(70_000)].concat();
        let mut whole = GrpcMessages::default();
        whole.feed(&stream);
        assert_eq!(whole.count(), 3);
        for split in [1, 2, 4, 5, 6, 8, 4096] {
            let mut counted = GrpcMessages::default();
            for chunk in stream.chunks(split) {
                counted.feed(chunk);
            }
            assert_eq!(counted.count(), 3, "chunks of {split}");
        }
        // gRPC-Web's trailer frame is not a message.
        let mut web = GrpcMessages::default();
        web.feed(&[message(3), vec![0x80, 0, 0, 0, 2, b'o', b'k']].concat());
        assert_eq!(web.count(), 1);
        // A message counts from its first byte, before its end arrived.
        let mut started = GrpcMessages::default();
        started.feed(&stream[..message(0).len() + 1]);
        assert_eq!(started.count(), 2);
    }
}
