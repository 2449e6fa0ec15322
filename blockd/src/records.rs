//! The records Shoal keeps in the cluster metadata store, and where they live.
//!
//! Every record is JSON with a format version `v` first; a node refuses a record whose
//! version is newer than it understands rather than misread it. All keys live under
//! `/shoal/<cluster-id>/`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Record format version written by this build.
pub const RECORD_VERSION: u32 = 1;

/// Key layout for one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster_id: &str) -> Self {
        Self {
            root: format!("/shoal/{cluster_id}/"),
        }
    }
    /// The cluster's own record (secret hash, creation time).
    pub fn cluster(&self) -> String {
        format!("{}cluster", self.root)
    }
    /// The cluster CA: its certificate, and its key sealed under the cluster secret
    /// (see [`crate::auth::ca`]).
    pub fn ca(&self) -> String {
        format!("{}ca", self.root)
    }
    /// One-time join tokens (see [`crate::auth::join`]), by an id derived from each.
    pub fn join_tokens(&self) -> String {
        format!("{}jointokens/", self.root)
    }
    pub fn join_token(&self, id: &str) -> String {
        format!("{}jointokens/{id}", self.root)
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }
    pub fn volumes(&self) -> String {
        format!("{}volumes/", self.root)
    }
    pub fn volume(&self, id: &str) -> String {
        format!("{}volumes/{id}", self.root)
    }
    /// A shared volume's coordinator role, held under a lease (see
    /// [`crate::role_lease`]).
    pub fn coordinator(&self, volume_id: &str) -> String {
        format!("{}coordinators/{volume_id}", self.root)
    }
    /// Tombstones: the positive record that a volume was deleted. A node deletes replica
    /// data of a volume only on its tombstone (or a record that names other nodes).
    pub fn tombstones(&self) -> String {
        format!("{}tombstones/", self.root)
    }
    pub fn tombstone(&self, id: &str) -> String {
        format!("{}tombstones/{id}", self.root)
    }
    /// What `shoal cluster recover` read off each node's replicas.
    pub fn recovery(&self, volume_id: &str) -> String {
        format!("{}recovery/{volume_id}/", self.root)
    }
    pub fn recovery_of(&self, volume_id: &str, node: &str) -> String {
        format!("{}recovery/{volume_id}/{node}", self.root)
    }
    /// Name index: maps a volume name to its id, and makes names unique.
    pub fn volume_name(&self, name: &str) -> String {
        format!("{}names/{name}", self.root)
    }
}

/// The cluster record, written once by the first node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub v: u32,
    pub cluster_id: String,
    /// SHA-256 of the cluster id and the join secret; a node must match it to join.
    pub secret_hash: String,
    pub created_unix: u64,
    /// Made once, when the cluster is created: it tells this cluster from another one
    /// of the same name (a store wiped and filled again). Every node pins it.
    #[serde(default)]
    pub uuid: String,
}

impl ClusterRecord {
    /// A new cluster's record, made now.
    pub fn new(cluster_id: &str, secret_hash: &str, uuid: &str) -> Self {
        Self {
            v: RECORD_VERSION,
            cluster_id: cluster_id.to_string(),
            secret_hash: secret_hash.to_string(),
            created_unix: now_unix(),
            uuid: uuid.to_string(),
        }
    }
}

/// The positive record of a volume's deletion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    pub v: u32,
    pub id: String,
    pub name: String,
    pub deleted_unix: u64,
}

/// A node as registered in the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub v: u32,
    pub id: String,
    /// gRPC address (`host:port`).
    pub address: String,
    /// SWIM gossip UDP address.
    pub gossip: String,
    pub zone: String,
    pub rack: String,
    pub capacity_bytes: u64,
    pub started_unix: u64,
}

/// A volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub v: u32,
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub repl: u32,
    pub block_size: u32,
    /// "none" or "ext4".
    pub fs: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub io_priority: String,
    #[serde(default)]
    pub shared: bool,
    /// Node ids holding a replica, in placement order.
    pub replicas: Vec<String>,
    /// The node the volume is attached to: its coordinator.
    #[serde(default)]
    pub attached_node: Option<String>,
    #[serde(default)]
    pub device_path: String,
    #[serde(default)]
    pub mount_path: String,
    /// Whether the volume's filesystem has been created (ext4 volumes, first attach).
    #[serde(default)]
    pub formatted: bool,
    /// Bumped on every attach: the coordinator generation.
    #[serde(default)]
    pub epoch: u64,
    pub created_unix: u64,
    /// Replicas known to hold every acknowledged write (None: all of `replicas`, as
    /// written by records from before the in-sync set existed).
    #[serde(default)]
    pub in_sync: Option<Vec<String>>,
    /// For a replica out of the in-sync set: every version up to this one is on it.
    #[serde(default)]
    pub left_at: BTreeMap<String, u64>,
    /// Resyncs under way, by node.
    #[serde(default)]
    pub resync: BTreeMap<String, ResyncProgress>,
    /// Bytes the last finished resync of each node copied.
    #[serde(default)]
    pub resync_bytes: BTreeMap<String, u64>,
    /// Set once the volume's first coordinator opened (made) its in-sync replicas: from
    /// then on an in-sync replica that is missing is never made again, whatever the epoch.
    #[serde(default)]
    pub replicas_made: bool,
    /// Replicas removed from the volume while its coordinator may still use them: their
    /// files are kept until the coordinator has let go of them.
    #[serde(default)]
    pub retired: Vec<String>,
}

