//! `shoal node start`: runs a node until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use std::sync::Arc;

use shoal_blockd::{Node, NodeConfig};
use shoal_docker_plugin::backend::NodeBackend;
use shoal_docker_plugin::Plugin;
use shoal_proto::ns::namespace_server::NamespaceServer;
use shoal_sharedfs::coordinator::service::NamespaceService;
use shoal_sharedfs::hooks::Shared;

/// Flags of `shoal node start`; each has a `SHOAL_*` environment fallback.
#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Cluster id: nodes with the same id and secret form one cluster.
    #[arg(long, env = "SHOAL_CLUSTER_ID", default_value = "shoal")]
    cluster_id: String,
    /// Where the node keeps its id, embedded metadata and (by default) its pool.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "/var/lib/shoal")]
    data_dir: PathBuf,
    /// gRPC address to serve and advertise (host:port).
    #[arg(long, env = "SHOAL_LISTEN", default_value = shoal_blockd::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// UDP address for SWIM gossip (host:port).
    #[arg(long, env = "SHOAL_GOSSIP", default_value = shoal_blockd::config::DEFAULT_GOSSIP)]
    gossip: SocketAddr,
    /// etcd endpoint URL(s), comma separated; without it the node keeps metadata in an
    /// embedded store (single-node cluster).
    #[arg(long, env = "SHOAL_KVDB", value_delimiter = ',')]
    kvdb: Vec<String>,
    #[command(flatten)]
    kvdb_auth: crate::kvdb_auth::KvdbAuthArgs,
    /// Zone label (placement spreads replicas over zones).
    #[arg(long, env = "SHOAL_ZONE", default_value = "default")]
    zone: String,
    /// Rack label (placement spreads replicas over racks).
    #[arg(long, env = "SHOAL_RACK", default_value = "default")]
    rack: String,
    /// File holding the cluster join secret (only its owner may read it: mode 0600);
    /// every node of a cluster must have the same secret. Or set SHOAL_SECRET. A
    /// single-host node on the embedded store makes its own in <data-dir>/secret.
    #[arg(long, env = "SHOAL_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Refused: a secret on the command line is visible to every user (ps).
    #[arg(long, hide = true)]
    secret: Option<String>,
    /// File holding a one-time join token (from `shoal cluster join-token`), for a new
    /// node that has no secret yet: it fetches the secret with it and keeps it in
    /// <data-dir>/secret. Or set SHOAL_JOIN_TOKEN.
    #[arg(long, env = "SHOAL_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Directory holding replica data (default: <data-dir>/pool).
    #[arg(long, env = "SHOAL_POOL")]
    pool: Option<PathBuf>,
    /// Bytes the pool may hold, e.g. 100G (default: free space of the pool's filesystem).
    #[arg(long, env = "SHOAL_CAPACITY", value_parser = parse_size_arg)]
    capacity: Option<u64>,
    /// Seconds a replica may take to answer a write before it leaves the in-sync set
    /// (writes stall at most this long when a replica node hangs).
    #[arg(long, env = "SHOAL_REPLICA_TIMEOUT", default_value_t = shoal_blockd::config::DEFAULT_REPLICA_TIMEOUT.as_secs_f64())]
    replica_timeout: f64,
    /// Seconds a replica's node may stay offline before its replicas are rebuilt on other
    /// nodes.
    #[arg(long, env = "SHOAL_REBUILD_AFTER", default_value_t = shoal_blockd::config::DEFAULT_REBUILD_AFTER.as_secs_f64())]
    rebuild_after: f64,
    /// Seconds of a shared volume's coordinator lease (whole, at least 2): a
    /// coordinator cut off from the metadata store stops serving within it, and a
    /// takeover after a crash waits for it to run out.
    #[arg(long, env = "SHOAL_COORDINATOR_LEASE", default_value_t = shoal_blockd::config::DEFAULT_COORDINATOR_LEASE.as_secs())]
    coordinator_lease: u64,
    /// Seconds a shared-volume mount may go without renewing its session before the
    /// coordinator drops it (and frees what it held).
    #[arg(long, env = "SHOAL_SESSION_LEASE", default_value_t = shoal_sharedfs::coordinator::service::DEFAULT_LEASE.as_secs_f64())]
    session_lease: f64,
    /// Attribute leases one shared-volume mount may hold at its coordinator; past it the
    /// least recently used are recalled (bounds the coordinator's memory, not the files).
    #[arg(long, env = "SHOAL_LEASE_LIMIT", default_value_t = shoal_sharedfs::coordinator::leases::DEFAULT_LIMIT)]
    lease_limit: usize,
    /// Unix socket for the Docker volume plugin (driver name = file name without
    /// `.sock`); "" serves none (several nodes on one host: give one node the socket).
    #[arg(long, env = "SHOAL_DOCKER_SOCKET", default_value = shoal_docker_plugin::server::DEFAULT_SOCKET)]
    docker_socket: String,
}

