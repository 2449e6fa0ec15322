//! Per-replica region versions and the replica's fencing epoch, kept beside its data.
//!
//! A volume is divided into regions of [`REGION_BYTES`]. Every write carries a version
//! assigned by the coordinator; the replica records, per region, the highest version
//! that wrote into it. A replica coming back after an outage is caught up by copying
//! only the regions whose version is newer than what it had when it left (incremental
//! resync). Versions put the coordinator's epoch in the high bits, so every version of a
//! newer coordinator is above every version of an older one.
//!
//! The file `<volume-id>.ver` holds a 4 KiB header (magic, format version, epoch, the
//! completion watermark, and the replica's [`Descriptor`]: which cluster and volume it
//! belongs to, so the cluster metadata can be rebuilt from the disks alone) and then one
//! little-endian u64 per region. It is sparse: regions never written take no
//! space and read as version 0. Memory does not grow with the volume: nothing here is
//! cached beyond the epoch.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Bytes covered by one version entry.
pub const REGION_BYTES: u64 = 1 << 20;
const HEADER_BYTES: u64 = 4096;
const MAGIC: &[u8; 8] = b"SHOALVER";
const FORMAT_VERSION: u32 = 1;
/// Where the "catching up" mark (u64, 1: set) lives in the header.
const CATCHING_UP_AT: u64 = 32;
/// Where the durable watermark at the moment a reboot was found (u64) lives: what a
/// replica flagged by [`RegionVersions::flag_reboot`] surely holds below.
const REBOOT_BELOW_AT: u64 = 40;
/// Where the tag of the boot (u64, see [`boot_tag`]) of the last process that opened the
/// replica lives: another boot's tag means the page cache it wrote through is gone.
const BOOT_AT: u64 = 48;
/// Where the descriptor (a u32 length, then JSON) starts in the header.
const DESCRIPTOR_AT: u64 = 64;
/// Bits of a version below the epoch.
const SEQ_BITS: u32 = 40;

/// A tag of the running kernel's boot (from `/proc/sys/kernel/random/boot_id`; never
/// 0): a replica last opened under another tag lost its page cache since.
pub fn boot_tag() -> u64 {
    static TAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TAG.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let id = match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/sys/kernel/random/boot_id: a reboot of this host will not be told from a restart of the node");
                String::new()
            }
        };
        let h = Sha256::digest(id.trim().as_bytes());
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes")).max(1)
    })
}

/// Failpoint `lose-unsynced`: makes the version file at `path` look last opened in
/// another boot, as after a real power cut.
pub fn forget_boot(path: &Path) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&0u64.to_le_bytes(), BOOT_AT)?;
    Ok(())
}

/// The first version a coordinator of `epoch` hands out.
pub fn first_version(epoch: u64) -> u64 {
    (epoch << SEQ_BITS) + 1
}

/// The epoch a version was assigned in.
pub fn epoch_of(version: u64) -> u64 {
    version >> SEQ_BITS
}

/// Regions touched by the byte range `[offset, offset + len)`.
pub fn regions_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / REGION_BYTES..(offset + len - 1) / REGION_BYTES + 1
}

/// What a replica says about itself: enough to rebuild its volume's record when the
/// cluster metadata is lost (`shoal cluster recover`). Written when a coordinator opens
/// the replica, from the volume record the replica's own node read.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    pub cluster_id: String,
    pub cluster_uuid: String,
    pub volume_id: String,
    pub name: String,
    pub size_bytes: u64,
    pub repl: u32,
    pub block_size: u32,
    pub fs: String,
    pub shared: bool,
    pub io_priority: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub formatted: bool,
    pub created_unix: u64,
}

/// The version file of one replica. See the module doc.
pub struct RegionVersions {
    file: File,
    epoch: AtomicU64,
    /// The highest completion watermark a coordinator sent: every version below it was
    /// on every in-sync replica when it was sent. Written to the header at each sync.
    complete_below: AtomicU64,
    /// Serializes epoch changes (rare) so the header is written in order.
    epoch_lock: Mutex<()>,
}

