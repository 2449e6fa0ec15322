//! Whole-region operations (the copies of resync and reconcile and their listings),
//! flush and discard.

use super::*;

/// Extents (of 16 MiB) a discard may span and still go through the activity log; a
/// wider one syncs its versions before it punches.
const WIDE_DISCARD: usize = 128;

impl Pool {
    /// Regions whose version is above `after`, with their versions.
    pub fn changed_regions(
        &self,
        volume_id: &str,
        size: u64,
        after: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let r = self.replica(volume_id, size, false)?;
        self.check_opened(volume_id)?;
        r.versions.newer_than(after)
    }

    /// Byte range of a region, clipped to the volume size.
    pub(super) fn region_range(size: u64, region: u64) -> Result<(u64, u64)> {
        let start = region
            .checked_mul(REGION_BYTES)
            .filter(|s| *s < size)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("region {region} is beyond the volume"))
            })?;
        Ok((start, REGION_BYTES.min(size - start)))
    }

    /// Reads one whole region with its version, consistently.
    pub fn read_region(&self, volume_id: &str, size: u64, region: u64) -> Result<(Vec<u8>, u64)> {
        let (start, len) = Self::region_range(size, region)?;
        let r = self.replica(volume_id, size, false)?;
        // A resync or reconcile source whose node restarted may have lost what it says
        // it holds.
        self.check_opened(volume_id)?;
        let _g = r.lock(region..region + 1);
        let data = Self::read_from(&r, start, len as u32)?;
        Ok((data, r.versions.get(region)?))
    }

    /// Replaces one whole region and its version (a resync copy). A region of zeros is
    /// stored as a hole, so resync keeps a replica thin.
    pub fn write_region(
        &self,
        volume_id: &str,
        size: u64,
        region: u64,
        data: &[u8],
        stamp: Stamp,
    ) -> Result<()> {
        let (start, len) = Self::region_range(size, region)?;
        if data.len() as u64 != len {
            return Err(Error::InvalidArgument(format!(
                "region {region} needs {len} bytes, got {}",
                data.len()
            )));
        }
        let r = self.replica(volume_id, size, false)?;
        let g = r.lock(region..region + 1);
        r.versions.check_epoch(stamp.epoch)?;
        self.check_opened(volume_id)?;
        let noted = r
            .activity
            .note(start, len, || self.sync_whole(&r, volume_id))?;
        let zeros = data.iter().all(|b| *b == 0);
        if zeros {
            punch(&r.file, start, len)?;
        } else {
            self.reserve(&r, start, len)?;
            let res = r.file.write_all_at(data, start);
            res.map_err(|e| self.io_error(e))?;
        }
        self.account(&r)?;
        r.versions.set(region..region + 1, stamp.version, false)?;
        drop(noted);
        drop(g);
        if !zeros {
            // Outside the region lock: this may wait for an older range's write-out.
            r.writeback.after_write(&r.file, start, len);
        }
        Ok(())
    }

    /// Makes every write to the replica (data and versions) durable.
    /// `complete_below` is the coordinator's completion watermark (0: none), kept with
    /// the versions.
    pub fn flush(&self, volume_id: &str, size: u64, epoch: u64, complete_below: u64) -> Result<()> {
        // A flush of a missing replica fails: "durable" must not be said of lost data.
        let r = self.replica(volume_id, size, false)?;
        r.versions.check_epoch(epoch)?;
        self.check_opened(volume_id)?;
        r.versions.note_complete(complete_below);
        self.sync_whole(&r, volume_id)
    }

    /// Gives a range's space back to the pool; it reads as zeros afterwards.
    pub fn discard(
        &self,
        volume_id: &str,
        size: u64,
        offset: u64,
        len: u64,
        stamp: Stamp,
    ) -> Result<()> {
        Self::check_range(size, offset, len)?;
        let r = self.replica(volume_id, size, false)?;
        let regions = regions_of(offset, len);
        let _g = r.lock(regions.clone());
        r.versions.check_epoch(stamp.epoch)?;
        self.check_opened(volume_id)?;
        Self::refuse_late(&r, stamp)?;
        let cold = crate::activity::extents_of(offset, len).count() > WIDE_DISCARD
            && !r.activity.covers(offset, len);
        if cold {
            // Too wide for the log (a mkfs discards the whole volume): the versions are
            // made durable first, so a power cut can only leave versions that claim a
            // discard the disk does not hold, which a resync or reconcile compares.
            r.versions.set(regions, stamp.version, true)?;
            r.versions.note_complete(stamp.complete_below);
            r.versions.sync_entries()?;
            punch(&r.file, offset, len)?;
            return self.account(&r);
        }
        let noted = r
            .activity
            .note(offset, len, || self.sync_whole(&r, volume_id))?;
        punch(&r.file, offset, len)?;
        r.versions.set(regions, stamp.version, true)?;
        r.versions.note_complete(stamp.complete_below);
        drop(noted);
        self.account(&r)
    }
}
