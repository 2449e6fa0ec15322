//! `shoal`: the one binary. `shoal node start` runs a node; every other subcommand is
//! the admin CLI, talking gRPC to a node's control API (`--endpoint`).

mod kvdb_auth;
mod mount_helper;
mod node_cmd;
mod output;
mod table;
mod volume_cmd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use shoal_proto::control::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "Shoal: container-defined storage")]
struct Cli {
    /// Node to talk to (host:port or URL).
    #[arg(long, global = true, env = "SHOAL_ENDPOINT", default_value = shoal_blockd::config::DEFAULT_LISTEN)]
    endpoint: String,
    /// Admin credential (key and certificates, mode 0600) for the node's control API.
    /// Default: /etc/shoal/admin.pem, then /var/lib/shoal/admin.pem (every node writes
    /// one to <data-dir>/admin.pem).
    #[arg(long, global = true, env = "SHOAL_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run or manage the node on this host.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster members, their state and capacity.
    Status,
    /// Create, inspect, attach and mount volumes.
    #[command(subcommand)]
    Volume(volume_cmd::VolumeCmd),
    /// Cluster-wide operations.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Rebuild lost cluster metadata from this node's replicas. Run it with the flags
    /// the node starts with (the node stopped), on every node that holds replicas.
    Recover(Box<node_cmd::StartArgs>),
    /// Make a one-time token a new node joins with (SHOAL_JOIN_TOKEN on that node)
    /// instead of being given the cluster secret.
    JoinToken {
        /// How long the token may be used: seconds, or with s, m, h or d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

/// `90`, `90s`, `15m`, `1h`, `2d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 90s, 15m, 1h, 2d)"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(per)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Run a node in the foreground until SIGTERM.
    Start(Box<node_cmd::StartArgs>),
}

/// How long a CLI call may take; attach and mount may format a filesystem.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the CLI looks for an admin credential when none is named.
const DEFAULT_CREDENTIALS: [&str; 2] = ["/etc/shoal/admin.pem", "/var/lib/shoal/admin.pem"];

/// The admin credential: `path` (from `--credentials` or `SHOAL_CREDENTIALS`), or the
/// first default that exists.
fn admin_credential(path: Option<&Path>) -> anyhow::Result<shoal_blockd::auth::Credential> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => DEFAULT_CREDENTIALS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                anyhow!(
                    "no admin credential: pass --credentials FILE (or set SHOAL_CREDENTIALS); \
                     every node writes one to <data-dir>/admin.pem, and {} are looked at \
                     by default",
                    DEFAULT_CREDENTIALS.join(" and ")
                )
            })?,
    };
    let text = node_cmd::read_private_file("credentials", &path)?;
    Ok(shoal_blockd::auth::Credential::parse(
        &text,
        &format!("--credentials {}", path.display()),
    )?)
}

/// Connects to the node at `endpoint` with the admin credential at `credentials` (or
/// the default one), failing in seconds (not hanging) if it is down.
async fn connect(
    endpoint: &str,
    credentials: Option<&Path>,
) -> anyhow::Result<ControlClient<Channel>> {
    let cred = admin_credential(credentials)?;
    // Always TLS: an `http://` or `https://` prefix only names the address.
    let address = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .unwrap_or(endpoint);
    let ep = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| anyhow!("endpoint {endpoint:?} is not a valid address: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .tls_config(cred.client_tls())
        .map_err(|e| anyhow!("TLS settings: {e}"))?;
    let ch = ep.connect().await.map_err(|e| {
        let text = source_text(&e);
        if text.contains("certificate") || text.contains("alert") {
            anyhow!(
                "the node at {endpoint} and the admin credential are not of one cluster CA \
                 (another cluster's credential, or one written before the CA was made \
                 again): {text}"
            )
        } else {
            anyhow!("cannot reach a Shoal node at {endpoint}: {text}")
        }
    })?;
    Ok(ControlClient::new(ch).max_decoding_message_size(64 << 20))
}

fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s = format!("{s}: {inner}");
        cur = inner.source();
    }
    s
}

/// Turns a gRPC status into the one-line message the user sees.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    // TLS 1.3 reports a refused client certificate at the first call, not the handshake.
    let text = source_text(&s);
    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
        && (text.contains("certificate") || text.contains("alert"))
    {
        return anyhow!("the node refused the admin credential (not of its cluster's CA?): {text}");
    }
    if s.message().is_empty() {
        anyhow!("{}", s.code())
    } else {
        anyhow!("{}", s.message())
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.first().is_some_and(|a| mount_helper::is_helper(a)) {
        std::process::exit(mount_helper::main(&argv[1..]));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line that names the problem; the usage hint follows on stderr.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            eprintln!("{}", first.join(" "));
            eprintln!("(see 'shoal --help')");
            std::process::exit(2);
        }
    };
    init_tracing(matches!(cli.cmd, Cmd::Node(_)));
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Node(NodeCmd::Start(args)) => node_cmd::start(*args),
        Cmd::Cluster(ClusterCmd::Recover(args)) => node_cmd::recover(*args, cli.json),
        cmd => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let mut client = connect(&cli.endpoint, cli.credentials.as_deref()).await?;
                match cmd {
                    Cmd::Status => output::status(&mut client, cli.json).await,
                    Cmd::Volume(v) => volume_cmd::run(v, &mut client, cli.json).await,
                    Cmd::Cluster(ClusterCmd::JoinToken { ttl }) => {
                        output::join_token(&mut client, ttl, cli.json).await
                    }
                    Cmd::Node(_) | Cmd::Cluster(ClusterCmd::Recover(_)) => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    }
}

/// Logs go to stderr through tracing; `RUST_LOG` (e.g. `info,shoal_blockd=debug`) filters.
fn init_tracing(node: bool) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = if node { "info" } else { "warn" };
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_string());
    let filter: Targets = spec
        .parse()
        .unwrap_or_else(|_| default.parse().expect("valid default filter"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(filter)
        .init();
}
