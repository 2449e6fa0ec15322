//! Resync: bringing a replica that missed writes back into the in-sync set.
//!
//! One worker per attached volume runs on the coordinator. Every second it looks for
//! replicas outside the in-sync set whose node is alive, and catches each up in turn:
//!
//! 1. fence the replica at the coordinator's epoch;
//! 2. start sending it every new write ([`VolumeIo::catch_up`]);
//! 3. copy the regions written since it left — by the versions on an in-sync source
//!    and on the replica itself ([`crate::replication::plan`]) — each under the
//!    coordinator's region lock, so no write races the copy;
//! 4. return it to the in-sync set through a conditional update of the volume record
//!    ([`VolumeIo::rejoin`]).
//!
//! A replica on a new node, or one that never held data, has nothing recorded and gets
//! every written region: a full copy, still thin. Progress (cursor, bytes done and left)
//! is kept in the volume record about once a second, so `inspect` shows it from any node
//! and a resync that stops (target lost again, coordinator restarted) resumes from its
//! cursor instead of starting over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_proto::block::{
    ChangedRequest, FlushRequest, OpenRequest, RegionRequest, WriteRegionRequest,
};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::membership::Membership;
use crate::peers::Peers;
use crate::pool::{OpenState, Stamp};
use crate::records::{self, NodeRecord, ResyncProgress, VolumeRecord};
use crate::replication;
use crate::versions::REGION_BYTES;
use crate::volume_io::{targets, VolumeIo};

/// How often the worker looks for replicas to catch up.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// How often progress is written to the volume record.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Regions a resync copies at the same time (the cursor moves past a batch once all of
/// it is copied).
const COPIES_IN_FLIGHT: usize = 4;

/// What the resync worker needs besides the volume.
pub struct WorkerCtx {
    pub membership: Membership,
    pub peers: Arc<Peers>,
    /// Rebuild a replica elsewhere once its node has been offline this long.
    pub rebuild_after: Duration,
    pub stop: Arc<AtomicBool>,
}

/// Starts the resync worker of an attached volume; it ends when `ctx.stop` is set.
pub fn spawn(io: Arc<VolumeIo>, ctx: WorkerCtx) {
    tokio::spawn(async move {
        let mut down_since: HashMap<String, Instant> = HashMap::new();
        while !ctx.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(SCAN_EVERY).await;
            match follow_record(&io, &ctx, &mut down_since).await {
                Ok(()) => {}
                Err(Error::Fenced(_)) => {
                    io.fence();
                    break;
                }
                Err(e) => {
                    warn!(volume = %io.volume_id, error = %e, "cannot refresh the replica list");
                    continue;
                }
            }
            for node in behind(&io, &ctx.membership) {
                if ctx.stop.load(Ordering::Relaxed) {
                    break;
                }
                match resync_node(&io, &node, ctx.stop.clone()).await {
                    Ok(bytes) => info!(volume = %io.volume_id, %node, bytes, "resync finished"),
                    Err(e) => {
                        warn!(volume = %io.volume_id, %node, error = %e, "resync stopped; will retry")
                    }
                }
            }
        }
    });
}

/// Replicas outside the in-sync set whose node is online: the ones to resync now.
pub(crate) fn behind(io: &VolumeIo, membership: &Membership) -> Vec<String> {
    let in_sync = io.in_sync();
    io.replica_nodes()
        .into_iter()
        .filter(|n| !in_sync.contains(n) && membership.is_online(n))
        .collect()
}

/// Resyncs one replica on the blocking pool; a failed one stops receiving catch-up
/// writes. Returns the bytes copied.
pub(crate) async fn resync_node(
    io: &Arc<VolumeIo>,
    node: &str,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    let (io2, n2) = (io.clone(), node.to_string());
    let res = tokio::task::spawn_blocking(move || resync_one(&io2, &n2, &stop))
        .await
        .map_err(|e| Error::Internal(format!("resync task failed: {e}")))
        .and_then(|r| r);
    if res.is_err() {
        io.stop_catch_up(node);
    }
    res
}

