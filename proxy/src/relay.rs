//! Both directions of one connection: splice where it can, a copy loop where it cannot.

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::splice::{poll_splice, SpliceError, SpliceState};
use crate::stats::PortCounters;

/// Copy-loop buffer per direction; allocated only while bytes flow, so idle connections cost none.
const COPY_CHUNK: usize = 64 * 1024;

/// One direction of a connection.
enum Direction {
    Splice(SpliceState),
    Copy(CopyState),
    Done,
}

impl Direction {
    fn new(splice: bool) -> Self {
        if splice {
            Direction::Splice(SpliceState::default())
        } else {
            Direction::Copy(CopyState::default())
        }
    }
}

#[derive(Default)]
struct CopyState {
    buf: Vec<u8>,
    written: usize,
    eof: bool,
}

/// Moves bytes both ways until both directions have seen EOF (each EOF is passed on as a
/// `shutdown(Write)` of the other socket), or until an error on either side.
pub(crate) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    splice: bool,
    counters: &PortCounters,
    last_activity: &Cell<Instant>,
) -> io::Result<()> {
    let mut up = Direction::new(splice);
    let mut down = Direction::new(splice);
    let count_in = |n: usize| {
        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    let count_out = |n: usize| {
        counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.set(Instant::now());
    };
    poll_fn(|cx| {
        let up_done = poll_direction(&mut up, cx, client, upstream, &count_in)?;
        let down_done = poll_direction(&mut down, cx, upstream, client, &count_out)?;
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Drives one direction as far as it goes without blocking; `Ok(true)` once it is finished.
fn poll_direction(
    dir: &mut Direction,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> io::Result<bool> {
    loop {
        let r = match dir {
            Direction::Splice(st) => match poll_splice(st, cx, src, dst, count) {
                Poll::Ready(Err(SpliceError::NoPipe(e))) => {
                    // Out of descriptors or pipe pages: this direction still works, by copying.
                    tracing::debug!(error = %e, "no pipe for splice; copying instead");
                    *dir = Direction::Copy(CopyState {
                        buf: std::mem::take(&mut st.buf),
                        written: st.written,
                        eof: st.eof,
                    });
                    continue;
                }
                Poll::Ready(Err(SpliceError::Io(e))) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
            Direction::Copy(st) => poll_copy(st, cx, src, dst, count),
            Direction::Done => return Ok(true),
        };
        match r {
            Poll::Pending => return Ok(false),
            Poll::Ready(Ok(())) => *dir = Direction::Done,
            Poll::Ready(Err(e)) => return Err(e),
        }
    }
}

/// Once `dst` is writable, one write of `buf[*written..]`, counted. A write that would block is
/// no error: the caller loops and waits for writability again.
pub(crate) fn poll_write_some(
    buf: &[u8],
    written: &mut usize,
    cx: &mut std::task::Context<'_>,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    ready!(dst.poll_write_ready(cx))?;
    match dst.try_write(&buf[*written..]) {
        Ok(0) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        Ok(n) => {
            *written += n;
            count(n);
            Poll::Ready(Ok(()))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// The copy loop: read up to 64 KiB, write it all, repeat; on EOF shut down the writer.
fn poll_copy(
    st: &mut CopyState,
    cx: &mut std::task::Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    count: &dyn Fn(usize),
) -> Poll<io::Result<()>> {
    loop {
        if st.written < st.buf.len() {
            ready!(poll_write_some(&st.buf, &mut st.written, cx, dst, count))?;
            continue;
        }
        if st.eof {
            ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
            return Poll::Ready(Ok(()));
        }
        st.buf.clear();
        st.written = 0;
        if src.poll_read_ready(cx).is_pending() {
            // Give the buffer back while the source is quiet: 10 000 idle connections must not
            // hold 1.25 GiB of buffers.
            st.buf = Vec::new();
            return Poll::Pending;
        }
        if st.buf.capacity() == 0 {
            st.buf.reserve_exact(COPY_CHUNK);
        }
        // Through tokio's poll_read, which marks the socket drained after a short read: no
        // further read that fails with EAGAIN just to learn it.
        match tokio_util::io::poll_read_buf(Pin::new(&mut *src), cx, &mut st.buf) {
            Poll::Ready(Ok(0)) => st.eof = true,
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                st.buf = Vec::new();
                return Poll::Pending;
            }
        }
    }
}
