//! The coordinator's replicated I/O for one attached volume.
//!
//! Every write gets a version (the epoch in its high bits) and goes to every in-sync
//! replica in parallel — the local pool directly, remote replicas over the block API —
//! and to replicas being caught up. It is acknowledged when every in-sync replica has
//! it. A replica that fails or times out is removed from the in-sync set in the
//! metadata store *before* the acknowledgement, with the version watermark it is known
//! to hold; if that update cannot be made (store down, or this coordinator was
//! replaced: the epoch moved on), the write fails instead. Reads are served by the local
//! replica when it is in sync, otherwise by another in-sync replica.
//!
//! Resync lives in [`crate::resync`]; it uses [`VolumeIo::catch_up`] and
//! [`VolumeIo::rejoin`] to let a returning replica receive new writes while old regions
//! are copied, and to return it to the in-sync set under a write barrier.
//!
//! Beside this file: `open.rs` (a new coordinator's fence and reconcile), `fan_out.rs`
//! (one request to several replicas) and `read.rs` (where a read is served from).
//!
//! The methods are synchronous: they run on FUSE session threads and drive async gRPC
//! and metadata calls on the node's runtime through a handle.

mod fan_out;
mod open;
mod read;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::block::{DiscardRequest, FlushRequest, OpenRequest, ReadRequest, ReplicaRef};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::peers::{PeerBlockClient, Peers};
use crate::pool::{Pool, Stamp, RESTARTED};
use crate::range_lock::{RangeGuard, RangeLock};
use crate::read_cache::ReadCache;
use crate::records::{self, Keys, VolumeRecord};
use crate::replication::{self, Outcome};
use crate::thread_io;
use crate::versions::{first_version, Descriptor};
use crate::write_wire;

/// Where one replica lives.
#[derive(Clone)]
pub enum Target {
    Local,
    Remote(Box<PeerBlockClient>),
}

/// One replica of the volume.
#[derive(Clone)]
pub struct Replica {
    pub node: String,
    pub target: Target,
}

/// Which replicas receive writes.
#[derive(Debug, Clone, Default)]
struct Sets {
    in_sync: BTreeSet<String>,
    /// Being caught up by a resync: they get every new write, but their failure only
    /// stops their resync.
    catching_up: BTreeSet<String>,
}

/// See the module doc.
pub struct VolumeIo {
    pub volume_id: String,
    size: u64,
    pub epoch: u64,
    pub local_node: String,
    pool: Arc<Pool>,
    /// Every replica of the volume; changes with `ha-update` and rebuilds.
    replicas: RwLock<Vec<Replica>>,
    sets: RwLock<Sets>,
    next_version: AtomicU64,
    /// Versions handed out and not yet completed.
    inflight: Mutex<BTreeSet<u64>>,
    /// In-sync replicas that did not answer a write that then failed everywhere: that
    /// write may still land on them. Before the next write reaches one, its floor is
    /// raised to this version so the late one is refused (node -> floor).
    pending_floor: Mutex<HashMap<String, u64>>,
    /// Overlapping writes, resync copies and cache-filling reads go one at a time, in
    /// the same order to every replica; the rest go in parallel.
    ranges: RangeLock,
    /// Writes hold it shared; changing who is in sync holds it exclusively.
    barrier: RwLock<()>,
    pub meta: MetaStore,
    pub keys: Keys,
    pub timeout: Duration,
    pub rt: tokio::runtime::Handle,
    /// Set once this node learns the volume has a newer coordinator: it serves nothing.
    fenced: std::sync::atomic::AtomicBool,
    /// Opened by the upkeep of a detached volume (`detached.rs`): the record names no
    /// attached node while it runs, and only the epoch says who owns the volume.
    upkeep: std::sync::atomic::AtomicBool,
    /// Pages read over the network, kept write-through (only when this node held no
    /// replica at attach: local reads are served by the replica file's page cache).
    cache: Option<ReadCache>,
    /// Peer addresses for calls made on the calling thread (`thread_io`); unset: every
    /// call goes through the node's runtime.
    thread_peers: RwLock<Option<ThreadPeers>>,
    /// What this node's replica writes about itself into its header when opened.
    descriptor: std::sync::OnceLock<Descriptor>,
    /// Whether an in-sync replica missing here may be made empty at open (see
    /// [`VolumeRecord::may_create_in_sync`]), as the record said at open.
    create_in_sync: bool,
    /// Every version below this is durable on every in-sync replica (the watermark of
    /// the last flush that completed everywhere, or what the replicas had at open). A
    /// replica whose node restarted may have lost anything at or above it.
    flushed_below: AtomicU64,
}