/// Adopts replica list changes from the volume record (ha-update), and replaces a
/// replica whose node has been offline longer than `rebuild_after` (when a spare node
/// is online): the new replica starts empty and the resync gives it a full copy.
pub(crate) async fn follow_record(
    io: &VolumeIo,
    ctx: &WorkerCtx,
    down_since: &mut HashMap<String, Instant>,
) -> Result<()> {
    let key = io.keys.volume(&io.volume_id);
    let kv = io
        .meta
        .get(&key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("volume {}", io.volume_id)))?;
    let mut rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
    if rec.epoch != io.epoch {
        return Err(Error::Fenced("coordinator replaced".into()));
    }
    // Rebuild: a replica node offline for too long is swapped for a spare.
    let now = Instant::now();
    down_since.retain(|n, _| rec.replicas.contains(n) && !ctx.membership.is_online(n));
    for n in &rec.replicas {
        if !ctx.membership.is_online(n) {
            down_since.entry(n.clone()).or_insert(now);
        }
    }
    let overdue: Vec<String> = down_since
        .iter()
        .filter(|(_, t)| now.duration_since(**t) >= ctx.rebuild_after)
        .map(|(n, _)| n.clone())
        .collect();
    if !overdue.is_empty() {
        let mut nodes = Vec::new();
        for kv in io.meta.list(&io.keys.nodes()).await? {
            let n: NodeRecord = records::decode(&kv.key, &kv.value)?;
            nodes.push(n);
        }
        let mut changed = false;
        for dead in overdue {
            let spare = nodes
                .iter()
                .find(|n| !rec.replicas.contains(&n.id) && ctx.membership.is_online(&n.id));
            let Some(spare) = spare else { break };
            if rec.in_sync().len() <= 1 && rec.in_sync().contains(&dead) {
                continue; // the only in-sync copy: never give it up
            }
            info!(volume = %io.volume_id, %dead, new = %spare.id, "node offline too long: rebuilding its replica elsewhere");
            for r in rec.replicas.iter_mut() {
                if *r == dead {
                    *r = spare.id.clone();
                }
            }
            let mut in_sync = rec.in_sync();
            in_sync.retain(|n| *n != dead);
            rec.in_sync = Some(in_sync);
            rec.left_at.remove(&dead);
            rec.resync.remove(&dead);
            rec.left_at.insert(spare.id.clone(), 0);
            down_since.remove(&dead);
            changed = true;
        }
        if changed && !io.meta.put_if(&key, &records::encode(&rec), kv.rev).await? {
            return Ok(()); // raced with another change: next round
        }
    }
    // Follow the record's replica list.
    if rec.replicas != io.replica_nodes() {
        let mut clients = HashMap::new();
        for n in rec.replicas.iter().filter(|n| **n != io.local_node) {
            let kv = io
                .meta
                .get(&io.keys.node(n))
                .await?
                .ok_or_else(|| Error::NotFound(format!("node {n}")))?;
            let node: NodeRecord = records::decode(&kv.key, &kv.value)?;
            clients.insert(n.clone(), ctx.peers.block(&node.address)?);
        }
        info!(volume = %io.volume_id, replicas = ?rec.replicas, "replica list changed");
        io.set_replicas(targets(&rec, &io.local_node, &clients));
    }
    // Removed replicas are no longer used here: their nodes may free them.
    if !rec.retired.is_empty() {
        let kv = io
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {}", io.volume_id)))?;
        let mut rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
        let used = io.replica_nodes();
        rec.retired.retain(|n| used.contains(n));
        io.meta.put_if(&key, &records::encode(&rec), kv.rev).await?;
    }
    Ok(())
}

/// A replica, seen from the resync: this node's pool or a remote node.
pub(crate) struct Side<'a> {
    io: &'a VolumeIo,
    node: String,
}

impl<'a> Side<'a> {
    pub(crate) fn new(io: &'a VolumeIo, node: &str) -> Self {
        Self {
            io,
            node: node.to_string(),
        }
    }

