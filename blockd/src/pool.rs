//! The node's storage pool: one sparse file per replica, thin-provisioned.
//!
//! A replica takes space only where it was written: the file is sparse, its size is the
//! volume size, and discard punches holes back. The pool keeps a running total of
//! allocated bytes (from `st_blocks`) and refuses a write that would allocate past the
//! pool's capacity with [`Error::NoSpace`] before touching the file, so a full pool
//! means ENOSPC for the writer, never a half-written block.
//!
//! Beside each replica's data lives its [`RegionVersions`]: the version of every region
//! and the replica's fencing epoch. Every change carries the coordinator's epoch and is
//! refused when it is older than the replica's, so a deposed coordinator cannot write.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;

use crate::activity::ActivityLog;
use crate::error::{Error, Result};
use crate::versions::{regions_of, Descriptor, RegionVersions, REGION_BYTES};
use crate::writeback::Window;

mod open;
mod regions;

/// Region lock stripes per replica: a write holds the stripes of the regions it touches
/// while it changes data and versions, so the two never disagree.
const STRIPES: usize = 64;

/// Who writes, and which version the write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub version: u64,
    /// The coordinator's completion watermark (every version below it is on every
    /// in-sync replica); 0 for a resync copy, which says nothing about it.
    pub complete_below: u64,
}

/// What a replica answers when it is opened (fenced) by a coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The epoch it follows now.
    pub epoch: u64,
    /// The highest completion watermark any coordinator sent it.
    pub complete_below: u64,
    pub state: OpenState,
    /// Some when its host rebooted since it was last used (its unsynced writes lost,
    /// maybe torn) and no resync has caught it up since: the watermark below which it
    /// surely holds every version. It must not count in sync while another replica does.
    pub reboot_below: Option<u64>,
}

/// Whether an opened replica's files were there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenState {
    /// It was there: it holds what it held.
    Existing,
    /// It was made just now, empty: it holds nothing yet, whatever the record says.
    Created,
    /// It is not there and was not made (nothing was changed).
    Missing,
}

/// See [`Pool::describe`].
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub descriptor: Option<Descriptor>,
    /// Being caught up: it may lack regions below its highest version.
    pub catching_up: bool,
    /// Its host rebooted since it was last used (a recorded reboot, or another boot's
    /// tag): what it had not synced may be lost or torn, whatever its versions say.
    pub rebooted: bool,
    pub epoch: u64,
    pub complete_below: u64,
    pub max_version: u64,
}

/// One replica file.
struct ReplicaFile {
    file: File,
    versions: RegionVersions,
    stripes: Vec<Mutex<()>>,
    /// Writes below this version are late (sent before the replica's resync began).
    floor: AtomicU64,
    /// Allocated bytes last seen for this file (`st_blocks * 512`).
    allocated: AtomicI64,
    /// Large writes waiting to be written out and dropped from the page cache.
    writeback: Window,
    /// The extents that may hold writes not yet durable (see [`crate::activity`]).
    activity: ActivityLog,
}

impl ReplicaFile {
    fn lock(&self, regions: std::ops::Range<u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = regions.map(|r| (r % STRIPES as u64) as usize).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().expect("stripe lock"))
            .collect()
    }
}

/// See the module doc.
pub struct Pool {
    dir: PathBuf,
    capacity: u64,
    /// Allocated bytes over all replica files.
    used: AtomicU64,
    open: Mutex<HashMap<String, Arc<ReplicaFile>>>,
    /// Replicas a coordinator opened (fenced) since this process started. A replica
    /// not in it refuses changes: its node restarted since its coordinator last opened
    /// it, so writes it had not flushed may be gone (a power loss), and it must be
    /// resynced before it counts in sync again.
    opened: Mutex<HashSet<String>>,
}

/// How a replica refuses a change after its node restarted (see `Pool::opened`); the
/// coordinator recognizes it by this text.
pub const RESTARTED: &str = "replica's node restarted since its coordinator opened it";

