//! A coordinator's open of a replica (the fence, and what a restart or a reboot of its
//! host leaves it owing), the catching-up and reboot marks, and what a replica says
//! about itself for recovery.

use super::*;

impl Pool {
    /// Fences the replica at `epoch` (refusing older coordinators from now on) and
    /// returns the epoch it follows and its completion watermark. Writes below
    /// `min_version` are refused from now on (0 leaves that as it is).
    ///
    /// A missing replica is made (empty, sparse) only with `create`: for a volume never
    /// opened before, or a replica out of sync that is about to be resynced. Otherwise
    /// it is reported [`OpenState::Missing`] and nothing is made, so lost data is never
    /// replaced by an empty file that counts as in sync. `desc`, when given, is written
    /// into the replica's header (see [`Descriptor`]).
    pub fn open_replica(
        &self,
        volume_id: &str,
        size: u64,
        epoch: u64,
        min_version: u64,
        create: bool,
        desc: Option<&Descriptor>,
    ) -> Result<Opened> {
        let (r, created) = match self.replica_created(volume_id, size, create) {
            Ok(rc) => rc,
            Err(Error::ReplicaMissing(_)) => {
                return Ok(Opened {
                    epoch: 0,
                    complete_below: 0,
                    state: OpenState::Missing,
                    reboot_below: None,
                })
            }
            Err(e) => return Err(e),
        };
        {
            // Only a fence at a newer epoch (a new coordinator, which reconciles or
            // resyncs what it opens), a replica made just now, or one its resync is
            // about to copy into (`allow_reopen`) counts as opened in this process. A
            // same-epoch open (a write floor) of a replica whose node restarted must not
            // let it back in with what it lost.
            let mut opened = self.opened.lock().expect("opened lock");
            let before = r.versions.epoch();
            let fence = epoch > before;
            if !fence && !created && !opened.contains(volume_id) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id}: {RESTARTED}; it must be resynced"
                )));
            }
            r.versions.admit(epoch)?;
            // Last used in another boot, its page cache is gone: unsynced writes lost,
            // and data and versions possibly torn apart on disk. At its first open in
            // this boot (nothing wrote to it yet, so its watermark is still the one its
            // last sync wrote) it is marked, durably and before anything else, so no
            // coordinator counts it in sync and every resync of it starts from that
            // watermark at the latest; the mark outlives a crash of whoever opened it.
            // Before the mark, the regions its activity log names are raised, so the
            // ones whose data reached the disk without their version are compared too.
            let boot = crate::versions::boot_tag();
            if r.versions.boot()? != boot {
                if created {
                    r.activity.forget(&r.activity.idle())?;
                    r.versions.set_boot(boot)?;
                } else {
                    // Taken first: a same-epoch write let in by `allow_reopen` may log an
                    // extent meanwhile, and keeps it.
                    let idle = r.activity.idle();
                    let raised = Self::raise_suspects(&r, size, before)?;
                    r.activity.forget(&idle)?;
                    let durable = r.versions.complete_below();
                    warn!(volume = volume_id, durable, raised, "replica last used before this host rebooted: it is resynced before it counts in sync");
                    r.versions.flag_reboot(durable, boot)?;
                }
            } else if r.activity.lost() {
                // A replica without a valid log (made by an older build, or its log
                // never written) in the boot it was written in: what it holds unsynced
                // is still in this boot's page cache, so one sync makes an empty log
                // true.
                let idle = r.activity.idle();
                let durable = r.versions.complete_below();
                r.file.sync_data()?;
                r.versions.sync(durable)?;
                r.activity.forget(&idle)?;
            }
            opened.insert(volume_id.to_string());
        }
        if let Some(d) = desc {
            // A torn or unreadable descriptor is written again, never a reason to refuse.
            if r.versions.descriptor().ok().flatten().as_ref() != Some(d) {
                r.versions.set_descriptor(d)?;
            }
        }
        // Under every stripe: no write passes the check while the floor moves.
        let all = r.lock(0..STRIPES as u64);
        r.floor.fetch_max(min_version, Ordering::SeqCst);
        drop(all);
        self.synced(volume_id);
        Ok(Opened {
            epoch: r.versions.epoch(),
            complete_below: r.versions.complete_below(),
            reboot_below: r.versions.reboot_below()?,
            state: if created {
                OpenState::Created
            } else {
                OpenState::Existing
            },
        })
    }

    /// After a reboot: every region that may hold a write its version does not account
    /// for (those of the extents in the activity log, or every written one when the log
    /// is lost), if it holds data or a version, gets the version just below the first of
    /// the epoch after `epoch` (the one the replica followed): above anything it was
    /// sent, below anything a newer coordinator sends. Durable on return; how many.
    pub(super) fn raise_suspects(r: &ReplicaFile, size: u64, epoch: u64) -> Result<usize> {
        let size = size.max(r.file.metadata()?.len());
        let last = size.div_ceil(REGION_BYTES);
        let suspects: Vec<u64> = match r.activity.suspects() {
            Some(extents) => {
                let mut v: Vec<u64> = extents
                    .into_iter()
                    .flat_map(crate::activity::regions_of_extent)
                    .filter(|g| *g < last)
                    .collect();
                v.sort_unstable();
                v
            }
            None => {
                let mut v: std::collections::BTreeSet<u64> = r
                    .versions
                    .newer_than(0)?
                    .into_iter()
                    .map(|(g, _)| g)
                    .collect();
                v.extend(data_regions(&r.file, size)?);
                v.into_iter().collect()
            }
        };
        let raise = crate::versions::first_version(epoch + 1) - 1;
        let mut raised = 0;
        for g in suspects {
            let (start, len) = Self::region_range(size, g)?;
            if r.versions.get(g)? != 0 || hole_bytes(&r.file, start, len)? < len {
                r.versions.set(g..g + 1, raise, false)?;
                raised += 1;
            }
        }
        if raised > 0 {
            r.versions.sync_entries()?;
        }
        Ok(raised)
    }

    /// Failpoint `lose-unsynced` ([`crate::powerloss`]): the replica is durable now.
    pub(super) fn synced(&self, volume_id: &str) {
        if crate::powerloss::enabled() {
            crate::powerloss::synced(&self.dir, volume_id);
        }
    }

    /// Failpoint `lose-unsynced`: drops every write not synced (see
    /// [`crate::powerloss::power_off`]); the caller ends the process at once.
    pub fn power_off(&self) -> usize {
        crate::powerloss::power_off(&self.dir)
    }

    /// Lets the next open at the current epoch count as opened in this process: the
    /// replica's resync is about to copy into it (see [`Pool::open_replica`]).
    pub fn allow_reopen(&self, volume_id: &str) {
        self.opened
            .lock()
            .expect("opened lock")
            .insert(volume_id.to_string());
    }

    /// Forgets the replica's recorded reboot (see
    /// [`crate::versions::RegionVersions::clear_reboot`]).
    pub fn clear_reboot(&self, volume_id: &str) -> Result<()> {
        self.replica(volume_id, 0, false)?.versions.clear_reboot()?;
        self.synced(volume_id);
        Ok(())
    }

    /// Marks a replica as being caught up, or no longer (see
    /// [`RegionVersions::set_catching_up`]).
    pub fn set_catching_up(&self, volume_id: &str, on: bool) -> Result<()> {
        self.replica(volume_id, 0, false)?
            .versions
            .set_catching_up(on)?;
        self.synced(volume_id);
        Ok(())
    }

    /// What a replica file says about itself, for recovery: its descriptor (None when
    /// written before descriptors existed), epoch, completion watermark, highest version.
    pub fn describe(&self, volume_id: &str) -> Result<Described> {
        let r = self.replica(volume_id, 0, false)?;
        Ok(Described {
            descriptor: r.versions.descriptor()?,
            catching_up: r.versions.catching_up()?,
            rebooted: r.versions.reboot_below()?.is_some()
                || r.versions.boot()? != crate::versions::boot_tag(),
            epoch: r.versions.epoch(),
            complete_below: r.versions.complete_below(),
            max_version: r.versions.max_version()?,
        })
    }
}
