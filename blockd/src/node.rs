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
use crate::auth::Role;
use crate::cluster_join;
use crate::config::{NodeConfig, PoolKind};
use crate::error::{Error, Result};
use crate::host;
use crate::membership::Membership;
use crate::meta::{EmbeddedStore, EtcdStore, MetaStore};
use crate::peers::{cluster_token, PeerTls, Peers, FRAME_BYTES, MAX_MESSAGE_BYTES, WINDOW_BYTES};
use crate::pool::Pool;
use crate::records::{self, Keys, NodeRecord, VolumeRecord, RECORD_VERSION};
use crate::services::{BlockService, ControlService};

/// How often a node re-announces itself to registered nodes it does not see in gossip.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS: u32 = 4096;
/// How often a node deletes replica files of volumes that no longer exist.
const GC_EVERY: Duration = Duration::from_secs(30);

/// The admin credential a node writes in its data dir (mode 0600), for the CLI.
pub const ADMIN_CREDENTIAL_FILE: &str = "admin.pem";

/// How long a stopping node waits for open calls (callback streams of shared mounts
/// never end by themselves) before it detaches its volumes and exits.
pub const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// The state of a running node, shared by its services.
pub struct Node {
    pub cfg: NodeConfig,
    pub id: String,
    pub meta: MetaStore,
    pub keys: Keys,
    /// The cluster's uuid (see [`records::ClusterRecord::uuid`]), pinned in the data dir.
    pub cluster_uuid: String,
    pub pool: Arc<Pool>,
    pub membership: Membership,
    pub peers: Arc<Peers>,
    pub token: String,
    /// This node's certificate and key (issued at start by the cluster CA, kept only in
    /// memory): the server side of every connection to it.
    pub credential: crate::auth::Credential,
    /// Volumes attached on this node, by volume id.
    pub attachments: tokio::sync::Mutex<HashMap<String, Attachment>>,
    /// Serializes finding (and taking over) shared volumes' coordinators.
    pub takeover: tokio::sync::Mutex<()>,
    /// Serves and mounts shared namespaces; set by the binary before serving.
    pub shared: std::sync::OnceLock<Arc<dyn crate::shared::SharedNamespaces>>,
    /// This node, for tasks that outlive the call that started them.
    pub(crate) me: std::sync::Weak<Node>,
}

