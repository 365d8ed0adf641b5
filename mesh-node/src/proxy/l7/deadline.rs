//! The deadlines of a client's HTTP connection, kept by its reads: a slow request head
//! (HTTP/1), and idleness (no request in flight) in either protocol.
//!
//! hyper's own HTTP/1 header-read timer also runs while a keep-alive connection waits for its
//! next request, so it would close idle connections as early as slow ones. Here the two are
//! apart, as in Envoy: the head deadline starts with the first byte of a request head, the
//! idle deadline with the end of the last response. A connection past either deadline reads
//! an error, and hyper closes it; so does an idle connection when the overload manager is
//! critical and it has received nothing for [`SHED_IDLE`] (idle, or stalled in a head).

use std::{
    future::Future as _,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::proxy::{
    overload::{Overload, ShedSignal, SHED_IDLE},
    sources::SourceRequest,
};

/// Writes of several buffers up to this size in all are joined into one for a stream that takes
/// one buffer at a time.
const JOIN_WRITES_UP_TO: usize = 16 * 1024;

/// The client preface of HTTP/2: such a connection has no HTTP/1 heads to time.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Requests of one connection whose responses have not ended.
#[derive(Debug, Default)]
pub(super) struct Requests {
    count: AtomicUsize,
    /// Requests started so far: a head that became a request is no slow head any more.
    started: AtomicUsize,
    /// The connection switched protocols (`101`): a tunnel now, whose deadlines are not these.
    upgraded: AtomicBool,
    /// The connection's reader, woken when the last response ends (its deadlines start).
    reader: AtomicWaker,
}

impl Requests {
    /// Counts a request until the guard is dropped (when its response body ends).
    pub(super) fn start(self: &Arc<Self>) -> Busy {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// The connection became a tunnel (WebSocket...): its reads are no longer timed.
    pub(super) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    fn idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }
}

/// One request in flight.
#[derive(Debug)]
pub(super) struct Busy(Arc<Requests>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// A response body that holds its request's [`Busy`], and its client address's slot, until
/// it ends.
pub(super) struct Held<B> {
    body: B,
    busy: Option<(Busy, Option<SourceRequest>)>,
}

impl<B> Held<B> {
    pub(super) fn new(body: B, busy: Busy, slot: Option<SourceRequest>) -> Self {
        Self {
            body,
            busy: Some((busy, slot)),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || self.body.is_end_stream() {
            self.busy = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A request is in flight: the request's own timeouts apply.
    Busy,
    /// Nothing in flight and nothing received since.
    Idle,
    /// Part of an HTTP/1 request head received.
    Head,
}

/// A client connection's reads, with its deadlines.
pub(super) struct Deadlines<IO> {
    io: IO,
    in_flight: Arc<Requests>,
    head_timeout: Duration,
    idle_timeout: Duration,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    /// The connection's first bytes, until they tell HTTP/2 from HTTP/1.
    preface: Option<Vec<u8>>,
    /// [`Requests::started`] as last seen.
    started: usize,
    shed: ShedSignal,
    /// When the connection last received bytes or became idle.
    progress: Instant,
}

impl<IO> Deadlines<IO> {
    pub(super) fn new(
        io: IO,
        in_flight: Arc<Requests>,
        head_timeout: Duration,
        idle_timeout: Duration,
        overload: Arc<Overload>,
    ) -> Self {
        Self {
            io,
            in_flight,
            head_timeout,
            idle_timeout,
            phase: Phase::Idle,
            timer: Box::pin(tokio::time::sleep(idle_timeout)),
            preface: Some(Vec::new()),
            started: 0,
            shed: ShedSignal::new(&overload),
            progress: Instant::now(),
        }
    }

    /// The connection, without its deadlines.
    pub(super) fn into_inner(self) -> IO {
        self.io
    }

    fn arm(&mut self, phase: Phase, timeout: Duration) {
        self.phase = phase;
        let now = Instant::now();
        self.progress = now;
        self.timer.as_mut().reset(now + timeout);
    }

    /// Whether the overload manager wants this connection closed: no request in flight, and
    /// nothing received for a while.
    fn shed(&mut self, cx: &mut Context<'_>) -> bool {
        self.shed.poll_told(cx)
            && self.phase != Phase::Busy
            && self.shed.closes_idle(self.progress, SHED_IDLE)
    }

    /// Whether the bytes read so far may still be an HTTP/2 preface (judged on the first 24).
    fn note_preface(&mut self, read: &[u8]) -> bool {
        let Some(seen) = &mut self.preface else {
            return false;
        };
        let wanted = H2_PREFACE.len() - seen.len();
        seen.extend_from_slice(&read[..read.len().min(wanted)]);
        if !H2_PREFACE.starts_with(seen) {
            self.preface = None;
            return false;
        }
        true
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlines<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.in_flight.upgraded.load(Ordering::Acquire) {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        // Only the first 24 bytes are looked at, once.
        let h2 = got > 0
            && self
                .preface
                .as_ref()
                .is_some_and(|p| p.len() < H2_PREFACE.len())
            && {
                let bytes = buf.filled()[before..].to_vec();
                self.note_preface(&bytes)
            };
        let h2 = h2 || self.preface.is_some();
        let started = self.in_flight.started.load(Ordering::Acquire);
        if started != self.started {
            // Requests came (and maybe went) since the last read: the head was complete.
            self.started = started;
            self.phase = Phase::Busy;
        }
        if !self.in_flight.idle() {
            self.phase = Phase::Busy;
            // Woken when the last response ends, to start the deadlines.
            self.in_flight.reader.register(cx.waker());
        }
        if self.in_flight.idle() {
            if got > 0 && self.phase != Phase::Head && !h2 && self.preface.is_none() {
                // The first byte of an HTTP/1 head: it has the head timeout to be complete.
                let timeout = self.head_timeout;
                self.arm(Phase::Head, timeout);
            } else if self.phase == Phase::Busy {
                // The last response ended: idle from now (HTTP/2 frames such as PINGs do not
                // make a connection busy, requests do).
                let timeout = self.idle_timeout;
                self.arm(Phase::Idle, timeout);
            }
        }
        if read.is_ready() && got > 0 {
            self.progress = Instant::now();
            return read;
        }
        if self.phase != Phase::Busy && self.timer.as_mut().poll(cx).is_ready() {
            let what = match self.phase {
                Phase::Head => "the request head was not received in time",
                _ => "the connection was idle too long",
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        if self.shed(cx) {
            return Poll::Ready(Err(ShedSignal::error()));
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlines<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.io.is_write_vectored() {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        // Underneath, one write at a time (an HBONE stream: one HTTP/2 DATA frame each): a
        // response head and a small body go out together, joined, rather than one by one.
        let small: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() > 1 && small <= JOIN_WRITES_UP_TO {
            let mut joined = Vec::with_capacity(small);
            for buf in bufs {
                joined.extend_from_slice(buf);
            }
            return Pin::new(&mut self.io).poll_write(cx, &joined);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(&mut self.io).poll_write(cx, first)
    }

    /// Always: hyper then queues bodies instead of copying them into a buffer it keeps (see
    /// `poll_write_vectored` for a stream without vectored writes).
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    const HEAD: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(3600);

    fn unlimited() -> Arc<Overload> {
        Overload::new(crate::metrics::OverloadMetrics::default())
    }

    async fn read_error(reader: &mut Deadlines<tokio::io::DuplexStream>) -> io::Error {
        let mut buf = [0u8; 64];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => panic!("closed instead of timing out"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_times_out_from_its_first_byte() {
        let (mut client, server) = duplex(1024);
        let in_flight = Arc::new(Requests::default());
        let mut reader = Deadlines::new(server, in_flight, HEAD, IDLE, unlimited());
        // Idle before the first byte: only the idle deadline runs.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let start = Instant::now();
        let err = read_error(&mut reader).await;
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("request head"), "{err}");
        assert_eq!(start.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_hold_off_the_deadlines_and_idle_follows() {
        let (mut client, server) = duplex(1024);
        let in_flight = Arc::new(Requests::default());
        let mut reader = Deadlines::new(server, in_flight.clone(), HEAD, IDLE, unlimited());
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(reader.read(&mut buf).await.unwrap() > 0);
        // The head completed: a request is in flight, its body trickles for longer than
        // the head timeout.
        let busy = in_flight.start();
        for _ in 0..5 {
            tokio::time::sleep(HEAD).await;
            client.write_all(b"x").await.unwrap();
            assert!(reader.read(&mut buf).await.unwrap() > 0);
        }
        // The response ended: idle now, and only the idle deadline applies.
        drop(busy);
        let start = Instant::now();
        let err = read_error(&mut reader).await;
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(start.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_answered_between_two_reads_leaves_the_connection_idle() {
        let (mut client, server) = duplex(1024);
        let in_flight = Arc::new(Requests::default());
        let mut reader = Deadlines::new(server, in_flight.clone(), HEAD, IDLE, unlimited());
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(reader.read(&mut buf).await.unwrap() > 0);
        // Served and answered without another read in between.
        drop(in_flight.start());
        let start = Instant::now();
        let err = read_error(&mut reader).await;
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(start.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_when_memory_is_critical_a_busy_one_is_not() {
        use crate::{metrics::OverloadClose, proxy::overload::Level};
        let overload = unlimited();
        let (mut client, server) = duplex(1024);
        let in_flight = Arc::new(Requests::default());
        let mut busy_reader =
            Deadlines::new(server, in_flight.clone(), HEAD, IDLE, overload.clone());
        let (_idle_client, idle_server) = duplex(1024);
        let mut idle_reader = Deadlines::new(
            idle_server,
            Arc::new(Requests::default()),
            HEAD,
            IDLE,
            overload.clone(),
        );
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(busy_reader.read(&mut buf).await.unwrap() > 0);
        let busy = in_flight.start();
        tokio::time::sleep(SHED_IDLE).await;

        let start = Instant::now();
        let closing = tokio::spawn(async move { read_error(&mut idle_reader).await });
        tokio::task::yield_now().await;
        overload.force(Level::Critical);
        let err = closing.await.unwrap();
        assert!(err.to_string().contains("short of memory"), "{err}");
        assert_eq!(start.elapsed(), Duration::ZERO, "closed when told");
        assert_eq!(overload.metrics().closed_count(OverloadClose::Idle), 1);

        // The connection with a request in flight is told too, and keeps waiting for bytes.
        let waited = tokio::time::timeout(SHED_IDLE, busy_reader.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "a busy connection is not closed: {waited:?}"
        );
        client.write_all(b"x").await.unwrap();
        assert_eq!(busy_reader.read(&mut buf).await.unwrap(), 1);
        drop(busy);
    }

    /// A writer that takes one buffer at a time, and records each write.
    #[derive(Default)]
    struct OneAtATime(Vec<usize>);

    impl AsyncWrite for OneAtATime {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_buffers_go_out_in_one_write_to_a_stream_without_vectored_writes() {
        let mut writer = Deadlines::new(
            OneAtATime::default(),
            Arc::new(Requests::default()),
            HEAD,
            IDLE,
            unlimited(),
        );
        assert!(writer.is_write_vectored(), "hyper queues bodies then");
        let head = [b'h'; 100];
        let body = [b'b'; 200];
        let n = writer
            .write_vectored(&[io::IoSlice::new(&head), io::IoSlice::new(&body)])
            .await
            .unwrap();
        assert_eq!(n, 300);
        let large = vec![b'l'; 20 * 1024];
        let n = writer
            .write_vectored(&[io::IoSlice::new(&head), io::IoSlice::new(&large)])
            .await
            .unwrap();
        assert_eq!(
            n, 100,
            "a large body is not copied: the head goes first, alone"
        );
        assert_eq!(writer.io.0, [300, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_while_idle_are_no_slow_head() {
        let (mut client, server) = duplex(1024);
        let in_flight = Arc::new(Requests::default());
        let opened = Instant::now();
        let mut reader = Deadlines::new(server, in_flight, HEAD, IDLE, unlimited());
        client.write_all(H2_PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(reader.read(&mut buf).await.unwrap() > 0);
        // A PING now and then, well past the head timeout, with no stream: neither a slow
        // head nor activity that keeps the connection from being idle.
        for _ in 0..3 {
            tokio::time::sleep(HEAD * 2).await;
            client
                .write_all(b"\0\0\x08\x06\0\0\0\0\0pingpong")
                .await
                .unwrap();
            assert!(reader.read(&mut buf).await.unwrap() > 0);
        }
        let err = read_error(&mut reader).await;
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(opened.elapsed(), IDLE);
    }
}
