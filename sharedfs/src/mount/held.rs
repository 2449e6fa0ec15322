//! The mount's copy of the locks it holds at the coordinator, and what it asks a new
//! session for after a failover. Pure state with the time passed in: the session code
//! (`session.rs`) sends the reclaims and reports their answers.

use std::time::Duration;

use shoal_proto::ns::Lk;

use crate::coordinator::locks::{Held, LockTable, Mode, Owner};

/// See the module doc. Owners are the kernel's lock owners (the session is not part of
/// them here: one mount, whatever its session).
#[derive(Default)]
pub struct HeldLocks(LockTable);

/// What to do with the held locks at a new session.
#[derive(Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// Ask for each of these (marked as reclaims, granted during the grace period).
    Ask(Vec<Lk>),
    /// Cut off longer than the session lease: the coordinator may have expired the old
    /// session and given the locks to another mount, so reclaiming could take them from
    /// their holder. They are forgotten (this many).
    Lost(usize),
}

fn owner(o: u64) -> Owner {
    Owner {
        session: 0,
        owner: o,
    }
}

impl HeldLocks {
    /// A lock change the coordinator accepted (`l` as sent): a grant is recorded whatever
    /// the copy still shows (another owner's unlock may be noted after this grant), an
    /// unlock removes the range.
    pub fn granted(&mut self, l: &Lk) {
        let mode = match l.typ {
            libc::F_RDLCK => Mode::Read,
            libc::F_WRLCK => Mode::Write,
            _ => {
                self.0.unlock(l.ino, owner(l.owner), l.start, l.end);
                return;
            }
        };
        self.0.force(
            l.ino,
            Held {
                owner: owner(l.owner),
                mode,
                start: l.start,
                end: l.end,
                pid: l.pid,
                fh: l.fh,
            },
        );
    }

    /// An owner's locks on a file released: all of them (a close), or those taken
    /// through one open (`fh`, a flock'd file's close).
    pub fn released(&mut self, ino: u64, o: u64, fh: Option<u64>) {
        match fh {
            Some(fh) => self.0.release_open(ino, owner(o), fh),
            None => self.0.unlock(ino, owner(o), 0, u64::MAX),
        };
    }

    /// What to ask a new session for, the mount having been silent for `silent` (since
    /// its last renewal) with a session lease of `lease`.
    pub fn reclaim(&mut self, silent: Duration, lease: Duration) -> Reclaim {
        let held = self.0.all();
        if silent >= lease {
            *self = HeldLocks::default();
            return Reclaim::Lost(held.len());
        }
        Reclaim::Ask(
            held.into_iter()
                .map(|(ino, h)| Lk {
                    ino,
                    owner: h.owner.owner,
                    start: h.start,
                    end: h.end,
                    typ: match h.mode {
                        Mode::Read => libc::F_RDLCK,
                        Mode::Write => libc::F_WRLCK,
                    },
                    pid: h.pid,
                    wait: false,
                    fh: h.fh,
                    reclaim: true,
                })
                .collect(),
        )
    }

    /// A reclaim the new coordinator refused: the lock is lost.
    pub fn refused(&mut self, l: &Lk) {
        self.0.unlock(l.ino, owner(l.owner), l.start, l.end);
    }

    pub fn len(&self) -> usize {
        self.0.all().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn lk(ino: u64, owner: u64, start: u64, end: u64, typ: i32, fh: u64) -> Lk {
        Lk {
            ino,
            owner,
            start,
            end,
            typ,
            pid: 42,
            wait: true,
            fh,
            reclaim: false,
        }
    }

    fn asked(h: &mut HeldLocks) -> Vec<Lk> {
        match h.reclaim(Duration::from_secs(1), LEASE) {
            Reclaim::Ask(v) => v,
            lost => panic!("{lost:?}"),
        }
    }

    #[test]
    fn granted_locks_are_reclaimed_as_reclaims_and_unlocks_take_them_back() {
        let mut h = HeldLocks::default();
        h.granted(&lk(5, 1, 0, 99, libc::F_WRLCK, 0));
        h.granted(&lk(6, 2, 10, 19, libc::F_RDLCK, 0));
        let mut want = asked(&mut h);
        want.sort_by_key(|l| l.ino);
        assert_eq!(want.len(), 2);
        assert!(
            want.iter().all(|l| l.reclaim && !l.wait),
            "reclaims do not wait"
        );
        assert_eq!(
            (want[0].typ, want[0].start, want[0].end),
            (libc::F_WRLCK, 0, 99)
        );
        assert_eq!((want[1].typ, want[1].pid), (libc::F_RDLCK, 42));
        // An unlock of part of a range leaves the rest.
        h.granted(&lk(5, 1, 50, 99, libc::F_UNLCK, 0));
        let left: Vec<(u64, u64, u64)> = asked(&mut h)
            .iter()
            .filter(|l| l.ino == 5)
            .map(|l| (l.ino, l.start, l.end))
            .collect();
        assert_eq!(left, vec![(5, 0, 49)]);
    }

    #[test]
    fn a_close_releases_the_owners_locks_and_a_flock_close_only_its_open() {
        let mut h = HeldLocks::default();
        h.granted(&lk(5, 1, 0, 9, libc::F_WRLCK, 0));
        h.granted(&lk(5, 1, 20, 29, libc::F_WRLCK, 0));
        h.granted(&lk(5, 2, 40, 49, libc::F_RDLCK, 0));
        h.released(5, 1, None);
        assert_eq!(asked(&mut h).len(), 1, "owner 2's lock stays");
        // flock: owner 3 through two opens of the same file.
        h.granted(&lk(7, 3, 0, u64::MAX, libc::F_WRLCK, 100));
        h.granted(&lk(8, 3, 0, u64::MAX, libc::F_WRLCK, 200));
        h.released(7, 3, Some(100));
        let inos: Vec<u64> = asked(&mut h).iter().map(|l| l.ino).collect();
        assert!(!inos.contains(&7) && inos.contains(&8), "{inos:?}");
    }

    #[test]
    fn cut_off_past_the_lease_every_lock_is_lost_not_reclaimed() {
        let mut h = HeldLocks::default();
        h.granted(&lk(5, 1, 0, 9, libc::F_WRLCK, 0));
        h.granted(&lk(6, 1, 0, 9, libc::F_WRLCK, 0));
        assert_eq!(h.reclaim(LEASE, LEASE), Reclaim::Lost(2));
        assert!(h.is_empty(), "forgotten");
        assert_eq!(h.reclaim(Duration::ZERO, LEASE), Reclaim::Ask(vec![]));
    }

    #[test]
    fn a_refused_reclaim_is_dropped_from_the_copy() {
        let mut h = HeldLocks::default();
        h.granted(&lk(5, 1, 0, 9, libc::F_WRLCK, 0));
        h.granted(&lk(6, 1, 0, 9, libc::F_RDLCK, 0));
        let want = asked(&mut h);
        let refused = want.iter().find(|l| l.ino == 5).unwrap();
        h.refused(refused);
        assert_eq!(h.len(), 1);
        assert_eq!(asked(&mut h)[0].ino, 6);
    }
}
