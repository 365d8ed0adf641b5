//! Bidirectional byte copy between the downstream (client) and upstream (server) sides.
//!
//! Both directions are driven by one future, so no task or lock is added per connection. When
//! one side reaches end of stream, the write half of the other side is shut down (TCP FIN) and
//! the other direction keeps flowing until it ends too: half-closed connections behave exactly
//! as without the proxy. Buffers start small, so idle connections cost little, grow for
//! connections that keep filling them, and go back to the smallest size once a connection has
//! moved nothing for [`SHRINK_AFTER`]. A connection that moves nothing either way for its idle
//! timeout (Istio's TCP `idleTimeout`, 1 hour by default) is closed. Under memory pressure
//! (the [`Overload`] manager), buffers stop growing and shrink as soon as they are empty, and
//! at the critical level a connection idle for [`SHED_IDLE_TCP`] is closed.

use std::{
    cell::RefCell,
    fmt,
    future::{poll_fn, Future as _},
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use super::overload::{Overload, ShedSignal, SHED_IDLE_TCP};
use crate::metrics::ConnectionMetrics;

/// Buffer sizes: a new connection starts with the first; a direction whose reads fill its
/// buffer [`GROW_AFTER`] times in a row moves to the next size.
const BUFFER_SIZES: [usize; 3] = [4 * 1024, 32 * 1024, 256 * 1024];
const GROW_AFTER: u32 = 4;
/// Grown buffers of a connection that moved nothing for this long go back to the smallest.
pub const SHRINK_AFTER: Duration = Duration::from_secs(2);

/// Counts bytes as they are written, so long-lived connections show up in metrics while open.
pub trait Meter {
    /// Bytes written towards the server (Istio's "received" bytes).
    fn to_upstream(&self, bytes: u64);
    /// Bytes written back to the client (Istio's "sent" bytes).
    fn to_downstream(&self, bytes: u64);
}

impl Meter for () {
    fn to_upstream(&self, _: u64) {}
    fn to_downstream(&self, _: u64) {}
}

impl Meter for ConnectionMetrics {
    fn to_upstream(&self, bytes: u64) {
        self.received(bytes);
    }

    fn to_downstream(&self, bytes: u64) {
        self.sent(bytes);
    }
}

/// Bytes copied in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_downstream: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
    Shutdown,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The connection reached its maximum duration.
    Expired,
    /// Closed while idle by the overload manager, to give memory back.
    Shed,
}

/// A copy that ended with an I/O error: which side, doing what.
#[derive(Debug, Error)]
#[error("{} the {} connection failed after {} bytes up, {} bytes down: {source}", self.op_text(), self.side_text(), .transferred.to_upstream, .transferred.to_downstream)]
pub struct CopyError {
    pub side: Side,
    pub operation: Operation,
    pub transferred: Transferred,
    #[source]
    pub source: io::Error,
}

impl CopyError {
    fn op_text(&self) -> &'static str {
        match self.operation {
            Operation::Read => "reading from",
            Operation::Write => "writing to",
            Operation::Shutdown => "closing the write side of",
            Operation::Idle => "the idle timeout closed",
            Operation::Expired => "the maximum connection duration closed",
            Operation::Shed => "the overload manager closed the idle",
        }
    }

    fn side_text(&self) -> &'static str {
        match self.side {
            Side::Downstream => "downstream (client)",
            Side::Upstream => "upstream (server)",
        }
    }

    /// A reset by either peer is how many applications end connections, and an idle timeout
    /// is policy: neither is a proxy failure worth a warning.
    pub fn is_reset(&self) -> bool {
        matches!(
            self.operation,
            Operation::Idle | Operation::Expired | Operation::Shed
        ) || matches!(
            self.source.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        )
    }
}

/// Copies between `downstream` and `upstream` until both directions reached end of stream.
pub async fn bidirectional<D, U, M>(
    downstream: &mut D,
    upstream: &mut U,
    meter: &M,
) -> Result<Transferred, CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: Meter + ?Sized,
{
    bidirectional_with(downstream, upstream, meter, Lifetime::default(), None).await
}

