//! Chunk buffers for the migrate data path, recycled instead of allocated per chunk.
//!
//! A fresh 1 MiB `Vec` per chunk is an `mmap`, 256 page faults, zeroing and a `munmap` each
//! time (glibc maps allocations this large directly): on a 2-core machine that CPU comes out of
//! the bytes moved per second. A [`Chunk`] goes back to its [`Pool`] when dropped, on whichever
//! thread last held it.
//!
//! Each buffer's data starts on a [`ALIGN`] boundary, so a chunk can be written with `O_DIRECT`,
//! and has [`HEAD`] bytes of room before it, so a frame header and its payload leave in one write.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Alignment of a chunk's data in memory (what `O_DIRECT` asks of buffers, offsets and lengths).
pub const ALIGN: usize = 4096;
/// Room reserved before the data for a frame header.
pub const HEAD: usize = 64;

/// Free buffers of one capacity.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    cap: usize,
    keep: usize,
}

impl Pool {
    /// A pool of buffers holding up to `cap` bytes of data; at most `keep` idle ones are kept.
    pub fn new(cap: usize, keep: usize) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::new(Vec::new()),
            cap,
            keep,
        })
    }

    /// A buffer of `len` data bytes (`len <= cap`), recycled when one is free. Its content is
    /// whatever the last user left: callers overwrite all `len` bytes.
    pub fn get(self: &Arc<Self>, len: usize) -> Chunk {
        assert!(
            len <= self.cap,
            "chunk of {len} bytes from a pool of {}",
            self.cap
        );
        let v = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; self.cap + HEAD + 2 * ALIGN]);
        // The address decides the offset; a Vec never moves while it is not resized.
        let misalign = (v.as_ptr() as usize + HEAD) % ALIGN;
        let start = HEAD + (ALIGN - misalign) % ALIGN;
        Chunk {
            v,
            start,
            len,
            head: 0,
            pool: self.clone(),
        }
    }
}

/// One chunk's data; derefs to exactly its `len` bytes.
pub struct Chunk {
    v: Vec<u8>,
    start: usize,
    len: usize,
    /// Bytes of head set before the data.
    head: usize,
    pool: Arc<Pool>,
}

impl Chunk {
    /// Puts `head` (at most [`HEAD`] bytes) right before the data, for [`Chunk::frame`].
    pub fn set_head(&mut self, head: &[u8]) {
        self.head = head.len();
        self.v[self.start - head.len()..self.start].copy_from_slice(head);
    }

    /// The head and the data, contiguous: one frame, one write.
    pub fn frame(&self) -> &[u8] {
        &self.v[self.start - self.head..self.start + self.len]
    }

    /// Whether the data's address is [`ALIGN`]ed (always, unless the allocator misbehaves).
    pub fn is_aligned(&self) -> bool {
        (self.as_ptr() as usize).is_multiple_of(ALIGN)
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

impl DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_framed_and_reused() {
        let pool = Pool::new(1 << 20, 2);
        let mut a = pool.get(10_000);
        assert!(a.is_aligned());
        assert_eq!(a.len(), 10_000);
        a.fill(7);
        a.set_head(b"hdr");
        let f = a.frame().to_vec();
        assert_eq!(&f[..3], b"hdr");
        assert_eq!(f.len(), 10_003);
        assert!(f[3..].iter().all(|&b| b == 7));
        let addr = a.as_ptr() as usize;
        drop(a);
        // The same memory comes back, sized to the new request.
        let b = pool.get(4096);
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(b.len(), 4096);
        // Beyond `keep`, idle buffers are freed.
        let (c, d, e) = (pool.get(1), pool.get(1), pool.get(1));
        drop((b, c, d, e));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }
}