/// Where the cluster secret comes from.
enum SecretSource {
    Known(String),
    /// A one-time join token to fetch it with (see [`shoal_blockd::auth::join`]).
    Join(String),
}

/// The cluster secret: from `--secret-file`, SHOAL_SECRET, `<data-dir>/secret` (a node
/// that joined with a token, or a single-host node), a join token, or (single host on
/// the embedded store only) one the node makes itself. Never from argv, never a default.
fn secret(args: &StartArgs) -> anyhow::Result<SecretSource> {
    if args.secret.is_some() {
        anyhow::bail!(
            "--secret is not accepted: a secret on the command line is visible to every \
             user; put it in a file only its owner can read and give --secret-file PATH, or \
             set SHOAL_SECRET"
        );
    }
    if let Some(path) = &args.secret_file {
        return read_private_file("secret-file", path).map(SecretSource::Known);
    }
    if let Ok(s) = std::env::var("SHOAL_SECRET") {
        if !s.is_empty() {
            return Ok(SecretSource::Known(s));
        }
    }
    let own = args.data_dir.join("secret");
    if own.exists() {
        return read_private_file("secret-file", &own).map(SecretSource::Known);
    }
    let token = match (&args.join_token_file, std::env::var("SHOAL_JOIN_TOKEN")) {
        (Some(path), _) => Some(read_private_file("join-token-file", path)?),
        (None, Ok(t)) if !t.is_empty() => Some(t),
        _ => None,
    };
    if let Some(token) = token {
        if args.kvdb.is_empty() {
            anyhow::bail!(
                "a join token needs --kvdb: it joins a cluster on etcd (a single-host node \
                 makes its own secret)"
            );
        }
        return Ok(SecretSource::Join(token));
    }
    if args.kvdb.is_empty() {
        return own_secret(&own).map(SecretSource::Known);
    }
    anyhow::bail!(
        "no cluster secret: a node on etcd needs the cluster's secret; give --secret-file \
         PATH (a file of mode 0600), set SHOAL_SECRET, or join with a one-time token \
         (SHOAL_JOIN_TOKEN or --join-token-file, from `shoal cluster join-token`)"
    )
}

/// Fetches the cluster secret with a one-time join token and keeps it in the data dir.
fn redeem_join_token(cfg: &NodeConfig, token: &str) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let secret = rt
        .block_on(async {
            let meta = shoal_blockd::node::open_store(cfg).await?;
            let keys = shoal_blockd::records::Keys::new(&cfg.cluster_id);
            let now = shoal_blockd::records::now_unix();
            shoal_blockd::auth::join::redeem(&meta, &keys, &cfg.cluster_id, token, now).await
        })
        .context("joining with the join token")?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("--data-dir {}", cfg.data_dir.display()))?;
    write_private_file(&cfg.data_dir.join("secret"), &secret)?;
    Ok(secret)
}

/// Reads a file only its owner may read (a secret, a password, a key), refusing one
/// another user owns or may read; `flag` names the flag in messages.
pub(crate) fn read_private_file(flag: &str, path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("--{flag} {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!(
            "--{flag} {}: owned by uid {}, not by this user ({me})",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "--{flag} {}: other users may read it (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--{flag} {}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.trim().is_empty() {
        anyhow::bail!("--{flag} {}: the file is empty", path.display());
    }
    Ok(secret)
}

/// A single-host node's own secret: read, or made once (random, mode 0600).
fn own_secret(path: &std::path::Path) -> anyhow::Result<String> {
    if path.exists() {
        return read_private_file("secret-file", path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    write_private_file(path, &secret)?;
    Ok(secret)
}

/// Writes `text` to a new file of mode 0600 at `path` (see
/// [`shoal_blockd::auth::credential::write_private`]).
fn write_private_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    shoal_blockd::auth::credential::write_private(path, text.as_bytes())
        .with_context(|| format!("making {}", path.display()))
}

pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    shoal_blockd::size::parse_size(s).map_err(|e| e.to_string())
}

/// The node configuration the flags describe.
pub fn config(args: &StartArgs) -> anyhow::Result<NodeConfig> {
    let args = args.clone();
    let (secret, join) = match secret(&args)? {
        SecretSource::Known(s) => (s, None),
        SecretSource::Join(token) => (String::new(), Some(token)),
    };
    let mut cfg = NodeConfig {
        cluster_id: args.cluster_id,
        data_dir: args.data_dir,
        listen: args.listen,
        gossip: args.gossip,
        kvdb: args.kvdb.clone(),
        kvdb_auth: args.kvdb_auth.auth()?,
        zone: args.zone,
        rack: args.rack,
        secret,
        pool: args.pool,
        capacity: args.capacity,
        replica_timeout: std::time::Duration::try_from_secs_f64(args.replica_timeout).map_err(
            |_| {
                anyhow::anyhow!(
                    "--replica-timeout {} is not a duration in seconds",
                    args.replica_timeout
                )
            },
        )?,
        rebuild_after: std::time::Duration::try_from_secs_f64(args.rebuild_after).map_err(
            |_| {
                anyhow::anyhow!(
                    "--rebuild-after {} is not a duration in seconds",
                    args.rebuild_after
                )
            },
        )?,
        coordinator_lease: std::time::Duration::from_secs(args.coordinator_lease),
    };
    if let Some(token) = join {
        cfg.secret = redeem_join_token(&cfg, &token)?;
    }
    Ok(cfg)
}

