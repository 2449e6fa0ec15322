//! The activity log of one replica: which 16 MiB extents may hold writes that are not
//! yet durable (DRBD's activity log, md's write-intent bitmap).
//!
//! Why: the kernel may write a replica's data pages back before its version pages (and
//! `writeback.rs` pushes large writes out early on purpose). After a power cut a region
//! can then hold data its version entry does not account for, and versions alone cannot
//! tell it from an unchanged region: replicas would differ under one version, and no
//! resync or reconcile would compare them. So before the first write into a cold extent,
//! the extent joins the log and the log is synced; writes into logged extents do no I/O
//! here. At the first open after a reboot, every written region of a logged extent is
//! suspect (`Pool::open_replica` raises its version, so resync or reconcile copies it).
//!
//! An extent leaves the log only after the whole replica was synced (its data and
//! versions durable), when the log is full: it keeps its most recently written half.
//!
//! On disk, `<volume-id>.al`: two slots of [`SLOT_BYTES`] written in turn, each with a
//! sequence number and a checksum, so a write torn by a power cut leaves the other slot.
//! The newest valid slot is the log. A file with no valid slot is lost: every written
//! region of the replica is then suspect.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::versions::REGION_BYTES;

/// Bytes one log entry covers.
pub const EXTENT_BYTES: u64 = 16 << 20;
/// Extents the log holds at most (8 GiB of a replica).
pub const CAPACITY: usize = 512;
/// Bytes of one slot: header, [`CAPACITY`] entries, checksum.
const SLOT_BYTES: usize = 8192;
const MAGIC: &[u8; 8] = b"SHOALAL1";
const HEADER: usize = 24;

/// Extents touched by the byte range `[offset, offset + len)`.
pub fn extents_of(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / EXTENT_BYTES..(offset + len - 1) / EXTENT_BYTES + 1
}

/// Regions of one extent.
pub fn regions_of_extent(extent: u64) -> Range<u64> {
    let per = EXTENT_BYTES / REGION_BYTES;
    extent * per..(extent + 1) * per
}

/// The logged extents with the order they were last written in (pure; see the module
/// doc). `tick` grows with every write that touches the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hot {
    last: HashMap<u64, u64>,
    tick: u64,
    /// Writes under way per extent (between [`Hot::add`] and [`Hot::end`]): a sync that
    /// starts now may miss them, so a trim keeps their extents.
    busy: HashMap<u64, u32>,
}

/// What [`Hot::add`] asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Add {
    /// Every extent was logged already: nothing to write.
    Logged,
    /// The log changed: write it (and sync it) before the data.
    Write,
    /// The log would overflow: sync the replica, then [`Hot::trim`], then add again.
    Full,
}

impl Hot {
    /// A log holding `extents` (as read from disk, oldest first).
    pub fn from_extents(extents: &[u64]) -> Self {
        let mut h = Hot::default();
        for &e in extents {
            h.tick += 1;
            h.last.insert(e, h.tick);
        }
        h
    }

    /// Whether every extent of `extents` is logged.
    pub fn covers(&self, extents: Range<u64>) -> bool {
        extents.into_iter().all(|e| self.last.contains_key(&e))
    }

    /// Notes the start of a write into `extents`: each becomes the most recently
    /// written, and busy until [`Hot::end`] (unless the answer is [`Add::Full`]).
    pub fn add(&mut self, extents: Range<u64>) -> Add {
        let new = extents
            .clone()
            .filter(|e| !self.last.contains_key(e))
            .count();
        if self.last.len() + new > CAPACITY {
            return Add::Full;
        }
        self.tick += 1;
        for e in extents {
            self.last.insert(e, self.tick);
            *self.busy.entry(e).or_default() += 1;
        }
        if new == 0 {
            Add::Logged
        } else {
            Add::Write
        }
    }