/// What `thread_io` needs to reach the replicas.
struct ThreadPeers {
    peers: Arc<Peers>,
    /// Node id -> gRPC address.
    addresses: HashMap<String, String>,
}

/// How an in-sync replica whose files are gone answers an open.
const MISSING: &str = "the replica's files are missing on its node";

/// Writes up to this size go out from the calling thread (`thread_io`): they are
/// latency-bound. Larger ones go through the node's runtime, so the remote copy travels
/// while this thread writes the local one.
const THREAD_IO_MAX: usize = 128 << 10;

/// Bytes of read cache per volume read over the network.
const READ_CACHE_BYTES: u64 = 64 << 20;

/// How one replica answered.
type Answer = (String, Result<(), Error>);

/// What a remote call run as a task with a timeout came to.
type RemoteOutcome = std::result::Result<
    std::result::Result<std::result::Result<(), tonic::Status>, tokio::time::error::Elapsed>,
    tokio::task::JoinError,
>;

/// A remote replica's answer as an error of ours.
fn remote_answer(node: &str, res: RemoteOutcome, timeout: Duration) -> Result<()> {
    match res {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(status))) => Err(Error::from(status)),
        Ok(Err(_)) => Err(Error::NodeUnreachable {
            node: node.to_string(),
            reason: format!("no answer within {timeout:?}"),
        }),
        Err(e) => Err(Error::Internal(e.to_string())),
    }
}

