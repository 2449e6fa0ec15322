//! The coordinator's one lock table for a shared volume: POSIX byte-range locks (and
//! `flock`, which arrives as a whole-file lock) from every mount, and the queue of
//! blocked waiters. Pure state: no I/O, no clock; the namespace service drives it.
//!
//! Semantics follow `fcntl(2)`: an owner's locks never conflict with each other; a new
//! lock replaces the owner's own locks on its range (splitting them), unlock splits
//! too; read locks of different owners share, a write lock excludes. Waiters are
//! granted in arrival order: a waiter is skipped only while it conflicts with a held
//! lock or with an earlier waiter, so a stream of readers cannot starve a writer.

use std::collections::{HashMap, HashSet, VecDeque};

/// Who holds a lock: a mount's session and the kernel's lock owner inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub session: u64,
    pub owner: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    Write,
}

/// A held lock; `end` is inclusive (`u64::MAX`: to the end of the file, and beyond).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub owner: Owner,
    pub mode: Mode,
    pub start: u64,
    pub end: u64,
    /// The pid the requester gave (reported by F_GETLK; meaningful on its host only).
    pub pid: u32,
    /// The open (the mount's file handle) the lock was last taken through; 0: unknown.
    /// A flock'd file's close releases only what was taken through it.
    pub fh: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    id: u64,
    ino: u64,
    lock: Held,
}

fn overlaps(a: &Held, start: u64, end: u64) -> bool {
    a.start <= end && start <= a.end
}

fn conflicts(a: &Held, b: &Held) -> bool {
    a.owner != b.owner
        && overlaps(a, b.start, b.end)
        && (a.mode == Mode::Write || b.mode == Mode::Write)
}

#[derive(Debug, Default)]
pub struct LockTable {
    held: HashMap<u64, Vec<Held>>,
    waiters: VecDeque<Waiter>,
    /// Waiters whose lock was applied since they last looked.
    granted: HashSet<u64>,
}

impl LockTable {
    /// The first lock of another owner that `want` conflicts with (F_GETLK).
    pub fn test(&self, ino: u64, want: &Held) -> Option<Held> {
        self.held
            .get(&ino)?
            .iter()
            .find(|h| conflicts(h, want))
            .copied()
    }

    /// Takes `want` if nothing conflicts (F_SETLK); Err carries the conflicting lock.
    pub fn try_lock(&mut self, ino: u64, want: Held) -> Result<(), Held> {
        if let Some(c) = self.test(ino, &want) {
            return Err(c);
        }
        self.apply(ino, Some(want.mode), want);
        Ok(())
    }

    /// Sets `want` whatever else is held (a mount's copy of what its coordinator granted:
    /// its notes may arrive out of order, and the coordinator has decided already).
    pub fn force(&mut self, ino: u64, want: Held) {
        self.apply(ino, Some(want.mode), want);
    }

    /// Releases `owner`'s locks on `[start, end]`, then grants waiters that can go.
    /// Returns the waiters granted.
    pub fn unlock(&mut self, ino: u64, owner: Owner, start: u64, end: u64) -> Vec<u64> {
        let range = Held {
            owner,
            mode: Mode::Read,
            start,
            end,
            pid: 0,
            fh: 0,
        };
        self.apply(ino, None, range);
        self.grant()
    }

    /// Drops the locks and waiters of `owner` on `ino` taken through the open `fh` (the
    /// close of a flock'd file), then grants waiters that can go. Locks the same owner id
    /// took through a newer open stay: the kernel reuses a closed file's owner id.
    pub fn release_open(&mut self, ino: u64, owner: Owner, fh: u64) -> Vec<u64> {
        if let Some(v) = self.held.get_mut(&ino) {
            v.retain(|h| !(h.owner == owner && h.fh == fh));
            if v.is_empty() {
                self.held.remove(&ino);
            }
        }
        self.waiters
            .retain(|w| !(w.ino == ino && w.lock.owner == owner && w.lock.fh == fh));
        self.grant()
    }

    /// Drops every lock and waiter of `owner` on `ino` (close, flock release).
    pub fn release_owner(&mut self, ino: u64, owner: Owner) -> Vec<u64> {
        if let Some(v) = self.held.get_mut(&ino) {
            v.retain(|h| h.owner != owner);
        }
        self.waiters
            .retain(|w| !(w.ino == ino && w.lock.owner == owner));
        self.grant()
    }

    /// Drops everything a session held or waited for (its lease ran out).
    pub fn release_session(&mut self, session: u64) -> Vec<u64> {
        for v in self.held.values_mut() {
            v.retain(|h| h.owner.session != session);
        }
        self.held.retain(|_, v| !v.is_empty());
        self.waiters.retain(|w| w.lock.owner.session != session);
        self.grant()
    }

