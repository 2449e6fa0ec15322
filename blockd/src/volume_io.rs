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
mod in_sync;
mod open;
mod read;
mod write;

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
