//! The mount's lock calls and cached lookups, for the FUSE adapter: a lock request asked
//! again while the coordinator holds it back (reclaims after a takeover, a queued
//! F_SETLKW), the mount's own copy of what it holds, and a name answered from the cache.

use super::*;

impl Client {
    /// F_GETLK at the coordinator, asked again while a new coordinator lets mounts
    /// reclaim their locks.
    pub(super) fn get_lock(&self, req: &Request, lk: Lk) -> Result<Option<Res>, Errno> {
        let op = Op::Getlk(lk);
        loop {
            match self.rpc.call(req, op.clone()) {
                Err(e) if e == Errno::EINPROGRESS => continue,
                r => return r,
            }
        }
    }

    /// F_SETLK / F_SETLKW at the coordinator (asked again while queued there and not
    /// granted yet); a granted lock is noted in the mount's copy, and its owner
    /// remembered so the owner's close (FLUSH) releases it.
    pub(super) fn set_lock(&self, req: &Request, lk: Lk) -> Result<(), Errno> {
        let op = Op::Setlk(lk);
        loop {
            match self.rpc.call(req, op.clone()) {
                Ok(_) => {
                    self.rpc.note_setlk(&lk);
                    if lk.typ != libc::F_UNLCK {
                        self.posix_owners
                            .lock()
                            .expect("posix owners")
                            .insert((lk.ino, lk.owner));
                    }
                    return Ok(());
                }
                Err(e) if e == Errno::EINPROGRESS => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// What the cache knows of `name` in `parent`: Some(Some) an entry with its
    /// attributes, Some(None) no such name, None unknown (ask the coordinator).
    pub(super) fn cached_entry(
        &self,
        parent: u64,
        name: &[u8],
        now: std::time::Instant,
    ) -> Option<Option<(Attr, Duration)>> {
        let cache = self.rpc.cache();
        match cache.name(parent, name, now) {
            Name::Found(ino) => cache.attr(ino, now).map(Some),
            Name::Absent => Some(None),
            Name::Unknown => None,
        }
    }
}
