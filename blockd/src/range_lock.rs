//! Byte-range locks for the coordinator: writes (and resync copies, and remote reads
//! that fill the cache) that overlap are ordered, one after the other, the same way on
//! every replica; writes that do not overlap go out in parallel.
//!
//! Why byte ranges and not fixed regions: ext4 on a loop device writes back in large
//! requests that rarely start on a region boundary, so neighbouring requests share a
//! region. Locking whole regions chained them into one request in flight at a time.

use std::sync::{Condvar, Mutex};

/// Held ranges, as half-open `[start, end)` byte intervals, and the waiters in arrival
/// order. Few are held at once (one per request in flight), so lists are enough.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<(u64, u64)>,
    /// (ticket, range) of those waiting. A range waits for earlier waiters it overlaps
    /// too, so a wide range (a resync copy of a region) is not starved by a stream of
    /// small writes that each fit beside the others.
    waiting: Vec<(u64, (u64, u64))>,
    next_ticket: u64,
}

/// Releases its range when dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, start + len)`, then holds it. An
    /// empty range is held at once and excludes nothing.
    pub fn lock(&self, start: u64, len: u64) -> RangeGuard<'_> {
        let range = (start, start.saturating_add(len));
        if len == 0 {
            return RangeGuard { lock: self, range };
        }
        let mut st = self.state.lock().expect("range lock");
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.waiting.push((ticket, range));
        let blocked = |st: &State| {
            st.held.iter().any(|h| overlaps(*h, range))
                || st
                    .waiting
                    .iter()
                    .any(|(t, w)| *t < ticket && overlaps(*w, range))
        };
        while blocked(&st) {
            st = self.freed.wait(st).expect("range lock");
        }
        st.waiting.retain(|(t, _)| *t != ticket);
        st.held.push(range);
        RangeGuard { lock: self, range }
    }

    /// Ranges held now (for tests).
    pub fn held(&self) -> usize {
        self.state.lock().expect("range lock").held.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if self.range.0 == self.range.1 {
            return;
        }
        let mut st = self.lock.state.lock().expect("range lock");
        if let Some(i) = st.held.iter().position(|h| *h == self.range) {
            st.held.swap_remove(i);
        }
        drop(st);
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn disjoint_ranges_are_held_together() {
        let l = RangeLock::default();
        let a = l.lock(0, 4096);
        let b = l.lock(4096, 4096);
        let c = l.lock(1 << 20, 1 << 20);
        assert_eq!(l.held(), 3);
        drop((a, b, c));
        assert_eq!(l.held(), 0);
        // Empty ranges exclude nothing and hold nothing.
        let _e = l.lock(10, 0);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn an_overlapping_range_waits_for_the_holder() {
        let l = Arc::new(RangeLock::default());
        let first = l.lock(1000, 5000);
        let entered = Arc::new(AtomicBool::new(false));
        let (l2, e2) = (l.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _g = l2.lock(5999, 1);
            e2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !entered.load(Ordering::SeqCst),
            "overlap entered while held"
        );
        drop(first);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_wide_range_is_not_starved_by_narrow_ones_beside_each_other() {
        let l = Arc::new(RangeLock::default());
        let first = l.lock(0, 4096);
        let entered = Arc::new(AtomicBool::new(false));
        let (l2, e2) = (l.clone(), entered.clone());
        // A whole-region copy waits for the write in flight...
        let wide = std::thread::spawn(move || {
            let _g = l2.lock(0, 1 << 20);
            e2.store(true, Ordering::SeqCst);
        });
        while l.state.lock().unwrap().waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // ...and a later write beside the first, inside its range, waits behind it
        // instead of slipping in (which could go on for ever under steady writes).
        let (l3, e3) = (l.clone(), entered.clone());
        let narrow = std::thread::spawn(move || {
            let _g = l3.lock(8192, 4096);
            assert!(
                e3.load(Ordering::SeqCst),
                "the narrow write overtook the wide one"
            );
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        wide.join().unwrap();
        narrow.join().unwrap();
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn identical_ranges_take_turns() {
        let l = Arc::new(RangeLock::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = l.lock(0, 8192);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.held(), 0);
    }
}