pub fn start(args: StartArgs) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let lease = std::time::Duration::try_from_secs_f64(args.session_lease)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--session-lease {} is not a positive duration in seconds",
                args.session_lease
            )
        })?;
    if cfg.coordinator_lease * 2 > lease {
        tracing::warn!(
            coordinator_lease = ?cfg.coordinator_lease,
            session_lease = ?lease,
            "--coordinator-lease is over half the --session-lease: a failover after a crash may outlast the session lease, and mounts then give up the locks they held"
        );
    }
    keep_freed_memory();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let docker_socket = Some(args.docker_socket)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    rt.block_on(async move {
        let listener = Node::bind(cfg.listen).await?;
        let docker_listener = match &docker_socket {
            Some(path) => Some(
                shoal_docker_plugin::server::bind(path)
                    .await
                    .with_context(|| format!("--docker-socket {}", path.display()))?,
            ),
            None => None,
        };
        let mount_root = cfg.data_dir.join("docker");
        let node = Node::open(cfg).await?;
        let service = NamespaceService::new(node.peers.clone(), lease, args.lease_limit);
        let shared = Arc::new(Shared::new(
            service.clone(),
            node.peers.clone(),
            &node.id,
            &node.cfg.listen.to_string(),
            tokio::runtime::Handle::current(),
        ));
        let _ = node.shared.set(shared);
        // Namespace calls are authenticated from their headers, before their bodies are
        // decoded (the service checks again).
        let peers = node.peers.clone();
        let routes =
            tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
                NamespaceServer::new(service)
                    .max_decoding_message_size(shoal_blockd::peers::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(shoal_blockd::peers::MAX_MESSAGE_BYTES),
                move |req: tonic::Request<()>| {
                    if peers.token_ok(&req) {
                        Ok(req)
                    } else {
                        Err(tonic::Status::unauthenticated(
                            "missing or wrong cluster token: not a member of this cluster",
                        ))
                    }
                },
            ));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        if let (Some(l), Some(path)) = (docker_listener, docker_socket) {
            let plugin = Arc::new(Plugin::new(NodeBackend(node.clone()), mount_root));
            tokio::spawn(shoal_docker_plugin::serve(plugin, l, path, async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            }));
        }
        if shoal_blockd::powerloss::enabled() {
            // Failpoint `lose-unsynced`: SIGUSR2 is a power cut of this node's pool.
            let pool = node.pool.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let mut usr2 = signal(SignalKind::user_defined2()).expect("SIGUSR2 handler");
                usr2.recv().await;
                let n = pool.power_off();
                tracing::error!(
                    files = n,
                    "failpoint lose-unsynced: power cut, unsynced writes dropped"
                );
                std::process::abort();
            });
        }
        println!("node {} serving", node.id);
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        node.serve(listener, routes, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    // FUSE sessions and gRPC tasks are gone; do not wait for idle background tasks.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

/// Tells the C allocator to keep memory the node frees for reuse.
///
/// Every replica write arrives in a fresh buffer of about 1 MiB (the gRPC decoder hands the
/// bytes on and allocates anew). With glibc's defaults such buffers are given back to the
/// kernel when freed and faulted in again, zeroed, for the next message: a profile of the
/// node receiving a stream of replica writes had a sixth of its time in those page
/// faults. A fixed mmap threshold keeps buffers of that size on the heap, and a trim
/// threshold of 64 MiB keeps up to that much free heap per arena instead of returning it.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator settings; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    // A node outlives the terminal that started it: SIGHUP must not stop it.
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => tracing::info!("SIGHUP ignored"),
        }
    }
    tracing::info!("signal received, shutting down");
}

/// `shoal cluster recover`: rebuilds the cluster metadata from this node's replicas.
pub fn recover(args: StartArgs, json: bool) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt.block_on(shoal_blockd::recover::recover(&cfg))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .iter()
        .map(|r| {
            vec![
                r.volume_id.clone(),
                r.name.clone(),
                r.action.clone(),
                r.detail.clone(),
            ]
        })
        .collect();
    crate::table::print(&["VOLUME", "NAME", "ACTION", "DETAIL"], &rows);
    println!(
        "{} replica(s) read from this node; run recover on every node that holds replicas",
        report.len()
    );
    Ok(())
}