    /// Queues a blocked F_SETLKW as waiter `id` (if not queued already).
    pub fn enqueue(&mut self, id: u64, ino: u64, want: Held) {
        if !self.waiters.iter().any(|w| w.id == id) {
            self.waiters.push_back(Waiter {
                id,
                ino,
                lock: want,
            });
        }
    }

    /// Removes waiter `id` (it gave up); returns whether it had been granted meanwhile.
    pub fn dequeue(&mut self, id: u64) -> bool {
        self.waiters.retain(|w| w.id != id);
        self.granted.remove(&id)
    }

    /// Whether waiter `id` got its lock (consumes the grant).
    pub fn take_grant(&mut self, id: u64) -> bool {
        self.granted.remove(&id)
    }

    /// Locks held on `ino`, for inspection.
    pub fn held(&self, ino: u64) -> Vec<Held> {
        self.held.get(&ino).cloned().unwrap_or_default()
    }

    /// Every held lock with its inode, in no particular order (a mount's reclaim).
    pub fn all(&self) -> Vec<(u64, Held)> {
        self.held
            .iter()
            .flat_map(|(ino, v)| v.iter().map(move |h| (*ino, *h)))
            .collect()
    }

    /// Whether no lock is held at all (waiters do not count).
    pub fn is_empty(&self) -> bool {
        self.held.values().all(|v| v.is_empty())
    }

    /// Locks held by a session, over all files.
    pub fn count_session(&self, session: u64) -> usize {
        self.held
            .values()
            .flatten()
            .filter(|h| h.owner.session == session)
            .count()
    }

    /// Sets `owner`'s coverage of `[start, end]` to `mode` (None: unlocked), splitting
    /// and merging the owner's own ranges.
    fn apply(&mut self, ino: u64, mode: Option<Mode>, want: Held) {
        let Held {
            owner,
            start,
            end,
            pid,
            fh,
            ..
        } = want;
        let list = self.held.entry(ino).or_default();
        let mut out = Vec::with_capacity(list.len() + 2);
        for h in list.drain(..) {
            if h.owner != owner || !overlaps(&h, start, end) {
                out.push(h);
                continue;
            }
            // Keep the parts of the owner's old lock outside the new range.
            if h.start < start {
                out.push(Held {
                    end: start - 1,
                    ..h
                });
            }
            if h.end > end {
                out.push(Held {
                    start: end + 1,
                    ..h
                });
            }
        }
        if let Some(mode) = mode {
            let mut new = Held {
                owner,
                mode,
                start,
                end,
                pid,
                fh,
            };
            // Merge with the owner's adjacent locks of the same mode (and open).
            out.retain(|h| {
                let adjacent = h.owner == owner
                    && h.fh == fh
                    && h.mode == mode
                    && (h.end.checked_add(1) == Some(new.start)
                        || new.end.checked_add(1) == Some(h.start));
                if adjacent {
                    new.start = new.start.min(h.start);
                    new.end = new.end.max(h.end);
                }
                !adjacent
            });
            out.push(new);
        }
        if out.is_empty() {
            self.held.remove(&ino);
        } else {
            *list = out;
            list.sort_by_key(|h| (h.start, h.end));
        }
    }