/// Progress of one replica's resync, kept so a restarted resync resumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ResyncProgress {
    /// Regions below this index were copied.
    pub cursor: u64,
    /// The coordinator's next version when copying began: regions below the cursor need
    /// copying again on resume only if written after it.
    pub started_at: u64,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl VolumeRecord {
    /// Marks the volume detached. With no coordinator, nothing uses retired replicas any
    /// more, so their nodes may free them.
    pub fn clear_attachment(&mut self) {
        self.attached_node = None;
        self.device_path.clear();
        self.mount_path.clear();
        self.retired.clear();
    }

    /// Whether `node` keeps files of this volume (a replica, or one being retired).
    pub fn keeps_data_on(&self, node: &str) -> bool {
        self.replicas.iter().any(|n| n == node) || self.retired.iter().any(|n| n == node)
    }

    /// What a replica of this volume writes about itself into its header.
    pub fn descriptor(&self, cluster_id: &str, cluster_uuid: &str) -> crate::versions::Descriptor {
        crate::versions::Descriptor {
            cluster_id: cluster_id.to_string(),
            cluster_uuid: cluster_uuid.to_string(),
            volume_id: self.id.clone(),
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            repl: self.repl,
            block_size: self.block_size,
            fs: self.fs.clone(),
            shared: self.shared,
            io_priority: self.io_priority.clone(),
            labels: self.labels.clone(),
            formatted: self.formatted,
            created_unix: self.created_unix,
        }
    }

    /// Whether a replica of `node` may be made empty when a coordinator opens it: only
    /// for a volume's first coordinator (nothing was ever written) or a replica out of
    /// sync (it is about to be resynced in full). An in-sync replica that is missing
    /// stays missing and leaves the in-sync set.
    pub fn may_create_replica(&self, node: &str) -> bool {
        self.may_create_in_sync() || !self.in_sync().iter().any(|n| n == node)
    }

    /// Whether in-sync replicas may still be made (empty): only before the volume's
    /// first coordinator finished opening them.
    pub fn may_create_in_sync(&self) -> bool {
        self.epoch <= 1 && !self.replicas_made
    }

    /// The in-sync set.
    pub fn in_sync(&self) -> Vec<String> {
        self.in_sync
            .clone()
            .unwrap_or_else(|| self.replicas.clone())
    }
}

/// Serializes a record.
pub fn encode<T: Serialize>(rec: &T) -> String {
    serde_json::to_string(rec).expect("records always serialize")
}

/// Parses a record, checking its format version.
pub fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let corrupt = |reason: String| Error::CorruptRecord {
        key: key.to_string(),
        reason,
    };
    let ver: Version = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    if ver.v > RECORD_VERSION {
        return Err(corrupt(format!(
            "format version {} is newer than this node understands ({RECORD_VERSION})",
            ver.v
        )));
    }
    serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_newer_format() {
        let err = decode::<ClusterRecord>("k", r#"{"v":99,"cluster_id":"a"}"#).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn round_trips() {
        let rec = ClusterRecord {
            v: RECORD_VERSION,
            cluster_id: "c".into(),
            secret_hash: "h".into(),
            uuid: "u".into(),
            created_unix: 7,
        };
        let back: ClusterRecord = decode("k", &encode(&rec)).unwrap();
        assert_eq!(back.cluster_id, "c");
        assert_eq!(back.created_unix, 7);
    }

    #[test]
    fn in_sync_replicas_are_made_only_until_the_first_open_finished() {
        let mut rec: VolumeRecord = serde_json::from_str(
            r#"{"v":1,"id":"x","name":"x","size_bytes":1,"repl":2,"block_size":4096,
                "fs":"none","io_priority":"low","replicas":["a","b"],"epoch":1,
                "created_unix":0,"in_sync":["a"]}"#,
        )
        .unwrap();
        assert!(rec.may_create_replica("a"), "first open of a new volume");
        rec.replicas_made = true;
        assert!(
            !rec.may_create_replica("a"),
            "an in-sync replica lost later"
        );
        assert!(
            rec.may_create_replica("b"),
            "out of sync: about to be resynced"
        );
        rec.replicas_made = false;
        rec.epoch = 2;
        assert!(!rec.may_create_replica("a"));
    }
}
