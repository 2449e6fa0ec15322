//! A mount's own cache of names and attributes, trusted only under the coordinator's
//! leases. Pure state with the time passed in, so the rules are tested without a clock.
//!
//! The coordinator grants a mount a lease on an inode when a reply hands it the inode's
//! attributes, and on a directory's names when the mount looks a name up there or
//! changes one. A change by another mount recalls the lease (the callback stream) before
//! it returns; [`Cache::recall`] drops what the lease covered. The mount's own changes
//! come back in the reply: the inodes they touched are dropped, and the reply's fresh
//! attributes and the name it created or removed are taken in.
//!
//! Why the cache is here and not in the kernel's dentry cache: taking a name back from
//! the kernel (`inval_entry`) needs the directory's lock, which a process on this host
//! may hold while it waits for the very coordinator that waits for the recall. Here a
//! recall never waits for anything; the kernel still asks for every name (entry timeout
//! zero) but the answer costs a FUSE round trip, not a network one.
//!
//! Races between a reply and a recall (or another change) in flight at the same time are
//! settled like the kernel's attribute versions: every request takes a [`Ticket`] with
//! the cache's epoch, every recall and every change bumps the epoch, and a reply whose
//! ticket is older than the epoch adds nothing (it may describe the state before the
//! change). Entries expire at the time the request was sent plus the lease's length the
//! reply gives (shorter than the coordinator's own), so a mount that misses a recall
//! (its stream broke) stops trusting its copy before the coordinator stops waiting.
//!
//! The session's heartbeat renews every lease at the coordinator at once
//! ([`Cache::renew`]): entries still good when the renewal's answer comes are extended
//! (the coordinator's copy of each lasts longer than ours, so it still held them when it
//! renewed), unless a recall arrived while the heartbeat was out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_proto::ns::{Attr, DirEntryPlus};

/// Entries kept at most; past this the cache starts over (a bound, not a tuning knob).
const MAX_ENTRIES: usize = 200_000;
/// Lookups of unknown names in one directory before the mount reads the whole
/// directory with attributes (a "statahead": `ls -l`, `find`, a stat loop)...
const MISSES_BEFORE_LISTING: u32 = 4;
/// ...and at least one per this many entries, so a listing (one call per 512 entries)
/// costs at most an eighth of the calls the misses took, even when another host keeps
/// changing the directory and so keeps making the listing stale.
const ENTRIES_PER_MISS: u64 = 64;

/// What a request saw of the cache when it was sent.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    epoch: u64,
    /// Recalls (and clears) seen so far.
    recalls: u64,
    sent: Instant,
}

/// The answer of the cache to a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Name {
    /// The name is there and points at this inode.
    Found(u64),
    /// The name is not there.
    Absent,
    /// Not known: ask the coordinator.
    Unknown,
}

/// What a reply did to names in directories, as the client knows from the request.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Nothing to names (or the operation is not about names).
    None,
    /// A lookup: the name points at the inode, or (None) is absent.
    Looked {
        parent: u64,
        name: Vec<u8>,
        ino: Option<u64>,
    },
    /// A name was created for the inode (create, mknod, mkdir, symlink, link).
    Added {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
        dir: bool,
    },
    /// A name was removed (unlink, rmdir).
    Removed { parent: u64, name: Vec<u8> },
    /// A listing with attributes of part of the directory (`readdirplus`).
    Listed { parent: u64 },
    /// A rename (`exchange`: the two names swapped).
    Renamed {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        exchange: bool,
    },
}

impl Effect {
    /// The directories whose names this effect touches.
    fn dirs(&self) -> Vec<u64> {
        match self {
            Effect::None => vec![],
            Effect::Looked { parent, .. }
            | Effect::Added { parent, .. }
            | Effect::Removed { parent, .. }
            | Effect::Listed { parent } => vec![*parent],
            Effect::Renamed {
                parent, new_parent, ..
            } => vec![*parent, *new_parent],
        }
    }
}

/// What a reply brought, beyond its errno.
#[derive(Debug, Default)]
pub struct Fresh<'a> {
    pub ok: bool,
    /// The inode's attributes in the reply and how long they may be cached.
    pub attr: Option<(&'a Attr, Duration)>,
    /// The directories' attributes after the change (the lease is `names_ttl`).
    pub parents: Vec<&'a Attr>,
    /// The lease on the names of the request's directories; zero: none.
    pub names_ttl: Duration,
    /// Inodes whose attributes the request changed.
    pub changed: &'a [u64],
    /// Listed entries and how long their attributes may be cached.
    pub listed: &'a [DirEntryPlus],
    pub listed_ttl: Duration,
}

