//! Node configuration: what `shoal node start` is told, checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Default gRPC address of a node (control and block APIs).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9710";
/// Default gossip (SWIM over UDP) address.
pub const DEFAULT_GOSSIP: &str = "127.0.0.1:9711";

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Cluster this node belongs to; nodes with the same id and secret form one cluster.
    pub cluster_id: String,
    /// Where the node keeps its id, its embedded metadata (without `--kvdb`) and, by
    /// default, its pool.
    pub data_dir: PathBuf,
    /// gRPC address this node serves and advertises to the others.
    pub listen: SocketAddr,
    /// UDP address for SWIM gossip.
    pub gossip: SocketAddr,
    /// etcd endpoints; empty means the embedded store (single-node cluster).
    pub kvdb: Vec<String>,
    /// TLS and user for etcd.
    pub kvdb_auth: crate::meta::EtcdAuth,
    /// Failure domains used by placement.
    pub zone: String,
    pub rack: String,
    /// Cluster join secret.
    pub secret: String,
    /// Directory holding the replica files (default `<data_dir>/pool`).
    pub pool: Option<PathBuf>,
    /// Bytes the pool may hand out (default: the free space where the pool lives).
    pub capacity: Option<u64>,
    /// How long a replica may take to answer a write before it leaves the in-sync set.
    pub replica_timeout: std::time::Duration,
    /// How long a replica's node may stay offline before the replica is rebuilt on
    /// another node (by the volume's coordinator).
    pub rebuild_after: std::time::Duration,
    /// TTL of a shared volume's coordinator role lease: a coordinator that cannot renew
    /// it stops serving before it runs out, and a successor waits it out.
    pub coordinator_lease: std::time::Duration,
}

/// Default of [`NodeConfig::rebuild_after`].
pub const DEFAULT_REBUILD_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Default of [`NodeConfig::coordinator_lease`]: a cut-off coordinator stops within
/// this; a takeover after a crash waits for it. Well under the default session lease
/// (15 s): a mount that could not reach any coordinator for a session lease gives its
/// locks up, so a failover must end sooner.
pub const DEFAULT_COORDINATOR_LEASE: std::time::Duration = std::time::Duration::from_secs(6);

/// Default of [`NodeConfig::replica_timeout`]: long enough for a busy disk, short enough
/// that a hung node costs writers a few seconds at most.
pub const DEFAULT_REPLICA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

