//! A running node: identity, cluster join, the gRPC server and background upkeep.
//!
//! Start-up order matters: the data dir pins the node id and cluster id, the metadata
//! store proves the secret, the pool is opened, then the node registers itself, joins
//! gossip and serves. On shutdown it detaches what it has attached and leaves gossip.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::control::control_server::ControlServer;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::attach::Attachment;
use crate::config::{NodeConfig, PoolKind};
use crate::error::{Error, Result};
use crate::host;
use crate::membership::Membership;
use crate::meta::{EmbeddedStore, EtcdStore, MetaStore};
use crate::peers::{
    cluster_token, secret_hash, Peers, FRAME_BYTES, MAX_MESSAGE_BYTES, WINDOW_BYTES,
};
use crate::pool::Pool;
use crate::records::{self, ClusterRecord, Keys, NodeRecord, VolumeRecord, RECORD_VERSION};
use crate::services::{BlockService, ControlService};

/// How often a node re-announces itself to registered nodes it does not see in gossip.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// How often a node deletes replica files of volumes that no longer exist.
const GC_EVERY: Duration = Duration::from_secs(30);

/// How long a stopping node waits for open calls (callback streams of shared mounts
/// never end by themselves) before it detaches its volumes and exits.
pub const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// The state of a running node, shared by its services.
pub struct Node {
    pub cfg: NodeConfig,
    pub id: String,
    pub meta: MetaStore,
    pub keys: Keys,
    pub pool: Arc<Pool>,
    pub membership: Membership,
    pub peers: Arc<Peers>,
    pub token: String,
    /// Volumes attached on this node, by volume id.
    pub attachments: tokio::sync::Mutex<HashMap<String, Attachment>>,
    /// Serializes finding (and taking over) shared volumes' coordinators.
    pub takeover: tokio::sync::Mutex<()>,
    /// Serves and mounts shared namespaces; set by the binary before serving.
    pub shared: std::sync::OnceLock<Arc<dyn crate::shared::SharedNamespaces>>,
}

/// Reads a value pinned in the data dir, or writes `make()` there the first time.
fn pinned(dir: &Path, file: &str, make: impl FnOnce() -> String) -> Result<String> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let v = make();
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, format!("{v}\n"))?;
            fs::File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &path)?;
            Ok(v)
        }
        Err(e) => Err(e.into()),
    }
}

impl Node {
    /// Opens the data dir, joins the cluster and registers this node. Does not serve yet.
    pub async fn open(cfg: NodeConfig) -> Result<Arc<Self>> {
        cfg.validate()?;
        fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            Error::InvalidArgument(format!("--data-dir {}: {e}", cfg.data_dir.display()))
        })?;
        let id = pinned(&cfg.data_dir, "node-id", || {
            uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
        })?;
        // The data dir belongs to one cluster; it is pinned only once the join succeeded,
        // so a refused first start leaves it free.
        if let Ok(owner) = fs::read_to_string(cfg.data_dir.join("cluster-id")) {
            if owner.trim() != cfg.cluster_id {
                return Err(Error::PermissionDenied(format!(
                    "data dir {} belongs to cluster {:?}, not {:?}",
                    cfg.data_dir.display(),
                    owner.trim(),
                    cfg.cluster_id
                )));
            }
        }

        let meta = if cfg.kvdb.is_empty() {
            MetaStore::Embedded(EmbeddedStore::open(&cfg.data_dir.join("meta.json"))?)
        } else {
            MetaStore::Etcd(Box::new(EtcdStore::connect(&cfg.kvdb).await?))
        };
        let keys = Keys::new(&cfg.cluster_id);
        join_cluster(&meta, &keys, &cfg).await?;
        pinned(&cfg.data_dir, "cluster-id", || cfg.cluster_id.clone())?;

        let pool_dir = match cfg.pool_kind() {
            PoolKind::Directory(dir) => dir,
            PoolKind::Device { device, mountpoint } => {
                host::prepare_device_pool(&device, &mountpoint).await?;
                info!(device = %device.display(), "pool on a device");
                mountpoint
            }
        };
        let pool = Arc::new(Pool::open(&pool_dir, cfg.capacity)?);
        let token = cluster_token(&cfg.cluster_id, &cfg.secret);
        let record = NodeRecord {
            v: RECORD_VERSION,
            id: id.clone(),
            address: cfg.listen.to_string(),
            gossip: cfg.gossip.to_string(),
            zone: cfg.zone.clone(),
            rack: cfg.rack.clone(),
            capacity_bytes: pool.capacity(),
            started_unix: records::now_unix(),
        };
        // Another live node must not be registered with this node's addresses.
        for kv in meta.list(&keys.nodes()).await? {
            let other: NodeRecord = records::decode(&kv.key, &kv.value)?;
            if other.id != id && (other.address == record.address || other.gossip == record.gossip)
            {
                warn!(other = %other.id, "a node previously registered with this address is replaced");
                meta.delete_if(&kv.key, kv.rev).await?;
            }
        }
        meta.put(&keys.node(&id), &records::encode(&record)).await?;
        let membership = Membership::start(&id, cfg.gossip, &token).await?;
        info!(node = %id, cluster = %cfg.cluster_id, store = meta.kind(), "node joined");
        Ok(Arc::new(Self {
            peers: Arc::new(Peers::new(&token)),
            cfg,
            id,
            meta,
            keys,
            pool,
            membership,
            token,
            attachments: tokio::sync::Mutex::new(HashMap::new()),
            takeover: tokio::sync::Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        }))
    }

    /// Serves the gRPC API on an already-bound listener until `shutdown` completes (and at
    /// most [`SHUTDOWN_DRAIN`] longer while calls are still open).
    /// `extra` are more gRPC services on the same port (the namespace API).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        extra: tonic::service::Routes,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        self.clean_stale_attachments().await;
        tokio::spawn(announce_loop(self.clone()));
        tokio::spawn(gc_loop(self.clone()));
        tokio::spawn(crate::detached::upkeep_loop(self.clone()));

        let control = ControlServer::new(ControlService(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let block = crate::write_http::BlockRoutes::new(BlockService(self.clone()));
        // Small block requests must not wait for Nagle's algorithm (40 ms with delayed ACKs).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        info!(address = %self.cfg.listen, "serving");
        let (stopping, stop) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(WINDOW_BYTES)
            .initial_connection_window_size(WINDOW_BYTES * 4)
            .max_frame_size(FRAME_BYTES)
            .add_routes(extra)
            .add_service(control)
            .add_service(block)
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                let _ = stopping.send(());
            });
        // A graceful stop waits for every open call, and shared mounts (here and on other
        // nodes) keep a callback stream open for as long as they live: give calls a
        // moment to finish, then go on with the shutdown.
        tokio::select! {
            served = server => {
                served.map_err(|e| Error::Internal(format!("gRPC server: {e}")))?;
            }
            _ = async {
                let _ = stop.await;
                tokio::time::sleep(SHUTDOWN_DRAIN).await;
            } => warn!("calls still open {SHUTDOWN_DRAIN:?} after the stop signal: shutting down without them"),
        }
        info!("shutting down: detaching local volumes");
        self.detach_all_local().await;
        self.membership.leave().await;
        Ok(())
    }

    /// Binds the node's gRPC address, with an error that names it.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
        TcpListener::bind(addr)
            .await
            .map_err(|e| Error::InvalidArgument(format!("--listen {addr}: cannot bind: {e}")))
    }

    /// Every registered node.
    pub async fn node_records(&self) -> Result<Vec<NodeRecord>> {
        let mut out = Vec::new();
        for kv in self.meta.list(&self.keys.nodes()).await? {
            out.push(records::decode(&kv.key, &kv.value)?);
        }
        Ok(out)
    }

    pub async fn node_record(&self, id: &str) -> Result<NodeRecord> {
        let kv = self
            .meta
            .get(&self.keys.node(id))
            .await?
            .ok_or_else(|| Error::NotFound(format!("node {id}")))?;
        records::decode(&kv.key, &kv.value)
    }

    /// Every volume record.
    pub async fn volume_records(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        for kv in self.meta.list(&self.keys.volumes()).await? {
            out.push(records::decode(&kv.key, &kv.value)?);
        }
        Ok(out)
    }
}