#[derive(Debug)]
struct Dir {
    until: Instant,
    /// Every name is in `names` (the mount made the directory, or read all of it).
    complete: bool,
    names: HashMap<Vec<u8>, Option<u64>>,
}

#[derive(Debug, Default)]
pub struct Cache {
    epoch: u64,
    recalls: u64,
    /// Unknown names looked up per directory since it was last listed.
    misses: HashMap<u64, u32>,
    attrs: HashMap<u64, (Attr, Instant)>,
    dirs: HashMap<u64, Dir>,
}

impl Cache {
    pub fn ticket(&self, now: Instant) -> Ticket {
        Ticket {
            epoch: self.epoch,
            recalls: self.recalls,
            sent: now,
        }
    }

    /// The inode's cached attributes and how much longer they are good for.
    pub fn attr(&self, ino: u64, now: Instant) -> Option<(Attr, Duration)> {
        let (a, until) = self.attrs.get(&ino)?;
        (*until > now).then_some((*a, *until - now))
    }

    pub fn name(&self, parent: u64, name: &[u8], now: Instant) -> Name {
        let Some(d) = self.dirs.get(&parent).filter(|d| d.until > now) else {
            return Name::Unknown;
        };
        match d.names.get(name) {
            Some(Some(ino)) => Name::Found(*ino),
            Some(None) => Name::Absent,
            None if d.complete => Name::Absent,
            None => Name::Unknown,
        }
    }

    /// Counts a lookup of an unknown name in `parent`, a directory of `entries`; true
    /// when the mount should list the whole directory instead of asking name by name.
    pub fn note_miss(&mut self, parent: u64, entries: u64) -> bool {
        if self.misses.len() > 4096 {
            self.misses.clear();
        }
        let n = self.misses.entry(parent).or_insert(0);
        *n += 1;
        let due = (MISSES_BEFORE_LISTING as u64).max(entries / ENTRIES_PER_MISS);
        if *n as u64 >= due {
            self.misses.remove(&parent);
            return true;
        }
        false
    }

    /// A listing of `parent` that began with ticket `first` went to its end: if nothing
    /// changed since (no recall, no change of ours), every name in it is known.
    pub fn listed_all(&mut self, parent: u64, first: Ticket, now: Instant) {
        if first.epoch != self.epoch {
            return;
        }
        if let Some(d) = self.dirs.get_mut(&parent).filter(|d| d.until > now) {
            d.complete = true;
        }
    }

    /// Another mount changed these inodes: forget them (attributes and names).
    pub fn recall(&mut self, inodes: &[u64]) {
        for ino in inodes {
            self.attrs.remove(ino);
            self.dirs.remove(ino);
        }
        self.epoch += 1;
        self.recalls += 1;
    }

    /// The heartbeat sent with `t` renewed every lease for `ttl`; `now` is when its
    /// answer came. Entries that ran out before that are not brought back (the
    /// coordinator may have dropped them); nothing is renewed if a recall came meanwhile.
    pub fn renew(&mut self, t: Ticket, ttl: Duration, now: Instant) {
        if t.recalls != self.recalls {
            return;
        }
        let until = t.sent + ttl;
        for (_, u) in self.attrs.values_mut() {
            if *u > now && *u < until {
                *u = until;
            }
        }
        for d in self.dirs.values_mut() {
            if d.until > now && d.until < until {
                d.until = until;
            }
        }
    }

    /// Forgets everything (a new session: the old one's leases are gone).
    pub fn clear(&mut self) {
        self.attrs.clear();
        self.dirs.clear();
        self.epoch += 1;
        self.recalls += 1;
    }