/// How long a copy may last (`None`: no bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Without a byte either way (Istio's TCP `idleTimeout`).
    pub idle_timeout: Option<Duration>,
    /// In all (Istio's TCP `maxConnectionDuration`).
    pub max_duration: Option<Duration>,
}

/// How a pausable copy ended.
#[derive(Debug)]
pub enum Copied {
    /// Both directions reached end of stream.
    Done(Transferred),
    /// Paused on request: nothing more was read; what was read and not written yet is here,
    /// for whoever takes the connection on.
    Paused(Paused),
}

/// A copy stopped between two reads, for another process to continue.
#[derive(Debug, Default)]
pub struct Paused {
    /// Read from the client and not written to the server yet.
    pub to_upstream: Vec<u8>,
    /// Read from the server and not written to the client yet.
    pub to_downstream: Vec<u8>,
    pub transferred: Transferred,
}

/// How long a pausing copy tries to write out what it holds before it hands it on instead.
const PAUSE_FLUSH: Duration = Duration::from_secs(1);

/// [`bidirectional_with`] that also ends, between two reads, once `pause` is cancelled: see
/// [`Paused`].
pub async fn bidirectional_pausable<D, U, M>(
    downstream: &mut D,
    upstream: &mut U,
    meter: &M,
    lifetime: Lifetime,
    overload: Option<&Arc<Overload>>,
    pause: &tokio_util::sync::CancellationToken,
    held: Paused,
) -> Result<Copied, CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: Meter + ?Sized,
{
    copy(
        downstream,
        upstream,
        meter,
        lifetime,
        overload,
        Some(pause),
        held,
    )
    .await
}

/// [`bidirectional`], ended with an [`Operation::Idle`] error once nothing has moved either
/// way for the idle timeout, or [`Operation::Expired`] at the maximum duration; its buffers
/// kept small under memory pressure and, idle at the critical level, closed
/// ([`Operation::Shed`]).
pub async fn bidirectional_with<D, U, M>(
    downstream: &mut D,
    upstream: &mut U,
    meter: &M,
    lifetime: Lifetime,
    overload: Option<&Arc<Overload>>,
) -> Result<Transferred, CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: Meter + ?Sized,
{
    match copy(
        downstream,
        upstream,
        meter,
        lifetime,
        overload,
        None,
        Paused::default(),
    )
    .await?
    {
        Copied::Done(transferred) => Ok(transferred),
        Copied::Paused(paused) => Ok(paused.transferred),
    }
}

