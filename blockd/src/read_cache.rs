//! A write-through read cache of 4 KiB pages for a volume read over the network.
//!
//! When the coordinator holds no in-sync replica itself, every read would cross gRPC;
//! this LRU keeps recently read and written pages so repeat reads (filesystem metadata,
//! hot blocks) are served from memory. It is write-through: a successful write updates
//! the pages it covers (and adds the ones it covers whole), a failed write or a discard
//! drops them, always under the coordinator's region locks, so a page in the cache is
//! never older than the replicas. Memory is bounded by the page count, not by the volume.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

/// Cache page size.
pub const PAGE: u64 = 4096;

/// See the module doc.
pub struct ReadCache {
    pages: Mutex<LruCache<u64, Box<[u8]>>>,
}

impl ReadCache {
    /// A cache of at most `bytes` (rounded down to pages, at least one page).
    pub fn new(bytes: u64) -> Self {
        let n = NonZeroUsize::new((bytes / PAGE).max(1) as usize).expect("at least one page");
        Self {
            pages: Mutex::new(LruCache::new(n)),
        }
    }

    fn pages_of(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / PAGE..(offset + len - 1) / PAGE + 1
    }

    /// The bytes of `[offset, offset + len)` if every page of it is cached.
    pub fn get(&self, offset: u64, len: u32) -> Option<Vec<u8>> {
        let mut pages = self.pages.lock().expect("cache lock");
        let mut out = Vec::with_capacity(len as usize);
        let end = offset + len as u64;
        for p in Self::pages_of(offset, len as u64) {
            let page = pages.get(&p)?;
            let start = (p * PAGE).max(offset);
            let stop = ((p + 1) * PAGE).min(end);
            out.extend_from_slice(&page[(start - p * PAGE) as usize..(stop - p * PAGE) as usize]);
        }
        Some(out)
    }

    /// Records bytes known to be on the replicas at `offset` (a read or a write that
    /// succeeded): pages it covers whole are stored, cached pages it touches are updated.
    pub fn put(&self, offset: u64, data: &[u8]) {
        let mut pages = self.pages.lock().expect("cache lock");
        let end = offset + data.len() as u64;
        for p in Self::pages_of(offset, data.len() as u64) {
            let (pstart, pend) = (p * PAGE, (p + 1) * PAGE);
            let (start, stop) = (pstart.max(offset), pend.min(end));
            let src = &data[(start - offset) as usize..(stop - offset) as usize];
            if start == pstart && stop == pend {
                pages.put(p, src.to_vec().into_boxed_slice());
            } else if let Some(page) = pages.peek_mut(&p) {
                page[(start - pstart) as usize..(stop - pstart) as usize].copy_from_slice(src);
            }
        }
    }

    /// Forgets every page touching `[offset, offset + len)`.
    pub fn invalidate(&self, offset: u64, len: u64) {
        let mut pages = self.pages.lock().expect("cache lock");
        for p in Self::pages_of(offset, len) {
            pages.pop(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_only_complete_ranges_and_stays_current() {
        let c = ReadCache::new(4 * PAGE);
        assert!(c.get(0, 10).is_none());
        c.put(0, &[1u8; 8192]);
        assert_eq!(c.get(100, 10).unwrap(), vec![1u8; 10]);
        assert_eq!(c.get(4000, 200).unwrap(), vec![1u8; 200]);
        assert!(c.get(8000, 400).is_none(), "page 2 was never cached");
        // A partial write updates a cached page in place.
        c.put(4094, &[7, 7, 7, 7]);
        assert_eq!(c.get(4092, 8).unwrap(), vec![1, 1, 7, 7, 7, 7, 1, 1]);
        // A partial write to an uncached page adds nothing.
        c.put(3 * PAGE + 5, &[9]);
        assert!(c.get(3 * PAGE, 1).is_none());
        c.invalidate(4095, 2);
        assert!(c.get(0, 1).is_none() && c.get(PAGE, 1).is_none());
    }

    #[test]
    fn is_bounded() {
        let c = ReadCache::new(2 * PAGE);
        c.put(0, &[1u8; 4 * PAGE as usize]);
        assert!(c.get(0, 1).is_none(), "oldest pages evicted");
        assert!(c.get(3 * PAGE, 1).is_some());
    }
}
