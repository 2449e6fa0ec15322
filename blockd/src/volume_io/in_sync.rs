//! The in-sync set of a volume, as its coordinator keeps it: what a round of replica
//! answers does to it (`settle`), replicas leaving it (in the record, before any ack),
//! and replicas being caught up and rejoining it.

use super::*;

impl VolumeIo {
    /// Acts on the answers of the in-sync replicas (and of those catching up): a
    /// degraded outcome removes the failed replicas from the in-sync set in the
    /// metadata store before returning Ok. `watermark` overrides the version recorded
    /// as held by the replicas that left.
    pub(super) fn settle(&self, answers: Vec<Answer>, watermark: Option<u64>) -> Result<()> {
        let sets = self.sets.read().expect("sets lock").clone();
        let mut in_sync_answers = Vec::new();
        for (node, res) in answers {
            if sets.in_sync.contains(&node) {
                in_sync_answers.push((node, res));
            } else if let Err(e) = res {
                // A replica being caught up failed: its resync stops and starts over later.
                warn!(volume = %self.volume_id, %node, error = %e, "catch-up write failed");
                self.sets
                    .write()
                    .expect("sets lock")
                    .catching_up
                    .remove(&node);
            }
        }
        // A replica whose node restarted since it was opened may have lost what it had
        // not flushed: it leaves holding only what the last complete flush made durable.
        let restarted: Vec<String> = in_sync_answers
            .iter()
            .filter(|(_, r)| matches!(r, Err(e) if e.to_string().contains(RESTARTED)))
            .map(|(n, _)| n.clone())
            .collect();
        if !restarted.is_empty() {
            self.leave_restarted(&restarted, "write")?;
        }
        let summary: Vec<(String, Result<(), String>)> = in_sync_answers
            .iter()
            .map(|(n, r)| (n.clone(), r.as_ref().map(|_| ()).map_err(|e| e.to_string())))
            .collect();
        match replication::outcome(&summary) {
            Outcome::Complete => Ok(()),
            Outcome::Degraded { failed } => {
                for (n, r) in &in_sync_answers {
                    if let Err(e) = r {
                        warn!(volume = %self.volume_id, node = %n, error = %e, "replica failed; leaving the in-sync set");
                    }
                }
                // A replica that stopped answering may have lost power, and with it what
                // it acknowledged but had not flushed: it holds at most what the last
                // complete flush made durable. (At open the caller's watermark already
                // goes back to the previous epoch, whose writes were flushed by the
                // open that ended it.)
                let at = watermark.unwrap_or_else(|| {
                    let min = self.inflight.lock().expect("inflight").first().copied();
                    replication::left_at(min, self.next_version()).min(self.last_flush())
                });
                self.remove_from_in_sync(&failed, at)
            }
            Outcome::Failed { errors } => {
                warn!(volume = %self.volume_id, ?errors, "every in-sync replica failed");
                // The first replica's own error, so ENOSPC stays ENOSPC for the writer.
                let first = in_sync_answers.into_iter().find_map(|(_, r)| r.err());
                Err(first.unwrap_or_else(|| Error::Internal("no in-sync replica".into())))
            }
        }
    }

    /// The highest version every in-sync replica holds durably: below the watermark of
    /// the last complete flush.
    pub(super) fn last_flush(&self) -> u64 {
        self.flushed_below.load(Ordering::SeqCst).saturating_sub(1)
    }

    /// `nodes` answered (to a `cause` request) that their node restarted since this
    /// coordinator opened them: what they had not flushed may be lost, so they leave the
    /// in-sync set holding only what the last flush made durable.
    pub(super) fn leave_restarted(&self, nodes: &[String], cause: &str) -> Result<()> {
        let left_at = self.last_flush();
        warn!(volume = %self.volume_id, ?nodes, cause, left_at, "replica node restarted: resynced from the last flush");
        self.remove_from_in_sync(nodes, left_at)
    }