impl RegionVersions {
    /// Opens the version file at `path`; `create` makes it when missing. Without
    /// `create`, a missing file is [`Error::ReplicaMissing`]: versions that were lost are
    /// never silently replaced by zeros.
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ReplicaMissing(format!(
                    "version file {} is missing",
                    path.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let mut header = [0u8; 32];
        let n = file.read_at(&mut header, 0)?;
        let (epoch, complete_below) = if n == 0 {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            file.write_all_at(&h, 0)?;
            file.sync_data()?;
            (0, 0)
        } else {
            let corrupt = |why: &str| Error::CorruptRecord {
                key: path.display().to_string(),
                reason: why.to_string(),
            };
            if n < 24 || &header[..8] != MAGIC {
                return Err(corrupt("not a Shoal version file"));
            }
            let v = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            if v > FORMAT_VERSION {
                return Err(corrupt(&format!(
                    "format version {v} is newer than this node understands"
                )));
            }
            let epoch = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
            // A file written before the watermark existed has none (reads as 0).
            let complete = if n >= 32 {
                u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"))
            } else {
                0
            };
            (epoch, complete)
        };
        Ok(Self {
            file,
            epoch: AtomicU64::new(epoch),
            complete_below: AtomicU64::new(complete_below),
            epoch_lock: Mutex::new(()),
        })
    }

    /// The highest coordinator epoch this replica has accepted.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Accepts a request of `epoch`: refuses one older than the replica's, and records a
    /// newer one durably (fencing every older coordinator from then on).
    pub fn admit(&self, epoch: u64) -> Result<()> {
        let cur = self.epoch();
        if epoch < cur {
            return Err(Error::FailedPrecondition(format!(
                "stale epoch {epoch}: this replica follows epoch {cur}"
            )));
        }
        if epoch > cur {
            let _g = self.epoch_lock.lock().expect("epoch lock");
            if epoch > self.epoch() {
                self.file.write_all_at(&epoch.to_le_bytes(), 16)?;
                self.file.sync_data()?;
                self.epoch.store(epoch, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Accepts a data change (write, discard, flush) of `epoch`: only the epoch this
    /// replica was opened at. An older one is a deposed coordinator; a newer one never
    /// opened (fenced) the replica, so it is not a coordinator the volume record named.
    pub fn check_epoch(&self, epoch: u64) -> Result<()> {
        let cur = self.epoch();
        if epoch < cur {
            return Err(Error::FailedPrecondition(format!(
                "stale epoch {epoch}: this replica follows epoch {cur}"
            )));
        }
        if epoch > cur {
            return Err(Error::FailedPrecondition(format!(
                "epoch {epoch} never opened this replica (it follows epoch {cur})"
            )));
        }
        Ok(())
    }

    /// Writes the replica's descriptor into the header, durably.
    pub fn set_descriptor(&self, d: &Descriptor) -> Result<()> {
        let mut json = serde_json::to_vec(d).expect("descriptors always serialize");
        if json.len() as u64 > HEADER_BYTES - DESCRIPTOR_AT - 4 {
            // Labels are the only unbounded part: a replica describes itself without them.
            let mut small = d.clone();
            small.labels.clear();
            json = serde_json::to_vec(&small).expect("descriptors always serialize");
        }
        if json.len() as u64 > HEADER_BYTES - DESCRIPTOR_AT - 4 {
            return Err(Error::InvalidArgument(
                "volume descriptor does not fit the replica header".into(),
            ));
        }
        let mut buf = (json.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&json);
        self.file.write_all_at(&buf, DESCRIPTOR_AT)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Marks the replica as being caught up (or no longer), durably. A replica that is
    /// marked may lack regions below its highest version; recovery never counts it in
    /// sync. Set before a resync copies anything, cleared after the replica rejoined the
    /// in-sync set.
    pub fn set_catching_up(&self, on: bool) -> Result<()> {
        if on {
            if self.catching_up()? {
                return Ok(());
            }
            self.file
                .write_all_at(&1u64.to_le_bytes(), CATCHING_UP_AT)?;
        } else {
            if !self.catching_up()? && self.reboot_below()?.is_none() {
                return Ok(());
            }
            // Caught up: a reboot recorded before is dealt with too.
            self.file.write_all_at(&[0u8; 16], CATCHING_UP_AT)?;
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// Marks the replica as catching up because its host rebooted (its page cache, with
    /// writes not yet synced, is gone, and what reached disk may be torn between data and
    /// versions): durably, with the watermark it surely holds below (`durable_below`,
    /// the one its last sync wrote), so whoever resyncs it starts there at the latest.
    /// Cleared with the catching-up mark.
    pub fn flag_reboot(&self, durable_below: u64, boot: u64) -> Result<()> {
        // One write, one sync: the mark, the watermark, and the boot it was found in.
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&1u64.to_le_bytes());
        // Kept plus one: 0 means no reboot is recorded.
        b[8..16].copy_from_slice(&(durable_below + 1).to_le_bytes());
        b[16..].copy_from_slice(&boot.to_le_bytes());
        self.file.write_all_at(&b, CATCHING_UP_AT)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// The watermark [`RegionVersions::flag_reboot`] recorded, while the catching-up mark
    /// lasts (a build that cleared the mark without it left it behind: ignored).
    pub fn reboot_below(&self) -> Result<Option<u64>> {
        if !self.catching_up()? {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        let n = self.file.read_at(&mut b, REBOOT_BELOW_AT)?;
        let v = if n == 8 { u64::from_le_bytes(b) } else { 0 };
        Ok(v.checked_sub(1))
    }

    /// Forgets a reboot recorded by [`RegionVersions::flag_reboot`] (its resync copied
    /// everything since), durably; the catching-up mark stays until it rejoined.
    pub fn clear_reboot(&self) -> Result<()> {
        let mut b = [0u8; 8];
        let n = self.file.read_at(&mut b, REBOOT_BELOW_AT)?;
        if n < 8 || b == [0u8; 8] {
            return Ok(());
        }
        self.file.write_all_at(&[0u8; 8], REBOOT_BELOW_AT)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// The boot tag recorded by the last process that opened the replica (0: none).
    pub fn boot(&self) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = self.file.read_at(&mut b, BOOT_AT)?;
        Ok(if n == 8 { u64::from_le_bytes(b) } else { 0 })
    }

    /// Records `tag` as the boot this replica is used in, durably.
    pub fn set_boot(&self, tag: u64) -> Result<()> {
        self.file.write_all_at(&tag.to_le_bytes(), BOOT_AT)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// See [`RegionVersions::set_catching_up`].
    pub fn catching_up(&self) -> Result<bool> {
        let mut b = [0u8; 8];
        let n = self.file.read_at(&mut b, CATCHING_UP_AT)?;
        Ok(n == 8 && u64::from_le_bytes(b) != 0)
    }

    /// The replica's descriptor (None: written by a build before descriptors existed).
    pub fn descriptor(&self) -> Result<Option<Descriptor>> {
        let mut len = [0u8; 4];
        if self.file.read_at(&mut len, DESCRIPTOR_AT)? < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(len) as u64;
        if len == 0 {
            return Ok(None);
        }
        if len > HEADER_BYTES - DESCRIPTOR_AT - 4 {
            return Err(Error::CorruptRecord {
                key: "replica header".into(),
                reason: format!("descriptor length {len} is past the header"),
            });
        }
        let mut json = vec![0u8; len as usize];
        self.file.read_exact_at(&mut json, DESCRIPTOR_AT + 4)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| Error::CorruptRecord {
                key: "replica header".into(),
                reason: format!("descriptor: {e}"),
            })
    }

    /// The highest version of any region (0: never written).
    pub fn max_version(&self) -> Result<u64> {
        Ok(self
            .newer_than(0)?
            .into_iter()
            .map(|(_, v)| v)
            .max()
            .unwrap_or(0))
    }

    /// The version of one region (0 if never written).
    pub fn get(&self, region: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = self.file.read_at(&mut b, HEADER_BYTES + region * 8)?;
        Ok(if n == 8 { u64::from_le_bytes(b) } else { 0 })
    }

    /// Sets regions to `version` (callers hold the region's lock).
    pub fn set(&self, regions: std::ops::Range<u64>, version: u64, keep_newer: bool) -> Result<()> {
        for r in regions {
            if keep_newer && self.get(r)? >= version {
                continue;
            }
            self.file
                .write_all_at(&version.to_le_bytes(), HEADER_BYTES + r * 8)?;
        }
        Ok(())
    }

    /// Makes every recorded version durable, and the completion watermark with them.
    /// `durable`: the watermark to record, known before the data it covers was synced.
    pub fn sync(&self, durable: u64) -> Result<()> {
        let w = durable;
        self.file.write_all_at(&w.to_le_bytes(), 24)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Makes the recorded versions durable and leaves the header's watermark as it was:
    /// for versions written ahead of data that is not durable yet.
    pub fn sync_entries(&self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    /// Notes a coordinator's completion watermark (see `complete_below`); only raises it.
    pub fn note_complete(&self, below: u64) {
        self.complete_below.fetch_max(below, Ordering::AcqRel);
    }

    /// The highest completion watermark any coordinator sent (0: none known). A fact
    /// that stays true: every version below it reached every replica then in sync.
    pub fn complete_below(&self) -> u64 {
        self.complete_below.load(Ordering::Acquire)
    }

    /// Every region whose version is above `after`, in ascending order, with its version.
    /// Skips holes in the file, so the cost follows the written part of the volume.
    pub fn newer_than(&self, after: u64) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let len = self.file.metadata()?.len();
        let mut out = Vec::new();
        let mut pos = HEADER_BYTES;
        let mut buf = vec![0u8; 64 << 10];
        while pos < len {
            // SAFETY: lseek on our own descriptor has no memory-safety preconditions.
            let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: only holes remain
            }
            let data = (data as u64).max(HEADER_BYTES);
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
            let end = if hole < 0 { len } else { hole as u64 };
            let mut at = data - (data - HEADER_BYTES) % 8;
            while at < end {
                let want = ((end - at) as usize).min(buf.len());
                let n = self.file.read_at(&mut buf[..want], at)?;
                if n == 0 {
                    break;
                }
                for (i, chunk) in buf[..n - n % 8].chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                    if v > after {
                        out.push(((at - HEADER_BYTES) / 8 + i as u64, v));
                    }
                }
                at += (n - n % 8) as u64;
                if n % 8 != 0 {
                    break;
                }
            }
            pos = end.max(at);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_epoch_first() {
        assert!(first_version(2) > first_version(1) + 1_000_000);
        assert_eq!(epoch_of(first_version(7) + 99), 7);
    }

    #[test]
    fn regions_of_a_range() {
        assert_eq!(regions_of(0, 1), 0..1);
        assert_eq!(regions_of(0, REGION_BYTES), 0..1);
        assert_eq!(regions_of(REGION_BYTES - 1, 2), 0..2);
        assert_eq!(regions_of(5 * REGION_BYTES, 3 * REGION_BYTES), 5..8);
        assert_eq!(regions_of(9, 0), 0..0);
    }

    #[test]
    fn records_scans_and_fences() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.ver");
        let v = RegionVersions::open(&p, true).unwrap();
        assert_eq!(v.get(5).unwrap(), 0);
        v.set(3..4, 10, true).unwrap();
        v.set(100_000..100_002, 20, true).unwrap();
        v.set(3..4, 5, true).unwrap(); // older: kept at 10
        assert_eq!(v.get(3).unwrap(), 10);
        assert_eq!(
            v.newer_than(0).unwrap(),
            vec![(3, 10), (100_000, 20), (100_001, 20)]
        );
        assert_eq!(
            v.newer_than(10).unwrap(),
            vec![(100_000, 20), (100_001, 20)]
        );
        v.set(3..4, 1, false).unwrap(); // forced (resync copy)
        assert_eq!(v.get(3).unwrap(), 1);

        v.admit(3).unwrap();
        assert!(v.admit(2).is_err(), "older epoch refused");
        drop(v);
        let v = RegionVersions::open(&p, true).unwrap();
        assert_eq!(v.epoch(), 3, "epoch survives reopen");
        assert!(v.admit(2).unwrap_err().to_string().contains("stale epoch"));
        assert_eq!(v.get(100_001).unwrap(), 20);
    }

    #[test]
    fn the_completion_watermark_only_rises_and_survives_a_sync_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.ver");
        let v = RegionVersions::open(&p, true).unwrap();
        assert_eq!(v.complete_below(), 0);
        v.note_complete(50);
        v.note_complete(40); // an older write's watermark arriving late
        assert_eq!(v.complete_below(), 50);
        v.sync(v.complete_below()).unwrap();
        v.note_complete(60); // not synced: may be lost, which only widens a reconcile
        drop(v);
        let v = RegionVersions::open(&p, true).unwrap();
        assert_eq!(v.complete_below(), 50);
        assert_eq!(v.epoch(), 0, "the watermark does not touch the epoch");
    }
}