    /// Fences the replica at this coordinator's epoch; from now on it refuses writes
    /// below `min_version`. Makes it (empty) when missing: it is out of sync. Marks it
    /// catching up (see [`crate::versions::RegionVersions::set_catching_up`]). Returns
    /// whether it was made just now (then it holds nothing, whatever the record says),
    /// and the watermark below which a replica whose host rebooted surely holds what it
    /// had (Some only then).
    fn open(&self, min_version: u64) -> Result<(bool, Option<u64>)> {
        let io = self.io;
        if io.is_local(&self.node) {
            io.pool().allow_reopen(&io.volume_id);
            let o = io.pool().open_replica(
                &io.volume_id,
                io.size(),
                io.epoch,
                min_version,
                true,
                io.descriptor(),
            )?;
            io.pool().set_catching_up(&io.volume_id, true)?;
            return Ok((o.state == OpenState::Created, o.reboot_below));
        }
        let mut c = self.client()?;
        let req = OpenRequest {
            replica: Some(io.replica_ref()),
            epoch: io.epoch,
            min_version,
            mark: 1,
        };
        let answer = std::sync::Arc::new(std::sync::Mutex::new((false, None)));
        let seen = answer.clone();
        self.call(async move {
            let r = c.open(req).await?.into_inner();
            if r.missing {
                return Err(tonic::Status::not_found(
                    "the replica is missing and its node would not make it",
                ));
            }
            *seen.lock().expect("open answer") = (r.created, r.rebooted.then_some(r.reboot_below));
            Ok(())
        })?;
        let answer = *answer.lock().expect("open answer");
        Ok(answer)
    }

    /// Forgets a reboot the replica recorded: everything since its last sync was copied
    /// and made durable. Before it rejoins: a reboot record left on an in-sync replica
    /// would make a later takeover distrust it, or trust it with another rebooted one.
    fn copied_since_reboot(&self) -> Result<()> {
        let io = self.io;
        if io.is_local(&self.node) {
            return io.pool().clear_reboot(&io.volume_id);
        }
        let mut c = self.client()?;
        let req = OpenRequest {
            replica: Some(io.replica_ref()),
            epoch: io.epoch,
            min_version: 0,
            mark: 3,
        };
        self.call(async move { c.open(req).await.map(|_| ()) })
    }

    /// Clears the replica's catching-up mark once it rejoined the in-sync set. A mark
    /// left behind only makes a later recovery copy it again: never unsafe.
    fn caught_up(&self) -> Result<()> {
        let io = self.io;
        if io.is_local(&self.node) {
            return io.pool().set_catching_up(&io.volume_id, false);
        }
        let mut c = self.client()?;
        let req = OpenRequest {
            replica: Some(io.replica_ref()),
            epoch: io.epoch,
            min_version: 0,
            mark: 2,
        };
        self.call(async move { c.open(req).await.map(|_| ()) })
    }

