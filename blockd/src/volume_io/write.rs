//! Writes, discards and flushes of a volume's coordinator: each change gets its version,
//! goes to every replica that must have it (in sync or being caught up), and is
//! acknowledged once every in-sync replica has it.

use super::*;

impl VolumeIo {
    /// The replicas a write goes to: in sync, and those being caught up.
    pub(super) fn write_set(&self) -> BTreeSet<String> {
        let s = self.sets.read().expect("sets lock");
        s.in_sync.union(&s.catching_up).cloned().collect()
    }

    /// Runs one versioned change under the barrier and region locks.
    pub(super) fn versioned<F, Fut>(
        &self,
        offset: u64,
        len: u64,
        call: impl Fn(Stamp) -> F,
        local: impl FnOnce(Stamp) -> Result<()>,
        on_cache: impl FnOnce(&ReadCache, bool),
    ) -> Result<()>
    where
        F: Fn(&str, PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        self.check_fenced()?;
        let _barrier = self.barrier.read().expect("barrier");
        let _range = self.lock_range(offset, len);
        // The oldest write not finished everywhere (this one at the latest): every
        // version below it is on every in-sync replica. Replicas keep it, so a successor
        // of this coordinator reconciles only what was written from there on. The version
        // is taken under the same lock, so no version handed out is ever missing from
        // `inflight` while a watermark (here or in `flush`) is computed.
        let (version, complete_below) = {
            let mut inflight = self.inflight.lock().expect("inflight");
            let version = self.next_version.fetch_add(1, Ordering::SeqCst);
            inflight.insert(version);
            (version, *inflight.first().expect("just inserted"))
        };
        let stamp = Stamp {
            epoch: self.epoch,
            version,
            complete_below,
        };
        let targets = self.write_set();
        self.raise_pending_floors(&targets)?;
        let answers = self.fan_out_sized(&targets, call(stamp), || local(stamp), len as usize);
        let unanswered: Vec<String> = answers
            .iter()
            .filter(|(n, r)| r.is_err() && *n != self.local_node)
            .map(|(n, _)| n.clone())
            .collect();
        let result = self.settle(answers, None);
        if result.is_err() && !unanswered.is_empty() {
            // Failed everywhere, so no replica left the in-sync set: remember that this
            // write may still arrive late at those that did not answer.
            let mut pending = self.pending_floor.lock().expect("pending floor");
            for n in unanswered {
                let f = pending.entry(n).or_insert(0);
                *f = (*f).max(version + 1);
            }
        }
        if let Some(cache) = &self.cache {
            // Still under the region locks: no read can refill these pages in between.
            on_cache(cache, result.is_ok());
        }
        if result.is_ok() {
            self.inflight.lock().expect("inflight").remove(&version);
        }
        // A failed write stays "in flight" for good: whatever replica leaves the in-sync
        // set later is recorded as holding versions below it, so its region is copied.
        result
    }