/// Creates the cluster record, or checks this node's secret against it.
async fn join_cluster(meta: &MetaStore, keys: &Keys, cfg: &NodeConfig) -> Result<()> {
    let want = secret_hash(&cfg.cluster_id, &cfg.secret);
    loop {
        if let Some(kv) = meta.get(&keys.cluster()).await? {
            let rec: ClusterRecord = records::decode(&kv.key, &kv.value)?;
            if rec.secret_hash != want {
                return Err(Error::PermissionDenied(format!(
                    "wrong secret for cluster {:?}: this node cannot join it",
                    cfg.cluster_id
                )));
            }
            return Ok(());
        }
        let rec = ClusterRecord {
            v: RECORD_VERSION,
            cluster_id: cfg.cluster_id.clone(),
            secret_hash: want.clone(),
            created_unix: records::now_unix(),
        };
        if meta
            .put_if(&keys.cluster(), &records::encode(&rec), 0)
            .await?
        {
            info!(cluster = %cfg.cluster_id, "created cluster");
            return Ok(());
        }
        // Another node created it first: check against theirs.
    }
}

/// Keeps gossip joined: announces to registered nodes this node does not see alive.
async fn announce_loop(node: Arc<Node>) {
    loop {
        match node.node_records().await {
            Ok(nodes) => {
                for rec in nodes {
                    if rec.id == node.id || node.membership.is_online(&rec.id) {
                        continue;
                    }
                    if let Ok(addr) = rec.gossip.parse() {
                        node.membership.announce(addr);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list nodes for gossip join"),
        }
        tokio::time::sleep(ANNOUNCE_EVERY).await;
    }
}

/// Deletes replica files whose volume was deleted while this node was away.
async fn gc_loop(node: Arc<Node>) {
    loop {
        if let Err(e) = gc_once(&node).await {
            warn!(error = %e, "replica garbage collection failed");
        }
        tokio::time::sleep(GC_EVERY).await;
    }
}

async fn gc_once(node: &Node) -> Result<()> {
    // Replica files first, records second: a replica file only appears after its volume
    // record exists, so a live volume seen here as a file is also seen as a record.
    let files = node.pool.replica_ids()?;
    // Live: volumes that exist and still have their replica on this node.
    let live: HashSet<String> = node
        .volume_records()
        .await?
        .into_iter()
        .filter(|v| v.keeps_data_on(&node.id))
        .map(|v| v.id)
        .collect();
    for id in files {
        if !live.contains(&id) {
            info!(volume = %id, "deleting a replica this node no longer holds");
            node.pool.delete(&id)?;
        }
    }
    Ok(())
}