impl NodeConfig {
    /// Fails fast, with a message naming the setting, on anything that cannot work.
    pub fn validate(&self) -> Result<()> {
        check_label("cluster id", &self.cluster_id)?;
        check_label("zone", &self.zone)?;
        check_label("rack", &self.rack)?;
        if self.listen.port() == 0 || self.gossip.port() == 0 {
            return Err(Error::InvalidArgument(
                "--listen and --gossip need a fixed port (other nodes must find this one)".into(),
            ));
        }
        if self.listen == self.gossip {
            // TCP and UDP could share a port, but one address for two protocols confuses people.
            return Err(Error::InvalidArgument(
                "--listen and --gossip must differ".into(),
            ));
        }
        for url in &self.kvdb {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::InvalidArgument(format!(
                    "--kvdb {url:?}: expected an etcd URL such as http://127.0.0.1:2379"
                )));
            }
            // TLS goes with https, and https needs the CA that signed etcd's certificate.
            let https = url.starts_with("https://");
            if https != self.kvdb_auth.ca_pem.is_some() {
                return Err(Error::InvalidArgument(if https {
                    format!("--kvdb {url:?}: an https:// endpoint needs --kvdb-ca (the CA that signed etcd's certificate)")
                } else {
                    format!("--kvdb {url:?}: --kvdb-ca was given, so the endpoint must be https://")
                }));
            }
        }
        if self.kvdb_auth.client.is_some() && self.kvdb_auth.ca_pem.is_none() {
            return Err(Error::InvalidArgument(
                "--kvdb-cert and --kvdb-key are a TLS client certificate: they need --kvdb-ca and https:// endpoints".into(),
            ));
        }
        if self.kvdb.is_empty()
            && (self.kvdb_auth.ca_pem.is_some()
                || self.kvdb_auth.client.is_some()
                || self.kvdb_auth.user.is_some())
        {
            return Err(Error::InvalidArgument(
                "--kvdb-ca, --kvdb-cert, --kvdb-key and --kvdb-user need --kvdb (an etcd)".into(),
            ));
        }
        if self.replica_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "--replica-timeout must be greater than zero".into(),
            ));
        }
        // etcd refuses lease TTLs shorter than about 1.5 s, and counts them in whole
        // seconds; 2 s leaves the coordinator 1.4 s of serving per renewal.
        if self.coordinator_lease < std::time::Duration::from_secs(2)
            || self.coordinator_lease.subsec_nanos() != 0
        {
            return Err(Error::InvalidArgument(format!(
                "--coordinator-lease {:?}: expected whole seconds, at least 2",
                self.coordinator_lease
            )));
        }
        if self.capacity == Some(0) {
            return Err(Error::InvalidArgument(
                "--capacity must be greater than zero".into(),
            ));
        }
        if let Some(pool) = &self.pool {
            if let Ok(meta) = std::fs::metadata(pool) {
                use std::os::unix::fs::FileTypeExt;
                let t = meta.file_type();
                if !(t.is_dir() || t.is_file() || t.is_block_device()) {
                    return Err(Error::InvalidArgument(format!(
                        "--pool {}: expected a directory, a file or a block device",
                        pool.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// What the pool is made of.
    pub fn pool_kind(&self) -> PoolKind {
        match &self.pool {
            None => PoolKind::Directory(self.data_dir.join("pool")),
            Some(p) if p.is_file() || is_block_device(p) => PoolKind::Device {
                device: p.clone(),
                mountpoint: self.data_dir.join("pool-mnt"),
            },
            Some(p) => PoolKind::Directory(p.clone()),
        }
    }
}

/// Where replica data lives.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolKind {
    /// A directory on an existing filesystem.
    Directory(PathBuf),
    /// A file or block device that the node formats (once) and mounts at `mountpoint`.
    Device {
        device: PathBuf,
        mountpoint: PathBuf,
    },
}

fn is_block_device(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Ids and labels: 1–64 bytes of letters, digits, `-`, `_`, `.`.
pub fn check_label(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {value:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::EtcdAuth;

    fn cfg(kvdb: &[&str], auth: EtcdAuth) -> NodeConfig {
        NodeConfig {
            cluster_id: "c".into(),
            data_dir: "/tmp/x".into(),
            listen: "127.0.0.1:9710".parse().unwrap(),
            gossip: "127.0.0.1:9711".parse().unwrap(),
            kvdb: kvdb.iter().map(|s| s.to_string()).collect(),
            kvdb_auth: auth,
            zone: "z".into(),
            rack: "r".into(),
            secret: "s".into(),
            pool: None,
            capacity: None,
            replica_timeout: DEFAULT_REPLICA_TIMEOUT,
            rebuild_after: DEFAULT_REBUILD_AFTER,
            coordinator_lease: DEFAULT_COORDINATOR_LEASE,
        }
    }

    #[test]
    fn etcd_tls_goes_with_https_and_needs_an_etcd() {
        let ca = || EtcdAuth {
            ca_pem: Some(b"pem".to_vec()),
            ..EtcdAuth::default()
        };
        assert!(cfg(&["http://e:2379"], EtcdAuth::default())
            .validate()
            .is_ok());
        assert!(cfg(&["https://e:2379"], ca()).validate().is_ok());
        let err = cfg(&["https://e:2379"], EtcdAuth::default())
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--kvdb-ca"), "{err}");
        let err = cfg(&["http://e:2379"], ca()).validate().unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let user = EtcdAuth {
            user: Some(("u".into(), "p".into())),
            ..EtcdAuth::default()
        };
        let err = cfg(&[], user).validate().unwrap_err();
        assert!(err.to_string().contains("need --kvdb"), "{err}");
        let cert_only = EtcdAuth {
            client: Some((b"c".to_vec(), b"k".to_vec())),
            ..EtcdAuth::default()
        };
        let err = cfg(&["http://e:2379"], cert_only).validate().unwrap_err();
        assert!(err.to_string().contains("--kvdb-ca"), "{err}");
    }

    #[test]
    fn the_coordinator_lease_is_whole_seconds_of_at_least_two() {
        let mut c = cfg(&[], EtcdAuth::default());
        c.coordinator_lease = std::time::Duration::from_secs(1);
        assert!(c.validate().is_err());
        c.coordinator_lease = std::time::Duration::from_millis(2500);
        assert!(c.validate().is_err());
        c.coordinator_lease = std::time::Duration::from_secs(2);
        assert!(c.validate().is_ok());
    }
}