    /// Notes the end of a write into `extents` (its data and versions written, not
    /// necessarily durable).
    pub fn end(&mut self, extents: Range<u64>) {
        for e in extents {
            if let Some(n) = self.busy.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&e);
                }
            }
        }
    }

    /// Keeps the most recently written half, and every extent a write is under way in:
    /// the replica was synced, so what the others cover is durable.
    pub fn trim(&mut self) {
        let mut by_age: Vec<(u64, u64)> = self
            .last
            .iter()
            .filter(|(e, _)| !self.busy.contains_key(e))
            .map(|(e, t)| (*t, *e))
            .collect();
        by_age.sort_unstable();
        let keep = (CAPACITY / 2).saturating_sub(self.busy.len());
        let drop = by_age.len().saturating_sub(keep);
        for (_, e) in &by_age[..drop] {
            self.last.remove(e);
        }
    }

    /// Takes back an [`Hot::add`] whose log write failed: its write does not happen, and
    /// the extents it added (`added`) are not logged on disk, so they must not count as
    /// logged here either (the next write into them writes the log again).
    pub fn undo(&mut self, extents: Range<u64>, added: &[u64]) {
        self.end(extents);
        for e in added {
            self.last.remove(e);
        }
    }

    /// The extents no write is under way in now, with the tick: what a sync that starts
    /// after this covers (see [`Hot::forget`]).
    pub fn idle(&self) -> Idle {
        Idle {
            tick: self.tick,
            extents: self
                .last
                .keys()
                .filter(|e| !self.busy.contains_key(e))
                .copied()
                .collect(),
        }
    }

    /// Forgets the extents of `idle` that no write touched since: the replica was synced
    /// (or their regions raised) after `idle` was taken, so none of them holds a write
    /// that is not accounted for. One written since stays.
    pub fn forget(&mut self, idle: &Idle) {
        for e in &idle.extents {
            if self.last.get(e).is_some_and(|t| *t <= idle.tick) && !self.busy.contains_key(e) {
                self.last.remove(e);
            }
        }
    }

    /// The logged extents, oldest first.
    pub fn extents(&self) -> Vec<u64> {
        let mut by_age: Vec<(u64, u64)> = self.last.iter().map(|(e, t)| (*t, *e)).collect();
        by_age.sort_unstable();
        by_age.into_iter().map(|(_, e)| e).collect()
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// What [`Hot::idle`] saw: the extents whose writes had all ended at `tick`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idle {
    tick: u64,
    extents: Vec<u64>,
}