    /// Records in the metadata store that `failed` left the in-sync set, holding every
    /// version up to `at`. Refuses if this coordinator is no longer the volume's.
    pub(crate) fn remove_from_in_sync(&self, failed: &[String], at: u64) -> Result<()> {
        let key = self.keys.volume(&self.volume_id);
        let epoch = self.epoch;
        let me = self.local_node.clone();
        let meta = self.meta.clone();
        let failed_owned = failed.to_vec();
        let upkeep = self.upkeep.load(Ordering::SeqCst);
        let result: Result<()> = self.rt.block_on(async move {
            loop {
                let kv = meta
                    .get(&key)
                    .await?
                    .ok_or_else(|| Error::NotFound("volume record".into()))?;
                let mut rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
                let owner = (!upkeep).then_some(me.as_str());
                if rec.epoch != epoch || rec.attached_node.as_deref() != owner {
                    return Err(Error::Fenced(format!(
                        "this node is no longer the coordinator (epoch {} now, ours {epoch})",
                        rec.epoch
                    )));
                }
                let mut in_sync = rec.in_sync();
                in_sync.retain(|n| !failed_owned.contains(n));
                if in_sync.is_empty() {
                    return Err(Error::Internal("no in-sync replica would remain".into()));
                }
                for n in &failed_owned {
                    let e = rec.left_at.entry(n.clone()).or_insert(at);
                    *e = (*e).min(at);
                    rec.resync.remove(n);
                }
                rec.in_sync = Some(in_sync);
                if meta.put_if(&key, &records::encode(&rec), kv.rev).await? {
                    return Ok(());
                }
            }
        });
        match result {
            Ok(()) => {
                let mut sets = self.sets.write().expect("sets lock");
                for n in failed {
                    sets.in_sync.remove(n);
                }
                info!(volume = %self.volume_id, failed = ?failed, left_at = at, "volume degraded");
                Ok(())
            }
            Err(e) => {
                if matches!(e, Error::Fenced(_)) {
                    self.fence();
                }
                warn!(volume = %self.volume_id, error = %e, "cannot record a failed replica; failing the write");
                Err(Error::Internal(format!(
                    "a replica failed and its removal from the in-sync set could not be recorded: {e}"
                )))
            }
        }
    }

    /// Starts sending every new write to `node` too (a resync begins). Returns the
    /// version from which on it receives writes: waits for writes in flight to finish,
    /// so every earlier version is already on the source replicas.
    pub fn catch_up(&self, node: &str) -> u64 {
        let _b = self.barrier.write().expect("barrier");
        self.sets
            .write()
            .expect("sets lock")
            .catching_up
            .insert(node.to_string());
        self.next_version()
    }

    /// Stops sending writes to a replica whose resync gave up.
    pub fn stop_catch_up(&self, node: &str) {
        self.sets
            .write()
            .expect("sets lock")
            .catching_up
            .remove(node);
    }

    /// Returns a caught-up replica to the in-sync set: the metadata store first (through
    /// a conditional update that checks this coordinator's epoch), then the local sets,
    /// with no write in flight in between. `bytes` is what its resync copied.
    pub fn rejoin(&self, node: &str, bytes: u64) -> Result<()> {
        let _b = self.barrier.write().expect("barrier");
        if !self.is_catching_up(node) {
            return Err(Error::FailedPrecondition(format!(
                "replica on {node} missed a write during its resync"
            )));
        }
        let key = self.keys.volume(&self.volume_id);
        let (meta, epoch, node_s) = (self.meta.clone(), self.epoch, node.to_string());
        let joined: Result<()> = self.rt.block_on(async move {
            loop {
                let kv = meta
                    .get(&key)
                    .await?
                    .ok_or_else(|| Error::NotFound("volume record".into()))?;
                let mut rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
                if rec.epoch != epoch {
                    return Err(Error::Fenced("coordinator replaced".into()));
                }
                if !rec.replicas.contains(&node_s) {
                    return Err(Error::FailedPrecondition(format!(
                        "node {node_s} no longer holds a replica"
                    )));
                }
                let mut in_sync = rec.in_sync();
                if !in_sync.contains(&node_s) {
                    in_sync.push(node_s.clone());
                }
                rec.in_sync = Some(in_sync);
                rec.left_at.remove(&node_s);
                rec.resync.remove(&node_s);
                rec.resync_bytes.insert(node_s.clone(), bytes);
                if meta.put_if(&key, &records::encode(&rec), kv.rev).await? {
                    return Ok(());
                }
            }
        });
        if let Err(e) = joined {
            // The update may have been applied even though the answer was lost: make sure
            // the record does not claim a replica in sync that this coordinator leaves out.
            if matches!(e, Error::Fenced(_)) {
                self.fence();
            } else {
                let _ = self.remove_from_in_sync(&[node.to_string()], self.next_version() - 1);
            }
            return Err(e);
        }
        let mut sets = self.sets.write().expect("sets lock");
        sets.catching_up.remove(node);
        sets.in_sync.insert(node.to_string());
        info!(volume = %self.volume_id, %node, bytes, "replica back in sync");
        Ok(())
    }
}