    pub(crate) fn changed(&self, after: u64) -> Result<Vec<(u64, u64)>> {
        let io = self.io;
        if io.is_local(&self.node) {
            return io.pool().changed_regions(&io.volume_id, io.size(), after);
        }
        let mut c = self.client()?;
        let req = ChangedRequest {
            replica: Some(io.replica_ref()),
            after,
        };
        self.call(async move {
            let mut stream = c.changed_regions(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(r) = stream.message().await? {
                out.extend(r.regions.into_iter().zip(r.versions));
            }
            Ok(out)
        })
    }

    pub(crate) fn read_region(&self, region: u64) -> Result<(Vec<u8>, u64)> {
        let io = self.io;
        if io.is_local(&self.node) {
            return io.pool().read_region(&io.volume_id, io.size(), region);
        }
        let mut c = self.client()?;
        let req = RegionRequest {
            replica: Some(io.replica_ref()),
            region,
        };
        self.call(async move {
            let r = c.read_region(req).await?.into_inner();
            Ok((r.data.to_vec(), r.version))
        })
    }

    pub(crate) fn write_region(&self, region: u64, data: Vec<u8>, version: u64) -> Result<()> {
        let io = self.io;
        let stamp = Stamp {
            epoch: io.epoch,
            version,
            complete_below: 0,
        };
        if io.is_local(&self.node) {
            return io
                .pool()
                .write_region(&io.volume_id, io.size(), region, &data, stamp);
        }
        let mut c = self.client()?;
        let req = WriteRegionRequest {
            replica: Some(io.replica_ref()),
            region,
            data: data.into(),
            epoch: stamp.epoch,
            version: stamp.version,
        };
        self.call(async move { c.write_region(req).await.map(|_| ()) })
    }

    /// Makes what was copied to this replica so far durable: the saved progress says
    /// those regions are done, and a resync resumed after the replica's node lost power
    /// does not copy them again.
    fn flush(&self) -> Result<()> {
        let io = self.io;
        if io.is_local(&self.node) {
            return io.pool().flush(&io.volume_id, io.size(), io.epoch, 0);
        }
        let mut c = self.client()?;
        let req = FlushRequest {
            replica: Some(io.replica_ref()),
            epoch: io.epoch,
            complete_below: 0,
        };
        self.call(async move { c.flush(req).await.map(|_| ()) })
    }

    fn client(&self) -> Result<crate::peers::PeerBlockClient> {
        self.io
            .remote(&self.node)
            .ok_or_else(|| Error::Internal(format!("no client for replica on {}", self.node)))
    }

    fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T> {
        let timeout = self.io.timeout;
        match self
            .io
            .rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
        {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::NodeUnreachable {
                node: self.node.clone(),
                reason: "no answer in time".into(),
            }),
        }
    }
}

fn record(io: &VolumeIo) -> Result<VolumeRecord> {
    let key = io.keys.volume(&io.volume_id);
    let kv = io
        .rt
        .block_on(io.meta.get(&key))?
        .ok_or_else(|| Error::NotFound(format!("volume {}", io.volume_id)))?;
    records::decode(&kv.key, &kv.value)
}

fn save_progress(io: &VolumeIo, node: &str, p: &ResyncProgress) -> Result<()> {
    change_record(io, |rec| {
        rec.resync.insert(node.to_string(), p.clone());
    })
}

/// Records that `node` holds nothing (`left_at` 0, no resync progress): its replica was
/// made again empty.
fn forget_progress(io: &VolumeIo, node: &str) -> Result<()> {
    change_record(io, |rec| {
        rec.left_at.insert(node.to_string(), 0);
        rec.resync.remove(node);
    })
}

/// Applies `change` to the volume's record while this coordinator's epoch is the
/// record's (a conditional update, retried on a concurrent change).
fn change_record(io: &VolumeIo, change: impl Fn(&mut VolumeRecord)) -> Result<()> {
    let key = io.keys.volume(&io.volume_id);
    io.rt.block_on(async {
        loop {
            let kv = io
                .meta
                .get(&key)
                .await?
                .ok_or_else(|| Error::NotFound("volume record".into()))?;
            let mut rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
            if rec.epoch != io.epoch {
                return Err(Error::Fenced("coordinator replaced".into()));
            }
            change(&mut rec);
            if io.meta.put_if(&key, &records::encode(&rec), kv.rev).await? {
                return Ok(());
            }
        }
    })
}

/// Copies one region from `source` to `target` under the coordinator's lock of its range
/// (so no write to it runs meanwhile); returns its length.
fn copy_region(io: &VolumeIo, source: &Side, target: &Side, region: u64) -> Result<u64> {
    let _lock = io.lock_range(region * REGION_BYTES, REGION_BYTES);
    let (data, version) = source.read_region(region)?;
    let len = data.len() as u64;
    target.write_region(region, data, version)?;
    Ok(len)
}

