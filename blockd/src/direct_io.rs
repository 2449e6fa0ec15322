//! Big replica writes around the page cache (`O_DIRECT`).
//!
//! Every replica of a volume on a host lands in that host's page cache before its disk:
//! with two replicas on one machine, a sequential write was copied into the page cache
//! twice and then flushed twice at the next fsync (a profile of a repl-2 sequential
//! write had the kernel's page-cache copy at half of the busy CPU). Large aligned writes
//! (ext4 writeback, big file writes on shared volumes, resync copies) therefore go straight to the disk, from an aligned
//! buffer, so the disk works while the writer writes. Small writes (a namespace journal
//! record, a database page) stay buffered: their latency matters more, and the flush
//! that follows them is cheap. Linux keeps the two coherent (a direct write first writes
//! back and drops cached pages it overlaps).

use std::alloc::{alloc, dealloc, Layout};
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Alignment of offsets, lengths and buffers (the page size; every block size divides it).
const ALIGN: usize = 4096;
/// Writes at least this long go direct.
pub const DIRECT_MIN: usize = 128 << 10;
/// The largest piece copied into the per-thread buffer at once (a thread that writes
/// direct keeps one such buffer).
const CHUNK: usize = 1 << 20;

/// Whether a write of `len` bytes at `offset` goes direct.
pub fn suits(offset: u64, len: usize) -> bool {
    len >= DIRECT_MIN && offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// A page-aligned buffer of `CHUNK` bytes.
struct Aligned(*mut u8);

impl Aligned {
    fn layout() -> Layout {
        Layout::from_size_align(CHUNK, ALIGN).expect("constant layout")
    }
    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc(Self::layout()) };
        assert!(!p.is_null(), "out of memory for a direct-I/O buffer");
        Aligned(p)
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `0` points to CHUNK bytes owned by self; len <= CHUNK (checked by callers).
        unsafe { std::slice::from_raw_parts_mut(self.0, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.0, Self::layout()) }
    }
}

thread_local! {
    static BUF: RefCell<Option<Aligned>> = const { RefCell::new(None) };
}

/// Writes `data` at `offset` through `direct` (a file opened with O_DIRECT); `suits`
/// must hold.
pub fn write_at(direct: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    // Allocate first: ext4 serializes direct writes that allocate blocks (holding the
    // file's lock until the disk answers), while direct writes into allocated (or
    // unwritten, preallocated) blocks of one file run side by side. A thin replica
    // allocates exactly what it writes either way.
    // SAFETY: fallocate on our own descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            direct.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            data.len() as libc::off_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // Not every filesystem preallocates; the write allocates then.
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    BUF.with(|cell| {
        let mut cell = cell.borrow_mut();
        let buf = cell.get_or_insert_with(Aligned::new);
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(CHUNK);
            let b = buf.slice(n);
            b.copy_from_slice(&data[done..done + n]);
            direct.write_all_at(b, offset + done as u64)?;
            done += n;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_big_aligned_writes_go_direct() {
        assert!(suits(0, DIRECT_MIN));
        assert!(suits(8192, 1 << 20));
        assert!(!suits(512, 1 << 20), "unaligned offset");
        assert!(!suits(0, DIRECT_MIN + 512), "unaligned length");
        assert!(!suits(0, 4096), "small writes stay buffered");
    }
}
