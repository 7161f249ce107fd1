//! I/O helpers for the relay: a client reader whose pending read survives across requests,
//! a biased two-way race, and a per-worker upstream connection pool.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::tcp::TcpOwnedReadHalf;
use monoio::net::TcpStream;
use monoio::BufResult;

type PendingRead = Pin<Box<dyn Future<Output = (TcpOwnedReadHalf, BufResult<usize, BytesMut>)>>>;

enum ReadState {
    Idle(TcpOwnedReadHalf, BytesMut),
    Pending(PendingRead),
    Broken,
}

/// The client side of a connection. Its read, once started, is kept until it completes, even
/// when the future that awaited it is dropped: so the relay can watch for the client going
/// away while it waits on the upstream, without losing bytes the client sent meanwhile.
pub struct ClientReader {
    state: ReadState,
    eof: bool,
}

impl ClientReader {
    pub fn new(half: TcpOwnedReadHalf) -> Self {
        ClientReader {
            state: ReadState::Idle(half, BytesMut::with_capacity(16 * 1024)),
            eof: false,
        }
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// The buffered bytes, when no read is in progress.
    pub fn buffer(&mut self) -> Option<&mut BytesMut> {
        match &mut self.state {
            ReadState::Idle(_, buf) => Some(buf),
            _ => None,
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        if let ReadState::Idle(..) = self.state {
            let ReadState::Idle(mut half, mut buf) =
                std::mem::replace(&mut self.state, ReadState::Broken)
            else {
                unreachable!()
            };
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            self.state = ReadState::Pending(Box::pin(async move {
                let (result, buf) = read_append(&mut half, buf).await;
                (half, (result, buf))
            }));
        }
        let ReadState::Pending(fut) = &mut self.state else {
            return Poll::Ready(Err(io::Error::other("client reader is broken")));
        };
        let (half, (result, buf)) = std::task::ready!(fut.as_mut().poll(cx));
        self.state = ReadState::Idle(half, buf);
        match result {
            Ok(0) => {
                self.eof = true;
                Poll::Ready(Ok(0))
            }
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => {
                self.eof = true;
                Poll::Ready(Err(e))
            }
        }
    }

    /// Wait for a read left running by `gone` to finish, so the buffer is available.
    /// Returns false when the client has gone away.
    pub async fn settle(&mut self) -> bool {
        if let ReadState::Pending(_) = self.state {
            if !matches!(self.fill().await, Ok(n) if n > 0) {
                return false;
            }
        }
        matches!(self.state, ReadState::Idle(..))
    }

    /// Read more into the buffer. Cancel-safe: a dropped call keeps its read for the next.
    pub async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Resolves only when the client has gone away (EOF or error). Data that arrives meanwhile
    /// is kept; the read may still be running when this is dropped (see `settle`).
    pub async fn gone(&mut self) {
        poll_fn(|cx| loop {
            // Unread bytes mean the client is there (pipelining or the rest of a body); a
            // further read could wait forever on a client waiting for us, so stop watching.
            if let ReadState::Idle(_, buf) = &self.state {
                if !buf.is_empty() && !self.eof {
                    return Poll::Pending;
                }
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => return Poll::Pending,
            }
        })
        .await
    }
}

pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Poll `a` first, then `b`; the loser is dropped.
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

/// Read into the spare capacity of `buf`, after the bytes it holds (growing it if full).
pub async fn read_more<T: AsyncReadRent>(
    io: &mut T,
    mut buf: BytesMut,
) -> BufResult<usize, BytesMut> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    read_append(io, buf).await
}

/// monoio reads into a buffer from its start; a slice past the held bytes appends instead.
async fn read_append<T: AsyncReadRent>(io: &mut T, buf: BytesMut) -> BufResult<usize, BytesMut> {
    let held = buf.len();
    let capacity = buf.capacity();
    let (result, slice) = io.read(buf.slice_mut(held..capacity)).await;
    (result, slice.into_inner())
}

pub struct IdleConn {
    stream: TcpStream,
    since: Instant,
}

/// Keep-alive connections to model servers, one pool per worker: no sharing, no locks.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<IdleConn>>>,
}

/// Idle connections kept per endpoint per worker.
const POOL_MAX_IDLE: usize = 512;

impl Pool {
    /// The most recently used connection idle for less than `max_idle`. With `verify`, one
    /// the server has already closed is skipped (a syscall each): for requests that could not
    /// be replayed on a fresh connection if the pooled one turned out stale.
    pub fn take(&self, addr: SocketAddr, max_idle: Duration, verify: bool) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < max_idle && !(verify && peer_closed(&conn.stream)) {
                return Some(conn.stream);
            }
        }
        None
    }

    pub fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < POOL_MAX_IDLE {
            list.push(IdleConn {
                stream,
                since: Instant::now(),
            });
        }
    }
}

/// A cheap check for a connection the server already closed: a non-blocking peek.
fn peer_closed(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a valid fd and a one-byte buffer we own; MSG_PEEK leaves the data in place.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    // 0: orderly close; >0: unexpected bytes (not reusable); -1 EAGAIN: alive.
    n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}