/// A value pinned in the data dir, if it is there.
pub fn read_pinned(dir: &Path, file: &str) -> Result<Option<String>> {
    match fs::read_to_string(dir.join(file)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens the metadata store the node's flags name: etcd with `--kvdb`, otherwise the
/// embedded store in the data dir.
pub async fn open_store(cfg: &NodeConfig) -> Result<MetaStore> {
    Ok(if cfg.kvdb.is_empty() {
        MetaStore::Embedded(EmbeddedStore::open(&cfg.data_dir.join("meta.json"))?)
    } else {
        MetaStore::Etcd(Box::new(
            EtcdStore::connect_with(&cfg.kvdb, &cfg.kvdb_auth).await?,
        ))
    })
}

/// The metadata store a node uses, as its messages name it.
pub fn store_name(cfg: &NodeConfig) -> String {
    if cfg.kvdb.is_empty() {
        format!(
            "embedded store {}",
            cfg.data_dir.join("meta.json").display()
        )
    } else {
        format!("etcd at {}", cfg.kvdb.join(","))
    }
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

        let pool_dir = match cfg.pool_kind() {
            PoolKind::Directory(dir) => dir,
            PoolKind::Device { device, mountpoint } => {
                host::prepare_device_pool(&device, &mountpoint).await?;
                info!(device = %device.display(), "pool on a device");
                mountpoint
            }
        };
        let pool = Arc::new(Pool::open(&pool_dir, cfg.capacity)?);

        let meta = open_store(&cfg).await?;
        let keys = Keys::new(&cfg.cluster_id);
        let local = cluster_join::Local {
            pinned_uuid: read_pinned(&cfg.data_dir, "cluster-uuid")?,
            pinned_cluster: cfg.data_dir.join("cluster-id").exists(),
            replicas: pool.replica_ids()?.len(),
            data_dir: cfg.data_dir.display().to_string(),
            store: store_name(&cfg),
        };
        let cluster_uuid = cluster_join::join(&meta, &keys, &cfg, &local).await?;
        pinned(&cfg.data_dir, "cluster-id", || cfg.cluster_id.clone())?;
        pinned(&cfg.data_dir, "cluster-uuid", || cluster_uuid.clone())?;

        let token = cluster_token(&cfg.cluster_id, &cfg.secret);
        // Every connection is mutual TLS under the cluster CA: this node's certificate
        // lives in memory; the admin credential for the CLI is written to the data dir.
        let ca = crate::auth::load_or_create(&meta, &keys, &cfg.cluster_id, &cfg.secret).await?;
        let credential = ca.issue(Role::Node, &id)?;
        let admin = ca.issue(Role::Admin, &format!("issued by node {id}"))?;
        let admin_path = cfg.data_dir.join(ADMIN_CREDENTIAL_FILE);
        admin.write(&admin_path).map_err(|e| {
            Error::Internal(format!(
                "writing the admin credential {}: {e}",
                admin_path.display()
            ))
        })?;
        let peer_tls = PeerTls {
            node: credential.client_tls(),
            admin: admin.client_tls(),
        };
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
        let gossip_key = crate::gossip_auth::gossip_key(&cfg.cluster_id, &cfg.secret);
        let membership = Membership::start(&id, cfg.gossip, gossip_key).await?;
        info!(node = %id, cluster = %cfg.cluster_id, store = meta.kind(), "node joined");
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            peers: Arc::new(Peers::with_tls(&token, Some(peer_tls))),
            credential,
            cfg,
            id,
            meta,
            keys,
            cluster_uuid,
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

        let control = tonic::service::interceptor::InterceptedService::new(
            ControlServer::new(ControlService(self.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            crate::auth::require_admin,
        );
        let block = crate::write_http::BlockRoutes::new(BlockService(self.clone()));
        // Small block requests must not wait for Nagle's algorithm (40 ms with delayed ACKs).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        info!(address = %self.cfg.listen, "serving");
        let (stopping, stop) = tokio::sync::oneshot::channel::<()>();
        // Bounds for what one peer can hold open: streams per connection, and dead
        // connections found by keepalive (no request timeout: lock waits and a mount's
        // callback stream legitimately last).
        let server = tonic::transport::Server::builder()
            .tls_config(self.credential.server_tls())
            .map_err(|e| Error::Internal(format!("TLS settings: {e}")))?
            .tcp_nodelay(true)
            .max_concurrent_streams(Some(MAX_STREAMS))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_keepalive(Some(Duration::from_secs(30)))
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
    let mut orphans_seen = HashSet::new();
    loop {
        if let Err(e) = gc_once(&node, &mut orphans_seen).await {
            warn!(error = %e, "replica garbage collection failed");
        }
        if let Err(e) =
            crate::auth::join::forget_expired(&node.meta, &node.keys, records::now_unix()).await
        {
            warn!(error = %e, "forgetting expired join tokens failed");
        }
        tokio::time::sleep(GC_EVERY).await;
    }
}

/// What the metadata says about a replica file on this node.
pub(crate) enum Evidence {
    /// It may be deleted, for this reason.
    Unwanted(String),
    /// Its volume's record still places it here (or may: see below).
    Listed,
    /// Neither a record nor a tombstone: nothing is known, so it is kept.
    Unknown,
}

/// See [`Evidence`]. Only a positive record makes a replica unwanted.
pub(crate) async fn deletion_evidence(node: &Node, volume_id: &str) -> Result<Evidence> {
    if node
        .meta
        .get(&node.keys.tombstone(volume_id))
        .await?
        .is_some()
    {
        return Ok(Evidence::Unwanted(
            "its volume was deleted (tombstone)".into(),
        ));
    }
    let Some(kv) = node.meta.get(&node.keys.volume(volume_id)).await? else {
        return Ok(Evidence::Unknown);
    };
    let rec: VolumeRecord = records::decode(&kv.key, &kv.value)?;
    if rec.keeps_data_on(&node.id) {
        return Ok(Evidence::Listed);
    }
    // A record rebuilt by `cluster recover` lists only the nodes that reported so far:
    // it says nothing about a replica it does not list.
    let recovered = !node
        .meta
        .list(&node.keys.recovery(volume_id))
        .await?
        .is_empty();
    Ok(if recovered {
        Evidence::Listed
    } else {
        Evidence::Unwanted("its volume's record places no replica here".into())
    })
}

async fn gc_once(node: &Node, orphans_seen: &mut HashSet<String>) -> Result<()> {
    // Only a positive record deletes data: a tombstone of the volume, or its record
    // naming other nodes. A replica with neither (a record missing for whatever reason)
    // is kept and reported once.
    for id in node.pool.replica_ids()? {
        match deletion_evidence(node, &id).await? {
            Evidence::Unwanted(why) => {
                info!(volume = %id, reason = %why, "deleting a replica this node no longer holds");
                node.pool.delete(&id)?;
            }
            Evidence::Listed => {}
            Evidence::Unknown => {
                if orphans_seen.insert(id.clone()) {
                    warn!(volume = %id, "replica file with no volume record and no tombstone: kept (see `shoal cluster recover`)");
                }
            }
        }
    }
    Ok(())
}