/// Catches one replica up; returns the bytes copied.
pub(crate) fn resync_one(io: &VolumeIo, node: &str, stop: &AtomicBool) -> Result<u64> {
    let rec = record(io)?;
    let mut since = rec.left_at.get(node).copied().unwrap_or(0);
    let mut previous = rec.resync.get(node).cloned();
    let target = Side::new(io, node);
    let in_sync = io.in_sync();
    let source_node = if in_sync.contains(&io.local_node) && io.is_local(&io.local_node) {
        io.local_node.clone()
    } else {
        in_sync
            .iter()
            .next()
            .cloned()
            .ok_or_else(|| Error::Internal("no in-sync replica to copy from".into()))?
    };
    let source = Side::new(io, &source_node);
    // Every write below this version that could still reach the target is one that
    // timed out before it left the write set: it must not land over what is copied.
    let (created, reboot_below) = target.open(io.next_version())?;
    if let Some(held) = reboot_below {
        // Its host rebooted since it was last used: whatever it acknowledged after its
        // last sync may be lost or torn, so the copy starts from that sync at the latest.
        let from = held.saturating_sub(1);
        if from < since {
            warn!(volume = %io.volume_id, %node, since, from, "replica's host rebooted: resync starts from its last sync");
            since = from;
            previous = None;
        }
    }
    if created {
        // Its files were lost and made again empty: whatever the record says it held,
        // it holds nothing. Everything is copied, and the record says so before the
        // first copy, so a resync that stops and resumes still copies everything.
        if since > 0 || previous.is_some() {
            warn!(volume = %io.volume_id, %node, since, "replica files were missing: full resync");
            forget_progress(io, node)?;
        }
        since = 0;
        previous = None;
    }
    let started_at = io.catch_up(node);
    let (cursor, resumed_after) = previous
        .as_ref()
        .map(|p| (p.cursor, p.started_at))
        .unwrap_or((0, 0));
    let plan = replication::plan(
        &source.changed(since)?,
        &target.changed(since)?,
        since,
        cursor,
        resumed_after,
    );
    let total = plan.len() as u64 * REGION_BYTES;
    info!(volume = %io.volume_id, %node, since, regions = plan.len(), resumed = previous.is_some(), "resync started");
    let mut progress = ResyncProgress {
        cursor: 0,
        started_at,
        done_bytes: 0,
        total_bytes: total,
    };
    save_progress(io, node, &progress)?;
    let mut last_save = Instant::now();
    let mut last_log = 0u64;
    for batch in plan.chunks(COPIES_IN_FLIGHT) {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::FailedPrecondition("volume detached".into()));
        }
        if !io.is_catching_up(node) {
            return Err(Error::FailedPrecondition(
                "the replica missed a write".into(),
            ));
        }
        // A few regions at a time: each copy waits on a read and a write on two nodes,
        // so several in flight keep both replicas' disks and the network busy.
        let copied: Vec<Result<u64>> = std::thread::scope(|s| {
            let (source, target) = (&source, &target);
            let copies: Vec<_> = batch
                .iter()
                .map(|&region| s.spawn(move || copy_region(io, source, target, region)))
                .collect();
            copies
                .into_iter()
                .map(|c| {
                    c.join()
                        .unwrap_or_else(|_| Err(Error::Internal("a region copy panicked".into())))
                })
                .collect()
        });
        for c in copied {
            progress.done_bytes += c?;
        }
        progress.cursor = batch.last().expect("chunks are not empty") + 1;
        if last_save.elapsed() >= PROGRESS_EVERY {
            // The copies before the cursor reach the target's disk before the record
            // says they are done.
            target.flush()?;
            save_progress(io, node, &progress)?;
            last_save = Instant::now();
        }
        let pct = progress.done_bytes * 100 / total.max(1);
        if pct >= last_log + 10 {
            last_log = pct;
            info!(volume = %io.volume_id, %node, pct, bytes_left = total.saturating_sub(progress.done_bytes), "resync progress");
        }
    }
    // The copies are durable before the replica counts as in sync (a detached volume's
    // upkeep has no later flush to rely on).
    io.flush()?;
    target.copied_since_reboot()?;
    io.rejoin(node, progress.done_bytes)?;
    if let Err(e) = target.caught_up() {
        warn!(volume = %io.volume_id, %node, error = %e, "cannot clear the replica's catching-up mark");
    }
    Ok(progress.done_bytes)
}