    /// Applies every waiter that conflicts neither with a held lock nor with an earlier
    /// waiter, in order.
    fn grant(&mut self) -> Vec<u64> {
        let mut granted = Vec::new();
        let mut blocked: Vec<Waiter> = Vec::new();
        let queue = std::mem::take(&mut self.waiters);
        for w in queue {
            let behind = blocked
                .iter()
                .any(|b| b.ino == w.ino && conflicts(&b.lock, &w.lock));
            if !behind && self.test(w.ino, &w.lock).is_none() {
                self.apply(w.ino, Some(w.lock.mode), w.lock);
                self.granted.insert(w.id);
                granted.push(w.id);
            } else {
                blocked.push(w);
            }
        }
        self.waiters = blocked.into();
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(session: u64, owner: u64) -> Owner {
        Owner { session, owner }
    }

    fn lock(owner: Owner, mode: Mode, start: u64, end: u64) -> Held {
        Held {
            owner,
            mode,
            start,
            end,
            pid: 1,
            fh: 0,
        }
    }

    #[test]
    fn a_late_close_releases_only_what_was_taken_through_its_own_open() {
        // The kernel names a flock owner after the open file; a closed file's id comes
        // back for the next open, and the old close reaches the coordinator late.
        let mut t = LockTable::default();
        let x = o(1, 77);
        let other = lock(o(2, 9), Mode::Write, 0, 10);
        t.try_lock(
            5,
            Held {
                fh: 1,
                ..lock(x, Mode::Write, 0, u64::MAX)
            },
        )
        .unwrap();
        t.try_lock(
            5,
            Held {
                fh: 2,
                ..lock(x, Mode::Write, 0, u64::MAX)
            },
        )
        .unwrap();
        t.release_open(5, x, 1);
        assert!(
            t.test(5, &other).is_some(),
            "the newer open's lock went with the old close"
        );
        t.release_open(5, x, 2);
        assert!(t.test(5, &other).is_none());
        assert!(t.held(5).is_empty());
    }

    #[test]
    fn readers_share_writers_exclude_and_owners_never_conflict_with_themselves() {
        let mut t = LockTable::default();
        let (a, b) = (o(1, 1), o(2, 1));
        t.try_lock(7, lock(a, Mode::Read, 0, 99)).unwrap();
        t.try_lock(7, lock(b, Mode::Read, 50, 150)).unwrap();
        let c = t.try_lock(7, lock(b, Mode::Write, 0, 10)).unwrap_err();
        assert_eq!(c.owner, a);
        // Upgrading its own read lock where nobody else reads works.
        t.try_lock(7, lock(a, Mode::Write, 0, 49)).unwrap();
        assert!(t.test(7, &lock(b, Mode::Read, 0, 0)).is_some());
        // Same session, other owner (another process on that host) conflicts too.
        assert!(t.try_lock(7, lock(o(1, 2), Mode::Read, 10, 10)).is_err());
        // Another file is independent.
        t.try_lock(8, lock(b, Mode::Write, 0, u64::MAX)).unwrap();
    }

    #[test]
    fn unlock_splits_and_relock_merges() {
        let mut t = LockTable::default();
        let a = o(1, 1);
        t.try_lock(1, lock(a, Mode::Write, 0, 99)).unwrap();
        t.unlock(1, a, 40, 59);
        let h = t.held(1);
        assert_eq!(
            h.iter().map(|h| (h.start, h.end)).collect::<Vec<_>>(),
            vec![(0, 39), (60, 99)]
        );
        t.try_lock(1, lock(o(2, 1), Mode::Write, 40, 59)).unwrap();
        t.unlock(1, o(2, 1), 0, u64::MAX);
        t.try_lock(1, lock(a, Mode::Write, 40, 59)).unwrap();
        assert_eq!(t.held(1).len(), 1, "merged back into one range");
        // A read lock in the middle of a write lock splits it into three.
        t.try_lock(1, lock(a, Mode::Read, 10, 19)).unwrap();
        assert_eq!(t.held(1).len(), 3);
        t.unlock(1, a, 0, u64::MAX);
        assert!(t.held(1).is_empty());
    }

    #[test]
    fn waiters_are_granted_in_order_and_readers_do_not_starve_a_writer() {
        let mut t = LockTable::default();
        let (a, b, c, d) = (o(1, 1), o(2, 1), o(3, 1), o(4, 1));
        t.try_lock(1, lock(a, Mode::Read, 0, u64::MAX)).unwrap();
        // A writer waits; a reader arriving after it must wait behind it.
        assert!(t.try_lock(1, lock(b, Mode::Write, 0, u64::MAX)).is_err());
        t.enqueue(10, 1, lock(b, Mode::Write, 0, u64::MAX));
        t.enqueue(11, 1, lock(c, Mode::Read, 0, u64::MAX));
        t.enqueue(12, 1, lock(d, Mode::Read, 0, u64::MAX));
        assert!(t.grant().is_empty());
        assert_eq!(t.unlock(1, a, 0, u64::MAX), vec![10]);
        assert!(t.take_grant(10));
        assert!(!t.take_grant(11));
        // The writer lets go: both readers get in together.
        assert_eq!(t.unlock(1, b, 0, u64::MAX), vec![11, 12]);
    }

    #[test]
    fn a_dead_session_frees_its_locks_and_wakes_the_next() {
        let mut t = LockTable::default();
        let (a, b) = (o(1, 1), o(2, 9));
        t.try_lock(5, lock(a, Mode::Write, 0, u64::MAX)).unwrap();
        t.try_lock(6, lock(a, Mode::Write, 0, 0)).unwrap();
        t.enqueue(1, 5, lock(b, Mode::Write, 0, 10));
        assert_eq!(t.count_session(1), 2);
        assert_eq!(t.release_session(1), vec![1]);
        assert_eq!(t.count_session(1), 0);
        assert_eq!(t.held(5)[0].owner, b);
        // A waiter that gives up after being granted learns it holds the lock.
        t.enqueue(2, 5, lock(a, Mode::Read, 0, 0));
        assert!(!t.dequeue(2));
        t.release_owner(5, b);
        assert!(t.held(5).is_empty());
    }
}