impl Pool {
    /// Opens the pool in `dir` (created if missing). `capacity` of `None` means the free
    /// space of the filesystem holding `dir` plus what the pool already uses.
    pub fn open(dir: &Path, capacity: Option<u64>) -> Result<Self> {
        let rdir = dir.join("replicas");
        fs::create_dir_all(&rdir)?;
        let mut used = 0u64;
        for entry in fs::read_dir(&rdir)? {
            let entry = entry?;
            if entry.path().extension().is_some_and(|e| e == "img") {
                used += entry.metadata()?.blocks() * 512;
            }
        }
        let capacity = match capacity {
            Some(c) => c,
            None => {
                let st = nix::sys::statvfs::statvfs(dir)
                    .map_err(|e| Error::Io(std::io::Error::from(e)))?;
                st.blocks_available() as u64 * st.fragment_size() as u64 + used
            }
        };
        Ok(Self {
            dir: rdir,
            capacity,
            used: AtomicU64::new(used),
            open: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashSet::new()),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.img"))
    }

    fn versions_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.ver"))
    }

    fn activity_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.al"))
    }

    fn check_id(volume_id: &str) -> Result<()> {
        if volume_id.is_empty()
            || volume_id.len() > 64
            || !volume_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Error::InvalidArgument(format!(
                "volume id {volume_id:?} is not a valid id"
            )));
        }
        Ok(())
    }

    /// Opens a replica file; `create` makes it (sparse, `size` bytes) when missing.
    /// Without `create`, a missing data or version file is [`Error::ReplicaMissing`].
    fn replica(&self, volume_id: &str, size: u64, create: bool) -> Result<Arc<ReplicaFile>> {
        Ok(self.replica_created(volume_id, size, create)?.0)
    }

    /// [`Pool::replica`], also saying whether the files were made just now.
    fn replica_created(
        &self,
        volume_id: &str,
        size: u64,
        create: bool,
    ) -> Result<(Arc<ReplicaFile>, bool)> {
        Self::check_id(volume_id)?;
        let mut open = self.open.lock().expect("pool lock poisoned");
        if let Some(r) = open.get(volume_id) {
            return Ok((r.clone(), false));
        }
        let path = self.path(volume_id);
        let vpath = self.versions_path(volume_id);
        // Data without its versions counts as missing too: what it holds is unknown.
        let existed = path.exists() && vpath.exists();
        if !create && !existed {
            return Err(Error::ReplicaMissing(format!(
                "volume {volume_id} has no replica file on this node ({})",
                path.display()
            )));
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ReplicaMissing(format!(
                    "volume {volume_id} has no replica file on this node ({})",
                    path.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let apath = self.activity_path(volume_id);
        if !existed {
            // Versions (or a log) without data: stale, and about to be made again.
            for stale in [&vpath, &apath] {
                if stale.exists() {
                    fs::remove_file(stale)?;
                }
            }
        }
        if !existed && file.metadata()?.len() > 0 {
            // Data without versions, made again: what it holds is unknown, so it must
            // read as zeros like any new replica (a full resync fills it).
            file.set_len(0)?;
        }
        let meta = file.metadata()?;
        if meta.len() < size {
            file.set_len(size)?;
        }
        let r = Arc::new(ReplicaFile {
            allocated: AtomicI64::new((meta.blocks() * 512) as i64),
            versions: RegionVersions::open(&vpath, create)?,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            floor: AtomicU64::new(0),
            writeback: Window::default(),
            activity: ActivityLog::open(&apath)?,
            file,
        });
        open.insert(volume_id.to_string(), r.clone());
        Ok((r, !existed))
    }

    /// Refuses a change to a replica not opened since this process started.
    fn check_opened(&self, volume_id: &str) -> Result<()> {
        if self.opened.lock().expect("opened lock").contains(volume_id) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "volume {volume_id}: {RESTARTED}; it must be resynced"
            )))
        }
    }

    fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "range {offset}+{len} is beyond the volume size {size}"
            )));
        }
        Ok(())
    }

    /// Re-reads a replica's allocation and folds the change into the pool total.
    fn account(&self, r: &ReplicaFile) -> Result<()> {
        let now = (r.file.metadata()?.blocks() * 512) as i64;
        let before = r.allocated.swap(now, Ordering::Relaxed);
        let delta = now - before;
        if delta >= 0 {
            self.used.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.used.fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `len` bytes; never-written ranges read as zeros. A replica whose file is
    /// missing is an error, never zeros.
    pub fn read(&self, volume_id: &str, size: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        Self::check_range(size, offset, len as u64)?;
        let r = self.replica(volume_id, size, false)?;
        Self::read_from(&r, offset, len)
    }

    /// Reads a checked range of an open replica file; past its end reads as zeros.
    fn read_from(r: &ReplicaFile, offset: u64, len: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let n = r.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break; // past EOF: zeros
            }
            done += n;
        }
        Ok(buf)
    }

    /// Reads for the coordinator of `epoch`: refused once the replica follows a newer
    /// epoch (that coordinator was replaced, and its successor may have written since),
    /// and refused while the replica's node restarted since it was opened (it may have
    /// lost writes it had acknowledged; see [`Pool::open_replica`]).
    pub fn read_at_epoch(
        &self,
        volume_id: &str,
        size: u64,
        offset: u64,
        len: u32,
        epoch: u64,
    ) -> Result<Vec<u8>> {
        Self::check_range(size, offset, len as u64)?;
        let r = self.replica(volume_id, size, false)?;
        let cur = r.versions.epoch();
        if epoch < cur {
            return Err(Error::Fenced(format!(
                "read at stale epoch {epoch}: replica {volume_id} follows epoch {cur}"
            )));
        }
        self.check_opened(volume_id)?;
        Self::read_from(&r, offset, len)
    }

    /// Writes `data` at `offset` as `stamp`; with `fua` the write is durable before this
    /// returns.
    pub fn write(
        &self,
        volume_id: &str,
        size: u64,
        offset: u64,
        data: &[u8],
        fua: bool,
        stamp: Stamp,
    ) -> Result<()> {
        self.write_parts(volume_id, size, offset, &[data], fua, stamp)
    }

    /// [`Pool::write`] of data that arrived in pieces (the HTTP/2 frames of a replica
    /// write): the pieces are written back to back at `offset` with one `pwritev`.
    pub fn write_parts(
        &self,
        volume_id: &str,
        size: u64,
        offset: u64,
        parts: &[&[u8]],
        fua: bool,
        stamp: Stamp,
    ) -> Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        Self::check_range(size, offset, len)?;
        let r = self.replica(volume_id, size, false)?;
        let regions = regions_of(offset, len);
        let guards = r.lock(regions.clone());
        // Under the region lock: a fence (Open) or a newer write cannot slip in between
        // the check and the write.
        r.versions.check_epoch(stamp.epoch)?;
        self.check_opened(volume_id)?;
        Self::refuse_late(&r, stamp)?;
        self.reserve(&r, offset, len)?;
        let noted = r
            .activity
            .note(offset, len, || self.sync_whole(&r, volume_id))?;
        let res = write_all_at(&r.file, parts, offset);
        self.account(&r)?;
        res.map_err(|e| self.io_error(e))?;
        r.versions.set(regions, stamp.version, true)?;
        r.versions.note_complete(stamp.complete_below);
        drop(noted);
        drop(guards);
        if fua {
            let durable = r.versions.complete_below();
            r.file.sync_data()?;
            r.versions.sync(durable)?;
            self.synced(volume_id);
        } else {
            // Outside the region lock: this may wait for an older range's write-out.
            r.writeback.after_write(&r.file, offset, len);
        }
        Ok(())
    }

    /// Whether a write into `[offset, offset + len)` of the replica is quick: it lands
    /// in logged extents, so it does no I/O beyond the page cache (see
    /// [`crate::activity`]).
    /// Never waits for the log (it may be syncing): busy means not quick.
    pub fn write_is_quick(&self, volume_id: &str, offset: u64, len: u64) -> bool {
        let r = self
            .open
            .lock()
            .expect("pool lock poisoned")
            .get(volume_id)
            .cloned();
        r.is_some_and(|r| r.activity.covers_now(offset, len))
    }

    /// Makes the replica's data and versions durable (with the watermark known before
    /// the data was synced: a write arriving meanwhile may raise it, and its data may
    /// not be on disk yet).
    fn sync_whole(&self, r: &ReplicaFile, volume_id: &str) -> Result<()> {
        let durable = r.versions.complete_below();
        r.file.sync_data()?;
        r.versions.sync(durable)?;
        self.synced(volume_id);
        Ok(())
    }

    /// Refuses a change sent before this replica's resync began: a write that timed out
    /// and arrives late must not overwrite what the resync copied. (Writes of one
    /// coordinator that do not overlap may arrive in any order; overlapping ones are
    /// ordered by the coordinator, so a version older than the region's is normal.)
    fn refuse_late(r: &ReplicaFile, stamp: Stamp) -> Result<()> {
        let floor = r.floor.load(Ordering::SeqCst);
        if stamp.version < floor {
            return Err(Error::FailedPrecondition(format!(
                "late write: version {} was sent before this replica's resync (from version {floor})",
                stamp.version
            )));
        }
        Ok(())
    }

    /// Refuses a write that would allocate past the pool's capacity.
    fn reserve(&self, r: &ReplicaFile, offset: u64, len: u64) -> Result<()> {
        if self.used() + len > self.capacity {
            // Slow path near full: only the holes in the range take new space.
            let new_bytes = hole_bytes(&r.file, offset, len)?;
            if self.used() + new_bytes > self.capacity {
                return Err(Error::NoSpace(format!(
                    "pool {} is full ({} of {} bytes used)",
                    self.dir.display(),
                    self.used(),
                    self.capacity
                )));
            }
        }
        Ok(())
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            Error::NoSpace(format!("pool {} filesystem is full", self.dir.display()))
        } else {
            Error::Io(e)
        }
    }

    /// Bytes allocated by one replica (0 if it has none here).
    pub fn replica_used(&self, volume_id: &str) -> Result<u64> {
        Self::check_id(volume_id)?;
        match fs::metadata(self.path(volume_id)) {
            Ok(m) => Ok(m.blocks() * 512),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a replica and returns its space.
    pub fn delete(&self, volume_id: &str) -> Result<()> {
        Self::check_id(volume_id)?;
        let held = self
            .open
            .lock()
            .expect("pool lock poisoned")
            .remove(volume_id);
        let path = self.path(volume_id);
        let blocks = match fs::metadata(&path) {
            Ok(m) => m.blocks() * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        drop(held);
        self.opened.lock().expect("opened lock").remove(volume_id);
        fs::remove_file(&path)?;
        let _ = fs::remove_file(self.versions_path(volume_id));
        let _ = fs::remove_file(self.activity_path(volume_id));
        self.used
            .fetch_sub(blocks.min(self.used()), Ordering::Relaxed);
        Ok(())
    }

    /// Volume ids of every replica file in the pool.
    pub fn replica_ids(&self) -> Result<HashSet<String>> {
        let mut out = HashSet::new();
        for entry in fs::read_dir(&self.dir)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "img") {
                if let Some(stem) = p.file_stem() {
                    out.insert(stem.to_string_lossy().into_owned());
                }
            }
        }
        Ok(out)
    }
}