    /// Takes in a reply to a request sent with `t`.
    pub fn settle(&mut self, t: Ticket, fresh: &Fresh<'_>, effect: &Effect) {
        let current = t.epoch == self.epoch;
        for ino in fresh.changed {
            self.attrs.remove(ino);
        }
        let changes_names = !matches!(
            effect,
            Effect::None | Effect::Looked { .. } | Effect::Listed { .. }
        );
        if !fresh.changed.is_empty() || changes_names {
            // Replies to requests already in flight may describe the state before this.
            self.epoch += 1;
        }
        if !current {
            // Something changed since the request left: what it says may be older than
            // what we know, so take nothing in; what it changed must not survive.
            if changes_names || !fresh.ok {
                for d in effect.dirs() {
                    self.dirs.remove(&d);
                }
            }
            return;
        }
        if self.attrs.len() + self.dirs.len() > MAX_ENTRIES {
            self.attrs.clear();
            self.dirs.clear();
        }
        if fresh.ok {
            if let Some((a, ttl)) = fresh.attr {
                if !ttl.is_zero() {
                    self.attrs.insert(a.ino, (*a, t.sent + ttl));
                }
            }
        }
        if fresh.names_ttl.is_zero() {
            for d in effect.dirs() {
                self.dirs.remove(&d);
            }
            return;
        }
        let until = t.sent + fresh.names_ttl;
        for a in &fresh.parents {
            self.attrs.insert(a.ino, (**a, until));
        }
        if !fresh.ok {
            match effect {
                // The negative answer we want to keep.
                Effect::Looked { parent, name, .. } => {
                    self.dir(*parent, until).names.insert(name.clone(), None);
                }
                // A refused change: the cache may have been wrong about these names.
                _ => {
                    for d in effect.dirs() {
                        self.dirs.remove(&d);
                    }
                }
            }
            return;
        }
        match effect {
            Effect::None => {}
            Effect::Listed { parent } => {
                let attr_until = t.sent + fresh.listed_ttl;
                let keep_attrs = !fresh.listed_ttl.is_zero();
                let d = self.dir(*parent, until);
                for e in fresh.listed {
                    if let Some(a) = &e.attr {
                        d.names.insert(e.name.clone(), Some(a.ino));
                    }
                }
                if keep_attrs {
                    for e in fresh.listed {
                        if let Some(a) = &e.attr {
                            self.attrs.insert(a.ino, (*a, attr_until));
                        }
                    }
                }
            }
            Effect::Looked { parent, name, ino } => {
                self.dir(*parent, until).names.insert(name.clone(), *ino);
            }
            Effect::Added {
                parent,
                name,
                ino,
                dir,
            } => {
                self.dir(*parent, until)
                    .names
                    .insert(name.clone(), Some(*ino));
                if *dir {
                    // A directory this mount just made is empty, and under its lease.
                    if let Some((_, ttl)) = fresh.attr.filter(|(_, ttl)| !ttl.is_zero()) {
                        self.dirs.insert(
                            *ino,
                            Dir {
                                until: t.sent + ttl,
                                complete: true,
                                names: HashMap::new(),
                            },
                        );
                    }
                }
            }
            Effect::Removed { parent, name } => {
                if let Some(Some(gone)) = self.dir(*parent, until).names.insert(name.clone(), None)
                {
                    self.dirs.remove(&gone);
                }
            }
            Effect::Renamed {
                parent,
                name,
                new_parent,
                new_name,
                exchange,
            } => {
                if *exchange {
                    self.dir(*parent, until).names.remove(name);
                    self.dir(*new_parent, until).names.remove(new_name);
                    // Unknown is safe; `complete` would turn it into absent.
                    for d in [*parent, *new_parent] {
                        if let Some(d) = self.dirs.get_mut(&d) {
                            d.complete = false;
                        }
                    }
                } else {
                    let moved = self.dir(*parent, until).names.insert(name.clone(), None);
                    let target = self.dir(*new_parent, until);
                    match moved {
                        Some(Some(ino)) => {
                            target.names.insert(new_name.clone(), Some(ino));
                        }
                        _ => {
                            target.names.remove(new_name);
                            target.complete = false;
                        }
                    }
                }
            }
        }
    }

    /// The cached directory, made (incomplete) if missing; its lease runs to `until`.
    fn dir(&mut self, ino: u64, until: Instant) -> &mut Dir {
        let d = self.dirs.entry(ino).or_insert_with(|| Dir {
            until,
            complete: false,
            names: HashMap::new(),
        });
        if d.until < until {
            d.until = until;
        }
        d
    }
}

#[cfg(test)]
mod tests;