impl VolumeIo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rec: &VolumeRecord,
        local_node: String,
        pool: Arc<Pool>,
        replicas: Vec<Replica>,
        meta: MetaStore,
        keys: Keys,
        timeout: Duration,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let local = replicas.iter().any(|r| matches!(r.target, Target::Local));
        Self {
            cache: (!local).then(|| ReadCache::new(READ_CACHE_BYTES)),
            volume_id: rec.id.clone(),
            size: rec.size_bytes,
            epoch: rec.epoch,
            local_node,
            pool,
            replicas: RwLock::new(replicas),
            sets: RwLock::new(Sets {
                in_sync: rec.in_sync().into_iter().collect(),
                catching_up: BTreeSet::new(),
            }),
            next_version: AtomicU64::new(first_version(rec.epoch)),
            inflight: Mutex::new(BTreeSet::new()),
            pending_floor: Mutex::new(HashMap::new()),
            ranges: RangeLock::default(),
            barrier: RwLock::new(()),
            meta,
            keys,
            timeout,
            rt,
            fenced: std::sync::atomic::AtomicBool::new(false),
            upkeep: std::sync::atomic::AtomicBool::new(false),
            thread_peers: RwLock::new(None),
            descriptor: std::sync::OnceLock::new(),
            create_in_sync: rec.may_create_in_sync(),
            flushed_below: AtomicU64::new(0),
        }
    }

    /// Sets what the local replica writes into its header when opened (see
    /// [`Descriptor`]); before [`VolumeIo::open`].
    pub fn set_descriptor(&self, d: Descriptor) {
        let _ = self.descriptor.set(d);
    }

    /// See [`VolumeIo::set_descriptor`].
    pub(crate) fn descriptor(&self) -> Option<&Descriptor> {
        self.descriptor.get()
    }

    /// Lets small writes reach the replicas on `addresses` (node id -> address) from the
    /// calling thread (see `thread_io`). Replicas not listed use the node's runtime.
    pub fn use_thread_io(&self, peers: Arc<Peers>, addresses: HashMap<String, String>) {
        *self.thread_peers.write().expect("thread peers") = Some(ThreadPeers { peers, addresses });
    }

    /// Marks this as the upkeep of a detached volume: record updates expect no attached
    /// node (and this epoch) instead of this node attached.
    pub fn for_upkeep(&self) {
        self.upkeep.store(true, Ordering::SeqCst);
    }

    /// Stops serving: another node coordinates this volume now.
    pub fn fence(&self) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            warn!(volume = %self.volume_id, epoch = self.epoch, "replaced by a newer coordinator; refusing all I/O");
        }
    }

    fn check_fenced(&self) -> Result<()> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(
                "this node is no longer the volume's coordinator".into(),
            ));
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn replica_ref(&self) -> ReplicaRef {
        ReplicaRef {
            volume_id: self.volume_id.clone(),
            size_bytes: self.size,
        }
    }

    pub fn in_sync(&self) -> BTreeSet<String> {
        self.sets.read().expect("sets lock").in_sync.clone()
    }

    pub fn is_catching_up(&self, node: &str) -> bool {
        self.sets
            .read()
            .expect("sets lock")
            .catching_up
            .contains(node)
    }

    /// The next version this coordinator will hand out.
    pub fn next_version(&self) -> u64 {
        self.next_version.load(Ordering::SeqCst)
    }

    /// Holds the byte range `[offset, offset + len)` against overlapping writes.
    pub fn lock_range(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.ranges.lock(offset, len)
    }

    /// Acts on the answers of the in-sync replicas (and of those catching up): a
    /// degraded outcome removes the failed replicas from the in-sync set in the
    /// metadata store before returning Ok. `watermark` overrides the version recorded
    /// as held by the replicas that left.
    fn settle(&self, answers: Vec<Answer>, watermark: Option<u64>) -> Result<()> {
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
    fn last_flush(&self) -> u64 {
        self.flushed_below.load(Ordering::SeqCst).saturating_sub(1)
    }

    /// `nodes` answered (to a `cause` request) that their node restarted since this
    /// coordinator opened them: what they had not flushed may be lost, so they leave the
    /// in-sync set holding only what the last flush made durable.
    fn leave_restarted(&self, nodes: &[String], cause: &str) -> Result<()> {
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

    /// The replicas a write goes to: in sync, and those being caught up.
    fn write_set(&self) -> BTreeSet<String> {
        let s = self.sets.read().expect("sets lock");
        s.in_sync.union(&s.catching_up).cloned().collect()
    }

    /// Runs one versioned change under the barrier and region locks.
    fn versioned<F, Fut>(
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
    fn raise_pending_floors(&self, targets: &BTreeSet<String>) -> Result<()> {
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

    /// The client of a remote replica, by node.
    pub fn remote(&self, node: &str) -> Option<PeerBlockClient> {
        self.replicas().iter().find_map(|r| match &r.target {
            Target::Remote(c) if r.node == node => Some((**c).clone()),
            _ => None,
        })
    }

    /// Whether `node`'s replica is this node's own pool.
    pub fn is_local(&self, node: &str) -> bool {
        node == self.local_node && self.replicas().iter().any(|r| r.node == node)
    }

    /// The replicas as they are now.
    pub fn replicas(&self) -> Vec<Replica> {
        self.replicas.read().expect("replicas lock").clone()
    }

    /// Node ids of the replicas.
    pub fn replica_nodes(&self) -> Vec<String> {
        self.replicas().into_iter().map(|r| r.node).collect()
    }

    /// Adopts a changed replica list (after `ha-update` or a rebuild), with no write in
    /// flight. Replicas that left stop receiving writes; new ones start outside the
    /// in-sync set and are built by the resync worker.
    pub fn set_replicas(&self, replicas: Vec<Replica>) {
        let _b = self.barrier.write().expect("barrier");
        let keep: BTreeSet<String> = replicas.iter().map(|r| r.node.clone()).collect();
        let mut sets = self.sets.write().expect("sets lock");
        sets.in_sync.retain(|n| keep.contains(n));
        sets.catching_up.retain(|n| keep.contains(n));
        *self.replicas.write().expect("replicas lock") = replicas;
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

/// Replica targets for a volume as seen from `local_node`.
pub fn targets(
    rec: &VolumeRecord,
    local_node: &str,
    clients: &HashMap<String, PeerBlockClient>,
) -> Vec<Replica> {
    rec.replicas
        .iter()
        .filter_map(|n| {
            if n == local_node {
                Some(Replica {
                    node: n.clone(),
                    target: Target::Local,
                })
            } else {
                clients.get(n).map(|c| Replica {
                    node: n.clone(),
                    target: Target::Remote(Box::new(c.clone())),
                })
            }
        })
        .collect()
}