async fn copy<D, U, M>(
    downstream: &mut D,
    upstream: &mut U,
    meter: &M,
    lifetime: Lifetime,
    overload: Option<&Arc<Overload>>,
    pause: Option<&tokio_util::sync::CancellationToken>,
    held: Paused,
) -> Result<Copied, CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: Meter + ?Sized,
{
    let mut pause = pause.map(|p| Box::pin(p.clone().cancelled_owned()));
    // Set once paused: until when what the pipes hold is still written out.
    let mut flush_until: Option<Instant> = None;
    let mut flush_timer: Option<Pin<Box<Sleep>>> = None;
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    // What another process read and did not write: written first, as if read here.
    if !held.to_upstream.is_empty() {
        up.keep(&held.to_upstream);
    }
    if !held.to_downstream.is_empty() {
        down.keep(&held.to_downstream);
    }
    let mut up_done = false;
    let mut down_done = false;
    let transferred = |up: &Pipe, down: &Pipe| Transferred {
        to_upstream: up.total,
        to_downstream: down.total,
    };
    let mut idle = IdleClock::new(lifetime);
    let mut shed = overload.map(ShedSignal::new);
    poll_fn(|cx| {
        if let Some(signal) = pause.as_mut() {
            if signal.as_mut().poll(cx).is_ready() {
                pause = None;
                let until = Instant::now() + PAUSE_FLUSH;
                flush_until = Some(until);
                flush_timer = Some(Box::pin(tokio::time::sleep_until(until)));
            }
        }
        if let Some(until) = flush_until {
            // Paused: no more reads; what the pipes hold goes out while the writers take it,
            // and what they do not take by `until` is handed on.
            let up_flushed = up_done
                || up
                    .poll_write_out(cx, &mut *upstream, |n| meter.to_upstream(n))
                    .is_ready();
            let down_flushed = down_done
                || down
                    .poll_write_out(cx, &mut *downstream, |n| meter.to_downstream(n))
                    .is_ready();
            let timed_out = Instant::now() >= until
                || flush_timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
            if (up_flushed && down_flushed) || timed_out {
                return Poll::Ready(Ok(Copied::Paused(Paused {
                    to_upstream: up.held().to_vec(),
                    to_downstream: down.held().to_vec(),
                    transferred: transferred(&up, &down),
                })));
            }
            return Poll::Pending;
        }
        let moved = up.moved + down.moved;
        let grow = overload.is_none_or(|o| o.may_grow());
        if !up_done {
            match up.poll_copy(cx, grow, &mut *downstream, &mut *upstream, |n| {
                meter.to_upstream(n)
            }) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err((op, e))) => {
                    let side = match op {
                        Operation::Read => Side::Downstream,
                        _ => Side::Upstream,
                    };
                    return Poll::Ready(Err(CopyError {
                        side,
                        operation: op,
                        transferred: transferred(&up, &down),
                        source: e,
                    }));
                }
                Poll::Pending => {}
            }
        }
        if !down_done {
            match down.poll_copy(cx, grow, &mut *upstream, &mut *downstream, |n| {
                meter.to_downstream(n)
            }) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err((op, e))) => {
                    let side = match op {
                        Operation::Read => Side::Upstream,
                        _ => Side::Downstream,
                    };
                    return Poll::Ready(Err(CopyError {
                        side,
                        operation: op,
                        transferred: transferred(&up, &down),
                        source: e,
                    }));
                }
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            return Poll::Ready(Ok(Copied::Done(transferred(&up, &down))));
        }
        if up.moved + down.moved != moved {
            idle.moved();
        }
        if let Some(signal) = shed.as_mut() {
            if signal.poll_told(cx) {
                up.shrink();
                down.shrink();
                if signal.closes_idle(idle.last, SHED_IDLE_TCP) {
                    return Poll::Ready(Err(CopyError {
                        side: Side::Downstream,
                        operation: Operation::Shed,
                        transferred: transferred(&up, &down),
                        source: ShedSignal::error(),
                    }));
                }
            }
        }
        match idle.poll(cx, [&mut up, &mut down]) {
            Poll::Ready(operation) => {
                let why = match operation {
                    Operation::Idle => format!(
                        "no byte either way for {:?}",
                        lifetime.idle_timeout.unwrap_or_default()
                    ),
                    _ => format!("open for {:?}", lifetime.max_duration.unwrap_or_default()),
                };
                Poll::Ready(Err(CopyError {
                    side: Side::Downstream,
                    operation,
                    transferred: transferred(&up, &down),
                    source: io::Error::new(io::ErrorKind::TimedOut, why),
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// When a copy last moved a byte, and the one timer that shrinks its buffers and ends it once
/// it idled too long or reached its maximum duration. The timer is moved only when it fires
/// early, not on every byte.
struct IdleClock {
    timeout: Option<Duration>,
    end: Option<Instant>,
    last: Instant,
    shrunk: bool,
    timer: Option<Pin<Box<Sleep>>>,
}

impl IdleClock {
    fn new(lifetime: Lifetime) -> Self {
        let now = Instant::now();
        Self {
            timeout: lifetime.idle_timeout.filter(|t| !t.is_zero()),
            end: lifetime
                .max_duration
                .filter(|t| !t.is_zero())
                .map(|t| now + t),
            last: now,
            shrunk: true,
            timer: None,
        }
    }

    fn moved(&mut self) {
        self.last = Instant::now();
        self.shrunk = false;
    }

    /// Ready with why the copy ends (idle, or expired); shrinks the pipes' buffers on the way.
    fn poll(&mut self, cx: &mut Context<'_>, mut pipes: [&mut Pipe; 2]) -> Poll<Operation> {
        loop {
            let grown = pipes.iter().any(|p| p.holds());
            let shrink_at = (!self.shrunk && grown).then(|| self.last + SHRINK_AFTER);
            let close_at = self.timeout.map(|t| self.last + t);
            let Some(due) = [shrink_at, close_at, self.end].into_iter().flatten().min() else {
                return Poll::Pending;
            };
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() > due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() < due {
                // Bytes moved since the timer was set: wait for the real deadline.
                timer.as_mut().reset(due);
                continue;
            }
            if self.end == Some(due) {
                return Poll::Ready(Operation::Expired);
            }
            if close_at == Some(due) {
                return Poll::Ready(Operation::Idle);
            }
            for pipe in &mut pipes {
                pipe.shrink();
            }
            self.shrunk = true;
        }
    }
}

/// One direction of a copy. Reads go to the worker thread's scratch buffer and on to the
/// writer at once; a pipe keeps a buffer of its own only for what the writer did not take,
/// and for as long as the connection stays busy. An idle connection holds no buffer.
struct Pipe {
    /// Bytes read and not written yet (`pos..cap`); empty when the pipe holds none.
    buf: Box<[u8]>,
    /// How much one read may take: an index into [`BUFFER_SIZES`].
    size_index: usize,
    full_reads: u32,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    total: u64,
    /// Reads and writes that moved bytes.
    moved: u64,
}

thread_local! {
    /// Where a pipe without a buffer of its own reads; one per thread, as large as the
    /// largest read.
    static SCRATCH: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; BUFFER_SIZES[BUFFER_SIZES.len() - 1]].into_boxed_slice());
}

impl fmt::Debug for Pipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe")
            .field("buffer", &self.buf.len())
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: Box::default(),
            size_index: 0,
            full_reads: 0,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            total: 0,
            moved: 0,
        }
    }

    /// Whether idling changes the pipe: it holds a buffer, or reads more than the smallest
    /// size.
    fn holds(&self) -> bool {
        self.size_index > 0 || !self.buf.is_empty()
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        grow: bool,
        reader: &mut R,
        writer: &mut W,
        mut on_write: impl FnMut(u64),
    ) -> Poll<Result<(), (Operation, io::Error)>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            // Refill only when everything read so far has been written.
            if self.pos == self.cap && !self.read_done {
                if grow {
                    self.maybe_grow();
                } else {
                    self.shrink();
                }
                let read = if self.buf.is_empty() {
                    self.poll_read_through(cx, reader, writer, &mut on_write)
                } else {
                    self.poll_read_own(cx, reader)
                };
                match read {
                    Poll::Ready(Ok(0)) => self.read_done = true,
                    Poll::Ready(Ok(n)) => {
                        self.full_reads = if n >= BUFFER_SIZES[self.size_index] {
                            self.full_reads + 1
                        } else {
                            0
                        };
                        self.moved += 1;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what was written.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))
                                .map_err(|e| (Operation::Write, e))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.cap {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.cap]))
                        .map_err(|e| (Operation::Write, e))?;
                self.pos += self.wrote(n, &mut on_write)?;
            }

            if self.pos == self.cap && self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (Operation::Write, e))?;
                self.need_flush = false;
                return match ready!(Pin::new(&mut *writer).poll_shutdown(cx)) {
                    // The peer is already gone: there is nobody left to tell.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
                    Err(e) => Poll::Ready(Err((Operation::Shutdown, e))),
                    Ok(()) => Poll::Ready(Ok(())),
                };
            }
        }
    }

    /// Reads into the thread's scratch buffer and writes what it read on at once; what the
    /// writer does not take is kept in a buffer of the pipe's own. Ready with the bytes read.
    fn poll_read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        on_write: &mut impl FnMut(u64),
    ) -> Poll<Result<usize, (Operation, io::Error)>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let limit = BUFFER_SIZES[self.size_index];
        let through = SCRATCH.try_with(|scratch| {
            // Only a reader or writer that copies on this thread could find it borrowed.
            let mut scratch = scratch.try_borrow_mut().ok()?;
            let mut buf = ReadBuf::new(&mut scratch[..limit]);
            let read = match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => buf.filled().len(),
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err((Operation::Read, e)))),
                Poll::Pending => return Some(Poll::Pending),
            };
            let mut written = 0;
            while written < read {
                match Pin::new(&mut *writer).poll_write(cx, &scratch[written..read]) {
                    Poll::Ready(Ok(n)) => match self.wrote(n, on_write) {
                        Ok(n) => written += n,
                        Err(e) => return Some(Poll::Ready(Err(e))),
                    },
                    Poll::Ready(Err(e)) => return Some(Poll::Ready(Err((Operation::Write, e)))),
                    Poll::Pending => {
                        self.keep(&scratch[written..read]);
                        break;
                    }
                }
            }
            Some(Poll::Ready(Ok(read)))
        });
        match through {
            Ok(Some(polled)) => polled,
            // The thread's scratch buffer is in use, or gone (the thread is ending).
            _ => {
                self.keep(&[]);
                self.poll_read_own(cx, reader)
            }
        }
    }

    /// Reads into the pipe's own buffer. Ready with the bytes read.
    fn poll_read_own<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<Result<usize, (Operation, io::Error)>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        let mut buf = ReadBuf::new(&mut self.buf);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut buf)).map_err(|e| (Operation::Read, e))?;
        let read = buf.filled().len();
        self.pos = 0;
        self.cap = read;
        Poll::Ready(Ok(read))
    }

    /// Takes `bytes` into a buffer of the pipe's own, at least as large as one read.
    fn keep(&mut self, bytes: &[u8]) {
        let size = BUFFER_SIZES
            .iter()
            .copied()
            .find(|&s| s >= bytes.len())
            .unwrap_or(bytes.len())
            .max(BUFFER_SIZES[self.size_index]);
        let mut buf = vec![0; size].into_boxed_slice();
        buf[..bytes.len()].copy_from_slice(bytes);
        self.buf = buf;
        self.pos = 0;
        self.cap = bytes.len();
    }

    /// Counts `n` bytes the writer took; a writer that takes none is gone.
    fn wrote(
        &mut self,
        n: usize,
        on_write: &mut impl FnMut(u64),
    ) -> Result<usize, (Operation, io::Error)> {
        if n == 0 {
            return Err((
                Operation::Write,
                io::Error::new(io::ErrorKind::WriteZero, "the peer accepts no more data"),
            ));
        }
        self.total += n as u64;
        // Draining to a slow reader is activity too (and a full buffer cannot shrink).
        self.moved += 1;
        self.need_flush = true;
        on_write(n as u64);
        Ok(n)
    }

    /// What was read and not written yet.
    fn held(&self) -> &[u8] {
        &self.buf[self.pos..self.cap]
    }

    /// Writes out what the pipe holds, and flushes; ready when nothing is left (errors count
    /// as done: the connection is past saving, and its successor will see the same error).
    fn poll_write_out<W>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
        mut on_write: impl FnMut(u64),
    ) -> Poll<()>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        while self.pos < self.cap {
            match Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.cap]) {
                Poll::Ready(Ok(n)) => match self.wrote(n, &mut on_write) {
                    Ok(n) => self.pos += n,
                    Err(_) => return Poll::Ready(()),
                },
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.need_flush {
            match Pin::new(&mut *writer).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => self.need_flush = false,
            }
        }
        Poll::Ready(())
    }

    /// Gives the buffer back and reads small again, if nothing waits for the writer.
    fn shrink(&mut self) {
        if self.holds() && self.pos == self.cap {
            self.size_index = 0;
            self.full_reads = 0;
            self.pos = 0;
            self.cap = 0;
            self.buf = Box::default();
        }
    }

    /// Reads larger after [`GROW_AFTER`] full reads in a row; a buffer of the pipe's own
    /// grows with them.
    fn maybe_grow(&mut self) {
        if self.full_reads >= GROW_AFTER && self.size_index + 1 < BUFFER_SIZES.len() {
            self.size_index += 1;
            self.full_reads = 0;
            if !self.buf.is_empty() {
                self.buf = vec![0; BUFFER_SIZES[self.size_index]].into_boxed_slice();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    #[derive(Default)]
    struct Count {
        up: AtomicU64,
        down: AtomicU64,
    }

    impl Meter for Count {
        fn to_upstream(&self, bytes: u64) {
            self.up.fetch_add(bytes, Ordering::Relaxed);
        }
        fn to_downstream(&self, bytes: u64) {
            self.down.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn copies_both_ways_byte_exact_with_half_close() {
        // client <-> (a | proxy | b) <-> server
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut b, mut server) = duplex(64 * 1024);
        let request = pattern(3 * 1024 * 1024 + 17, 1);
        let response = pattern(1024 * 1024 + 5, 7);

        let count = Count::default();
        let proxy = async { bidirectional(&mut a, &mut b, &count).await };
        let client_side = async {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let write = async {
                w.write_all(&request).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(write, read);
            n.unwrap();
            got
        };
        let server_side = async {
            // Reads the whole request first: only possible if the client's FIN came through.
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&response).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let (transferred, got_response, got_request) =
            tokio::join!(proxy, client_side, server_side);
        let transferred = transferred.unwrap();
        assert!(got_request == request, "request differs");
        assert!(got_response == response, "response differs");
        assert_eq!(transferred.to_upstream, request.len() as u64);
        assert_eq!(transferred.to_downstream, response.len() as u64);
        assert_eq!(count.up.load(Ordering::Relaxed), request.len() as u64);
        assert_eq!(count.down.load(Ordering::Relaxed), response.len() as u64);
    }

    /// Polls `pipe` once, copying from `reader` to `writer`.
    async fn poll_once(
        pipe: &mut Pipe,
        grow: bool,
        reader: &mut DuplexStream,
        writer: &mut DuplexStream,
    ) -> Poll<Result<(), (Operation, io::Error)>> {
        poll_fn(|cx| Poll::Ready(pipe.poll_copy(cx, grow, reader, writer, |_| {}))).await
    }

    #[tokio::test]
    async fn a_writer_that_keeps_up_leaves_the_pipe_without_a_buffer() {
        let (mut client, mut reader) = duplex(64 * 1024);
        let (mut writer, mut server) = duplex(64 * 1024);
        let mut pipe = Pipe::new();
        for round in 0..3u8 {
            let message = pattern(1000, round);
            client.write_all(&message).await.unwrap();
            assert!(poll_once(&mut pipe, true, &mut reader, &mut writer)
                .await
                .is_pending());
            let mut got = vec![0; message.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == message, "round {round} differs");
            assert!(!pipe.holds(), "round {round}: {pipe:?}");
        }
        assert_eq!(pipe.total, 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_writer_gets_what_it_did_not_take_later_and_the_buffer_goes_when_idle() {
        let (mut client, mut reader) = duplex(64 * 1024);
        let (mut writer, mut server) = duplex(16);
        let message = pattern(1000, 3);
        client.write_all(&message).await.unwrap();
        let mut pipe = Pipe::new();
        assert!(poll_once(&mut pipe, true, &mut reader, &mut writer)
            .await
            .is_pending());
        assert_eq!(pipe.total, 16, "the writer took what it had room for");
        assert_eq!(pipe.cap - pipe.pos, 1000 - 16, "the rest is kept");
        let copy = poll_fn(|cx| {
            let _ = pipe.poll_copy(cx, true, &mut reader, &mut writer, |_| {});
            match pipe.total {
                1000 => Poll::Ready(()),
                _ => Poll::Pending,
            }
        });
        let mut got = vec![0; message.len()];
        let (_, read) = tokio::join!(copy, server.read_exact(&mut got));
        read.unwrap();
        assert!(got == message, "the bytes differ");
        assert!(pipe.holds(), "a busy pipe keeps its buffer");
        let mut other = Pipe::new();
        let mut clock = IdleClock::new(Lifetime::default());
        clock.moved();
        let waited = tokio::time::timeout(
            SHRINK_AFTER * 2,
            poll_fn(|cx| clock.poll(cx, [&mut pipe, &mut other])),
        )
        .await;
        assert!(waited.is_err(), "no idle timeout was set");
        assert!(!pipe.holds(), "idle, the buffer is given back: {pipe:?}");
    }

    /// Paused, a copy reads nothing more, writes out what its writers take within a second and
    /// hands the rest on: what reached the server, then what is carried, then what stayed
    /// unread make the client's bytes, exactly and in order.
    #[tokio::test(start_paused = true)]
    async fn a_paused_copy_stops_between_reads_and_carries_what_its_writer_did_not_take() {
        let (mut client, mut a) = duplex(64 * 1024);
        // The server reads nothing while the copy runs: its side fills at 256 bytes.
        let (mut b, mut server) = duplex(256);
        let message = pattern(10_000, 5);
        client.write_all(&message).await.unwrap();
        let pause = tokio_util::sync::CancellationToken::new();
        let copying = tokio::spawn({
            let pause = pause.clone();
            async move {
                let copied = bidirectional_pausable(
                    &mut a,
                    &mut b,
                    &(),
                    Lifetime::default(),
                    None,
                    &pause,
                    Paused::default(),
                )
                .await;
                (copied, a)
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        pause.cancel();
        let after = pattern(500, 9);
        client.write_all(&after).await.unwrap();
        let (copied, mut a) = copying.await.unwrap();
        let Copied::Paused(paused) = copied.unwrap() else {
            panic!("the copy was not paused");
        };
        assert!(
            paused.to_downstream.is_empty(),
            "nothing came from the server"
        );
        assert!(
            !paused.to_upstream.is_empty(),
            "the server took only 256 bytes"
        );
        let mut whole = vec![0; 256];
        server.read_exact(&mut whole).await.unwrap();
        whole.extend_from_slice(&paused.to_upstream);
        let mut unread = vec![0; message.len() + after.len() - whole.len()];
        a.read_exact(&mut unread).await.unwrap();
        whole.extend_from_slice(&unread);
        let mut sent = message;
        sent.extend_from_slice(&after);
        assert!(whole == sent, "every byte is somewhere, once, in order");
    }

    #[tokio::test]
    async fn reads_grow_for_bulk_transfers() {
        let (mut source, mut reader) = duplex(1 << 20);
        let (mut writer, _sink) = duplex(4 << 20);
        source.write_all(&pattern(1 << 20, 1)).await.unwrap();
        let mut pipe = Pipe::new();
        assert!(poll_once(&mut pipe, true, &mut reader, &mut writer)
            .await
            .is_pending());
        assert_eq!(pipe.total, 1 << 20);
        assert_eq!(pipe.size_index, BUFFER_SIZES.len() - 1, "the largest reads");
        assert!(pipe.buf.is_empty(), "and no buffer: the writer kept up");
    }

    #[tokio::test]
    async fn under_memory_pressure_reads_do_not_grow_and_grown_ones_shrink() {
        let (mut source, mut reader) = duplex(1 << 20);
        let (mut writer, _sink) = duplex(1 << 20);
        source.write_all(&pattern(512 * 1024, 1)).await.unwrap();
        let mut pipe = Pipe::new();
        pipe.full_reads = GROW_AFTER;
        pipe.maybe_grow();
        pipe.keep(&[]);
        assert_eq!(pipe.buf.len(), BUFFER_SIZES[1]);
        while pipe.total < 512 * 1024 {
            assert!(poll_once(&mut pipe, false, &mut reader, &mut writer)
                .await
                .is_pending());
            tokio::task::yield_now().await;
        }
        assert!(pipe.buf.is_empty(), "the buffer is given back");
        assert_eq!(pipe.size_index, 0, "and reads did not grow again");
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_critical_level_idle_copies_are_closed_and_busy_ones_are_not() {
        use crate::{
            metrics::{OverloadClose, OverloadMetrics},
            proxy::overload::Level,
        };
        let overload = Overload::new(OverloadMetrics::default());
        let (_client, mut a) = duplex(1024);
        let (mut b, _server) = duplex(1024);
        let idle = {
            let overload = overload.clone();
            tokio::spawn(async move {
                let lifetime = Lifetime::default();
                bidirectional_with(&mut a, &mut b, &(), lifetime, Some(&overload)).await
            })
        };
        let (mut busy_client, mut c) = duplex(1024);
        let (mut d, mut busy_server) = duplex(1024);
        let busy = {
            let overload = overload.clone();
            tokio::spawn(async move {
                let lifetime = Lifetime::default();
                bidirectional_with(&mut c, &mut d, &(), lifetime, Some(&overload)).await
            })
        };
        // Pressure alone closes nothing.
        tokio::time::sleep(SHED_IDLE_TCP * 2).await;
        overload.force(Level::Pressure);
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());

        busy_client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        busy_server.read_exact(&mut got).await.unwrap();
        overload.force(Level::Critical);
        let err = idle.await.unwrap().unwrap_err();
        assert_eq!(err.operation, Operation::Shed);
        assert!(err.is_reset(), "not a proxy failure");
        assert_eq!(overload.metrics().closed_count(OverloadClose::Idle), 1);
        // The other one moved bytes within the last second: it stays, and still works.
        busy_client.write_all(b"pong").await.unwrap();
        busy_server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert!(!busy.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn grown_pipes_shrink_once_the_connection_idles() {
        let (mut up, mut down) = (Pipe::new(), Pipe::new());
        for _ in 0..2 {
            up.full_reads = GROW_AFTER;
            up.maybe_grow();
        }
        // Bytes waiting for the writer keep their buffer.
        down.full_reads = GROW_AFTER;
        down.maybe_grow();
        down.keep(&[7; 10]);
        let mut clock = IdleClock::new(Lifetime::default());
        clock.moved();
        let start = Instant::now();
        let waited = tokio::time::timeout(
            SHRINK_AFTER * 3,
            poll_fn(|cx| clock.poll(cx, [&mut up, &mut down])),
        )
        .await;
        assert!(waited.is_err(), "no idle timeout was set");
        assert!(!up.holds());
        assert_eq!(down.buf.len(), BUFFER_SIZES[1]);
        assert_eq!(down.cap - down.pos, 10);
        assert_eq!(start.elapsed(), SHRINK_AFTER * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_for_its_timeout_is_closed_and_traffic_postpones_it() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let timeout = Duration::from_secs(60);
        let copy = tokio::spawn(async move {
            let start = Instant::now();
            let lifetime = Lifetime {
                idle_timeout: Some(timeout),
                max_duration: None,
            };
            let result = bidirectional_with(&mut a, &mut b, &(), lifetime, None).await;
            (result, start.elapsed())
        });
        // A byte every 50 s keeps it open...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.unwrap();
        }
        // ...then silence: closed 60 s after the last byte.
        let (result, elapsed) = copy.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.operation, Operation::Idle);
        assert!(err.is_reset(), "an idle timeout is no proxy failure");
        assert_eq!(err.transferred.to_upstream, 3);
        assert_eq!(elapsed, Duration::from_secs(150) + timeout);
        // Both sides see the connection end.
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_at_its_maximum_duration_however_busy() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let copy = tokio::spawn(async move {
            let start = Instant::now();
            let lifetime = Lifetime {
                idle_timeout: Some(Duration::from_secs(5)),
                max_duration: Some(Duration::from_secs(12)),
            };
            let result = bidirectional_with(&mut a, &mut b, &(), lifetime, None).await;
            (result, start.elapsed())
        });
        let talk = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
                let mut byte = [0u8; 1];
                if server.read_exact(&mut byte).await.is_err() {
                    return;
                }
            }
        });
        let (result, elapsed) = copy.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.operation, Operation::Expired);
        assert!(err.is_reset());
        assert_eq!(elapsed, Duration::from_secs(12));
        talk.abort();
    }

    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn errors_name_the_side() {
        let (_client, mut a) = duplex(1024);
        let err = bidirectional(&mut a, &mut Failing, &()).await.unwrap_err();
        assert_eq!(err.side, Side::Upstream);
        assert_eq!(err.operation, Operation::Read);
        assert!(err.is_reset());
        assert!(
            err.to_string()
                .starts_with("reading from the upstream (server) connection failed"),
            "{err}"
        );
    }
}