/// Writes `parts` back to back at `offset`, all of them (short writes and EINTR go on).
fn write_all_at(file: &File, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    if let [one] = parts {
        return file.write_all_at(one, offset);
    }
    let mut slices: Vec<std::io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut bufs = &mut slices[..];
    let mut at = offset;
    while !bufs.is_empty() {
        // At most IOV_MAX (1024 on Linux) slices a call: a peer may send tiny frames.
        let k = bufs.len().min(1024);
        match nix::sys::uio::pwritev(file, &bufs[..k], at as i64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n as u64;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Punches a hole: the range reads as zeros and takes no space.
fn punch(file: &File, offset: u64, len: u64) -> Result<()> {
    nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(|e| Error::Io(e.into()))
}

/// Regions of the first `size` bytes of `file` that hold data (not holes), ascending.
fn data_regions(file: &File, size: u64) -> Result<Vec<u64>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data at or after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if data >= hole {
            break;
        }
        let next = hole.div_ceil(REGION_BYTES);
        // A region may hold the end of one data run and the start of the next.
        let first = (data / REGION_BYTES).max(out.last().map_or(0, |g| g + 1));
        out.extend(first..next);
        pos = hole;
    }
    Ok(out)
}

/// Bytes of `[offset, offset+len)` that are holes in `file` (would take new space).
fn hole_bytes(file: &File, offset: u64, len: u64) -> Result<u64> {
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut pos = offset;
    let mut holes = 0u64;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after pos, the rest is a hole.
            holes += end - pos;
            break;
        }
        let data = data as u64;
        if data > pos {
            holes += data.min(end) - pos;
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        pos = hole as u64;
    }
    Ok(holes)
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "pool/activity_tests.rs"]
mod activity_tests;