/// One slot's bytes: magic, sequence, count, extents (oldest first), checksum at the end.
pub fn encode_slot(seq: u64, extents: &[u64]) -> Vec<u8> {
    assert!(extents.len() <= CAPACITY, "the log holds at most CAPACITY");
    let mut b = vec![0u8; SLOT_BYTES];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[HEADER + i * 8..HEADER + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let sum = checksum(&b[..SLOT_BYTES - 8]);
    b[SLOT_BYTES - 8..].copy_from_slice(&sum);
    b
}

/// A slot's sequence and extents; None when it is empty, torn or not a slot.
pub fn decode_slot(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if b.len() != SLOT_BYTES
        || &b[..8] != MAGIC
        || b[SLOT_BYTES - 8..] != checksum(&b[..SLOT_BYTES - 8])
    {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > CAPACITY {
        return None;
    }
    let extents = (0..n)
        .map(|i| u64::from_le_bytes(b[HEADER + i * 8..HEADER + i * 8 + 8].try_into().unwrap()))
        .collect();
    Some((seq, extents))
}

fn checksum(b: &[u8]) -> [u8; 8] {
    Sha256::digest(b)[..8].try_into().expect("8 bytes")
}

/// The newest valid slot of two; None when neither is valid.
pub fn newest(a: Option<(u64, Vec<u64>)>, b: Option<(u64, Vec<u64>)>) -> Option<(u64, Vec<u64>)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The log file of one replica. See the module doc.
pub struct ActivityLog {
    file: File,
    state: Mutex<State>,
}

struct State {
    hot: Hot,
    /// Sequence of the slot written last; 0: no valid slot was read or written (the
    /// log is lost).
    seq: u64,
}

impl ActivityLog {
    /// Opens (or makes) the log at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let slot = |i: u64| {
            let mut b = vec![0u8; SLOT_BYTES];
            match file.read_exact_at(&mut b, i * SLOT_BYTES as u64) {
                Ok(()) => decode_slot(&b),
                Err(_) => None,
            }
        };
        let (a, b) = (slot(0), slot(1));
        let (seq, extents) = newest(a, b).unwrap_or_default();
        Ok(Self {
            file,
            state: Mutex::new(State {
                hot: Hot::from_extents(&extents),
                seq,
            }),
        })
    }

    /// Whether the log is lost: it was not there, or no slot of it could be read, and
    /// none was written since. Then any written region may hold an unsynced write.
    pub fn lost(&self) -> bool {
        self.state.lock().expect("activity log").seq == 0
    }

    /// The extents that may hold unsynced writes, oldest first; None when the log is
    /// lost (any of them may).
    pub fn suspects(&self) -> Option<Vec<u64>> {
        let st = self.state.lock().expect("activity log");
        (st.seq > 0).then(|| st.hot.extents())
    }

    /// Whether a write into `[offset, offset + len)` needs no log I/O.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        self.state
            .lock()
            .expect("activity log")
            .hot
            .covers(extents_of(offset, len))
    }

    /// Logs the extents of `[offset, offset + len)` before a write into them: durable
    /// when this returns. Hold the answer until the write is done (data and versions
    /// written). `sync_replica` makes the whole replica durable; it is called (with the
    /// log's lock held, so every other writer waits) when the log is full.
    pub fn note(
        &self,
        offset: u64,
        len: u64,
        sync_replica: impl FnOnce() -> Result<()>,
    ) -> Result<Noted<'_>> {
        let extents = extents_of(offset, len);
        let mut st = self.state.lock().expect("activity log");
        let mut added: Vec<u64> = extents
            .clone()
            .filter(|e| !st.hot.covers(*e..*e + 1))
            .collect();
        let mut add = st.hot.add(extents.clone());
        if add == Add::Full {
            sync_replica()?;
            st.hot.trim();
            added = extents
                .clone()
                .filter(|e| !st.hot.covers(*e..*e + 1))
                .collect();
            add = st.hot.add(extents.clone());
            if add == Add::Full {
                // Wider than half the log: not a write the pool sends (writes are at
                // most a few MiB; wide discards sync their versions instead).
                return Err(crate::error::Error::InvalidArgument(format!(
                    "a write over {} extents is wider than the activity log",
                    extents.end - extents.start
                )));
            }
        }
        if add == Add::Write {
            if let Err(e) = self.write(&mut st) {
                // Not on disk: not logged, and the write does not happen.
                st.hot.undo(extents, &added);
                return Err(e);
            }
        }
        Ok(Noted { log: self, extents })
    }

    /// The extents no write is under way in now: take it before a sync (or a raise)
    /// that makes them safe to forget, then [`ActivityLog::forget`].
    pub fn idle(&self) -> Idle {
        self.state.lock().expect("activity log").hot.idle()
    }

    /// Forgets what `idle` saw (the replica was synced, or those regions raised, after
    /// it was taken), keeping any extent written since, and writes the log: this also
    /// makes a lost log valid again.
    pub fn forget(&self, idle: &Idle) -> Result<()> {
        let mut st = self.state.lock().expect("activity log");
        st.hot.forget(idle);
        self.write(&mut st)
    }

    /// Whether a write into `[offset, offset + len)` surely needs no log I/O, without
    /// waiting: false while the log is busy (a write of it, or a full log's sync).
    pub fn covers_now(&self, offset: u64, len: u64) -> bool {
        self.state
            .try_lock()
            .is_ok_and(|st| st.hot.covers(extents_of(offset, len)))
    }

    /// Writes the log to the slot after the last one written, durably; the sequence
    /// moves only once it is on disk (a failed write is tried again in the same slot,
    /// the other still holding the last good log).
    fn write(&self, st: &mut State) -> Result<()> {
        let seq = st.seq + 1;
        let slot = encode_slot(seq, &st.hot.extents());
        self.file
            .write_all_at(&slot, (seq % 2) * SLOT_BYTES as u64)?;
        self.file.sync_data()?;
        st.seq = seq;
        Ok(())
    }
}

/// A write under way into logged extents; dropping it ends the write.
pub struct Noted<'a> {
    log: &'a ActivityLog,
    extents: Range<u64>,
}

impl Drop for Noted<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.log.state.lock() {
            st.hot.end(self.extents.clone());
        }
    }
}

#[cfg(test)]
#[path = "activity_tests.rs"]
mod tests;