    /// Raises the floor of replicas that may still receive a failed write late (see
    /// `pending_floor`) before anything newer is sent to them; fails when one does not
    /// answer (sending a newer write could let the late one overtake it).
    pub(super) fn raise_pending_floors(&self, targets: &BTreeSet<String>) -> Result<()> {
        let due: Vec<(String, u64)> = {
            let pending = self.pending_floor.lock().expect("pending floor");
            targets
                .iter()
                .filter_map(|n| pending.get(n).map(|f| (n.clone(), *f)))
                .collect()
        };
        for (node, floor) in due {
            let Some(mut c) = self.remote(&node) else {
                continue;
            };
            let req = OpenRequest {
                replica: Some(self.replica_ref()),
                epoch: self.epoch,
                min_version: floor,
                mark: 0,
            };
            let timeout = self.timeout;
            let answer = self
                .rt
                .block_on(async move { tokio::time::timeout(timeout, c.open(req)).await });
            match answer {
                Ok(Ok(r)) if r.get_ref().missing => {
                    return Err(Error::ReplicaMissing(format!("replica on node {node}")))
                }
                Ok(Ok(_)) => {
                    let mut pending = self.pending_floor.lock().expect("pending floor");
                    if pending.get(&node) == Some(&floor) {
                        pending.remove(&node);
                    }
                }
                // Its node restarted meanwhile: the late write can no longer arrive (the
                // process that had it is gone), and what it had not flushed may be lost.
                // It leaves the in-sync set from the last flush instead of failing every
                // write from now on.
                Ok(Err(status)) if status.message().contains(RESTARTED) => {
                    self.leave_restarted(std::slice::from_ref(&node), "floor")?;
                    self.pending_floor
                        .lock()
                        .expect("pending floor")
                        .remove(&node);
                }
                Ok(Err(status)) => return Err(Error::from(status)),
                Err(_) => {
                    return Err(Error::NodeUnreachable {
                        node,
                        reason: format!("no answer within {timeout:?} to raise its floor"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` on every replica.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        // The copy the remote calls share; a volume with only a local replica needs none.
        let remote = self
            .replicas()
            .iter()
            .any(|r| matches!(r.target, Target::Remote(_)));
        let payload = if remote {
            Bytes::copy_from_slice(data)
        } else {
            Bytes::new()
        };
        let replica = self.replica_ref();
        let epoch = self.epoch;
        self.versioned(
            offset,
            data.len() as u64,
            |stamp| {
                let payload = payload.clone();
                let replica = replica.clone();
                move |_: &str, c: PeerBlockClient| {
                    let (replica, data) = (replica.clone(), payload.clone());
                    async move {
                        let header = write_wire::Header {
                            replica: &replica,
                            offset,
                            fua,
                            epoch,
                            version: stamp.version,
                            complete_below: stamp.complete_below,
                        };
                        c.write_bytes(&header, data).await
                    }
                }
            },
            |stamp| {
                self.pool
                    .write(&self.volume_id, self.size, offset, data, fua, stamp)
            },
            |cache, ok| {
                if ok {
                    cache.put(offset, data)
                } else {
                    cache.invalidate(offset, data.len() as u64)
                }
            },
        )
    }

    /// Frees a range on every replica.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let replica = Some(self.replica_ref());
        let epoch = self.epoch;
        self.versioned(
            offset,
            len,
            |stamp| {
                let replica = replica.clone();
                move |_: &str, mut c: PeerBlockClient| {
                    let req = DiscardRequest {
                        replica: replica.clone(),
                        offset,
                        length: len,
                        epoch,
                        version: stamp.version,
                        complete_below: stamp.complete_below,
                    };
                    async move { c.discard(req).await.map(|_| ()) }
                }
            },
            |stamp| {
                self.pool
                    .discard(&self.volume_id, self.size, offset, len, stamp)
            },
            |cache, _| cache.invalidate(offset, len),
        )
    }

    /// Makes every acknowledged write durable on every in-sync replica.
    pub fn flush(&self) -> Result<()> {
        self.check_fenced()?;
        let replica = Some(self.replica_ref());
        let epoch = self.epoch;
        // Everything handed out before now that is not in flight is complete: after a
        // flush with nothing in flight (an unmount, a detach) a successor has nothing to
        // reconcile.
        let complete_below = {
            let inflight = self.inflight.lock().expect("inflight");
            inflight
                .first()
                .copied()
                .unwrap_or_else(|| self.next_version())
        };
        let answers = self.fan_out(
            &self.write_set(),
            |_, mut c| {
                let req = FlushRequest {
                    replica: replica.clone(),
                    epoch,
                    complete_below,
                };
                async move { c.flush(req).await.map(|_| ()) }
            },
            || {
                self.pool
                    .flush(&self.volume_id, self.size, epoch, complete_below)
            },
        );
        self.settle(answers, None)?;
        self.flushed_below
            .fetch_max(complete_below, Ordering::SeqCst);
        Ok(())
    }
}
