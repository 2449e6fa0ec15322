//! Volume lifecycle on the control path: create (with placement), list, inspect, delete.

use std::collections::HashMap;
use std::time::Duration;

use shoal_proto::block::{ReplicaRef, UsageRequest};
use shoal_proto::control::{self as pb, CreateVolumeRequest};
use tracing::{info, instrument, warn};

use crate::config::check_label;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::placement::{self, Candidate};
use crate::records::{self, NodeRecord, VolumeRecord, RECORD_VERSION};

/// How long `status` / `inspect` wait for a node's usage figures.
const USAGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Replication factors a volume may have.
pub const MAX_REPL: u32 = 3;
/// The largest volume: 64 TiB (a replica's version table is 8 bytes per MiB, 512 MiB
/// sparse at this size; the on-volume namespace is designed and tested for it).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

/// Usage figures a node reports.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub capacity: u64,
    pub pool_used: u64,
    pub volume_used: HashMap<String, u64>,
}

/// Checks a volume name: what `docker volume create` and a path segment can both carry.
pub fn check_volume_name(name: &str) -> Result<()> {
    check_label("volume name", name)?;
    if name.starts_with('.') || name.starts_with('-') {
        return Err(Error::InvalidArgument(format!(
            "volume name {name:?} must not start with '.' or '-'"
        )));
    }
    Ok(())
}

fn validate_spec(req: &CreateVolumeRequest) -> Result<(u32, String, String)> {
    check_volume_name(&req.name)?;
    if req.size_bytes == 0 {
        return Err(Error::InvalidArgument(
            "size must be greater than zero".into(),
        ));
    }
    if req.size_bytes > MAX_VOLUME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "size {} is over the largest volume, {}",
            crate::size::format_size(req.size_bytes),
            crate::size::format_size(MAX_VOLUME_BYTES)
        )));
    }
    if req.repl == 0 || req.repl > MAX_REPL {
        return Err(Error::InvalidArgument(format!(
            "repl {} is out of range (1-{MAX_REPL})",
            req.repl
        )));
    }
    let block = if req.block_size == 0 {
        4096
    } else {
        req.block_size
    };
    if !(4096..=1 << 20).contains(&block) || !block.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "block size {block} must be a power of two from 4K to 1M"
        )));
    }
    if !req.size_bytes.is_multiple_of(block as u64) {
        return Err(Error::InvalidArgument(format!(
            "size {} is not a multiple of the block size {block}",
            req.size_bytes
        )));
    }
    let fs =
        match (req.fs.as_str(), req.shared) {
            ("" | "none", false) => "none",
            ("ext4", false) => "ext4",
            ("" | "none" | "sharedfs", true) | ("sharedfs", false) => "sharedfs",
            ("ext4", true) => return Err(Error::InvalidArgument(
                "a shared volume carries the shared namespace (sharedfs), not ext4: drop --fs ext4"
                    .into(),
            )),
            (other, _) => {
                return Err(Error::InvalidArgument(format!(
                    "fs {other:?} is not supported (none, ext4 or sharedfs)"
                )))
            }
        };
    if fs == "sharedfs" && req.size_bytes < 8 << 20 {
        return Err(Error::InvalidArgument(
            "a shared volume needs at least 8M".into(),
        ));
    }
    if fs == "ext4" && req.size_bytes < 8 << 20 {
        return Err(Error::InvalidArgument(
            "an ext4 volume needs at least 8M".into(),
        ));
    }
    let prio = match req.io_priority.as_str() {
        "" | "medium" => "medium",
        "high" => "high",
        "low" => "low",
        other => {
            return Err(Error::InvalidArgument(format!(
                "io priority {other:?} is not one of high, medium, low"
            )))
        }
    };
    for (k, v) in &req.labels {
        check_label("label key", k)?;
        if v.len() > 256 {
            return Err(Error::InvalidArgument(format!(
                "label {k} value is over 256 bytes"
            )));
        }
    }
    Ok((block, fs.to_string(), prio.to_string()))
}

impl Node {
    /// Usage figures of one node (this one directly, others over gRPC); `None` when the
    /// node is offline or does not answer in time.
    pub async fn usage_of(&self, node: &NodeRecord, volume_ids: &[String]) -> Option<Usage> {
        if node.id == self.id {
            let mut volume_used = HashMap::new();
            for v in volume_ids {
                volume_used.insert(v.clone(), self.pool.replica_used(v).ok()?);
            }
            return Some(Usage {
                capacity: self.pool.capacity(),
                pool_used: self.pool.used(),
                volume_used,
            });
        }
        if !self.membership.is_online(&node.id) {
            return None;
        }
        let mut client = self.peers.block(&node.address).ok()?;
        let req = UsageRequest {
            volume_ids: volume_ids.to_vec(),
        };
        let reply = tokio::time::timeout(USAGE_TIMEOUT, client.usage(req))
            .await
            .ok()?
            .ok()?
            .into_inner();
        Some(Usage {
            capacity: reply.capacity_bytes,
            pool_used: reply.pool_used_bytes,
            volume_used: reply.volume_used.into_iter().collect(),
        })
    }

    /// Looks a volume up by name.
    pub async fn volume_by_name(&self, name: &str) -> Result<(VolumeRecord, i64)> {
        check_volume_name(name)?;
        let missing = || Error::NotFound(format!("volume {name:?}"));
        let idx = self
            .meta
            .get(&self.keys.volume_name(name))
            .await?
            .ok_or_else(missing)?;
        let kv = self
            .meta
            .get(&self.keys.volume(&idx.value))
            .await?
            .ok_or_else(missing)?;
        Ok((records::decode(&kv.key, &kv.value)?, kv.rev))
    }

    /// Creates a volume: validates the spec, places replicas, writes the record.
    #[instrument(skip(self, req), fields(volume = %req.name))]
    pub async fn create_volume(&self, req: CreateVolumeRequest) -> Result<pb::Volume> {
        let (block_size, fs, io_priority) = validate_spec(&req)?;
        let shared = fs == "sharedfs";
        let nodes = self.node_records().await?;
        if req.repl as usize > nodes.len() {
            return Err(Error::InvalidArgument(format!(
                "repl {} is more than the {} node(s) in the cluster",
                req.repl,
                nodes.len()
            )));
        }
        let mut candidates = Vec::new();
        for n in &nodes {
            let usage = self.usage_of(n, &[]).await;
            candidates.push(Candidate {
                id: n.id.clone(),
                zone: n.zone.clone(),
                rack: n.rack.clone(),
                free_bytes: usage
                    .as_ref()
                    .map(|u| u.capacity.saturating_sub(u.pool_used))
                    .unwrap_or(0),
                online: usage.is_some(),
            });
        }
        let replicas = placement::place(&candidates, req.repl, &req.nodes)?;

        let id = uuid::Uuid::new_v4().simple().to_string();
        let name_key = self.keys.volume_name(&req.name);
        // Claim the name; a stale claim (its volume record gone) may be taken over.
        let claimed = match self.meta.get(&name_key).await? {
            None => self.meta.put_if(&name_key, &id, 0).await?,
            Some(kv) => {
                if self.meta.get(&self.keys.volume(&kv.value)).await?.is_some() {
                    false
                } else {
                    self.meta.put_if(&name_key, &id, kv.rev).await?
                }
            }
        };
        if !claimed {
            return Err(Error::AlreadyExists(format!("volume {:?}", req.name)));
        }
        let rec = VolumeRecord {
            v: RECORD_VERSION,
            id: id.clone(),
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            repl: req.repl,
            block_size,
            fs,
            labels: req.labels.into_iter().collect(),
            io_priority,
            shared,
            replicas: replicas.clone(),
            attached_node: None,
            device_path: String::new(),
            mount_path: String::new(),
            formatted: false,
            epoch: 0,
            created_unix: records::now_unix(),
            in_sync: Some(replicas.clone()),
            left_at: Default::default(),
            resync: Default::default(),
            resync_bytes: Default::default(),
            retired: Vec::new(),
            replicas_made: false,
        };
        self.meta
            .put(&self.keys.volume(&id), &records::encode(&rec))
            .await?;
        info!(id = %id, replicas = ?rec.replicas, "volume created");
        self.describe(&rec).await
    }

    /// The public view of a volume, with live replica states and space used.
    /// The mounts a shared volume's coordinator serves (empty when it cannot be asked).
    async fn sessions_of(
        &self,
        rec: &VolumeRecord,
        coordinator: &str,
        nodes: &HashMap<String, NodeRecord>,
    ) -> Vec<pb::MountSession> {
        let Some(n) = nodes.get(coordinator) else {
            return Vec::new();
        };
        if !self.membership.is_online(coordinator) && coordinator != self.id {
            return Vec::new();
        }
        let Ok(mut c) = self.peers.namespace(&n.address) else {
            return Vec::new();
        };
        let req = shoal_proto::ns::HeartbeatRequest {
            volume_id: rec.id.clone(),
            session: 0,
        };
        match tokio::time::timeout(std::time::Duration::from_secs(2), c.list_sessions(req)).await {
            Ok(Ok(r)) => r
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| pb::MountSession {
                    id: s.id,
                    host: s.host,
                    mountpoint: s.mountpoint,
                    age_ms: s.age_ms,
                    open_files: s.open_files,
                    locks: s.locks,
                    leases: s.leases,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    pub async fn describe(&self, rec: &VolumeRecord) -> Result<pb::Volume> {
        let nodes: HashMap<String, NodeRecord> = self
            .node_records()
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        let mut replicas = Vec::new();
        let mut used = 0u64;
        let in_sync = rec.in_sync();
        let mut degraded = false;
        for node_id in &rec.replicas {
            let usage = match nodes.get(node_id) {
                Some(n) => self.usage_of(n, std::slice::from_ref(&rec.id)).await,
                None => None,
            };
            let replica_used = usage
                .as_ref()
                .and_then(|u| u.volume_used.get(&rec.id).copied())
                .unwrap_or(0);
            used = used.max(replica_used);
            let progress = rec.resync.get(node_id);
            let state = if !self.membership.is_online(node_id) {
                "offline"
            } else if in_sync.contains(node_id) {
                "in-sync"
            } else if progress.is_some() {
                "resyncing"
            } else {
                "out-of-sync"
            };
            degraded |= state != "in-sync";
            replicas.push(pb::Replica {
                node: node_id.clone(),
                state: state.into(),
                used_bytes: replica_used,
                resync_done_bytes: progress.map(|p| p.done_bytes).unwrap_or(0),
                resync_total_bytes: progress.map(|p| p.total_bytes).unwrap_or(0),
                last_resync_bytes: rec.resync_bytes.get(node_id).copied().unwrap_or(0),
            });
        }
        let sessions = match (&rec.attached_node, rec.shared) {
            (Some(n), true) => self.sessions_of(rec, n, &nodes).await,
            _ => Vec::new(),
        };
        Ok(pb::Volume {
            sessions,
            name: rec.name.clone(),
            id: rec.id.clone(),
            size_bytes: rec.size_bytes,
            used_bytes: used,
            repl: rec.repl,
            shared: rec.shared,
            fs: rec.fs.clone(),
            state: if rec.attached_node.is_some() {
                "attached"
            } else {
                "detached"
            }
            .into(),
            attached_node: rec.attached_node.clone().unwrap_or_default(),
            replicas,
            block_size: rec.block_size,
            labels: rec.labels.clone().into_iter().collect(),
            io_priority: rec.io_priority.clone(),
            device_path: rec.device_path.clone(),
            mount_path: rec.mount_path.clone(),
            created_unix: rec.created_unix,
            epoch: rec.epoch,
            degraded,
        })
    }

    pub async fn list_volumes(&self) -> Result<Vec<pb::Volume>> {
        let mut recs = self.volume_records().await?;
        recs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(recs.len());
        for r in &recs {
            out.push(self.describe(r).await?);
        }
        Ok(out)
    }

    /// Deletes a detached volume and its replicas.
    #[instrument(skip(self))]
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let (rec, rev) = self.volume_by_name(name).await?;
        if let Some(node) = &rec.attached_node {
            return Err(Error::FailedPrecondition(format!(
                "volume {name:?} is attached to node {node}; detach it first"
            )));
        }
        // The record goes and its tombstone comes in one transaction: the tombstone is
        // what lets every node delete the replica files.
        let tomb = records::Tombstone {
            v: RECORD_VERSION,
            id: rec.id.clone(),
            name: rec.name.clone(),
            deleted_unix: records::now_unix(),
        };
        if !self
            .meta
            .delete_put_if(
                &self.keys.volume(&rec.id),
                rev,
                &self.keys.tombstone(&rec.id),
                &records::encode(&tomb),
            )
            .await?
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {name:?} changed while deleting; try again"
            )));
        }
        if let Some(kv) = self.meta.get(&self.keys.volume_name(name)).await? {
            if kv.value == rec.id {
                self.meta.delete_if(&kv.key, kv.rev).await?;
            }
        }
        // Replica files: removed now where the node answers; the others are collected by
        // their node's garbage collector when it sees the record gone.
        for node_id in &rec.replicas {
            if node_id == &self.id {
                self.pool.delete(&rec.id)?;
                continue;
            }
            let Ok(n) = self.node_record(node_id).await else {
                continue;
            };
            let Ok(mut c) = self.peers.block(&n.address) else {
                continue;
            };
            let req = ReplicaRef {
                volume_id: rec.id.clone(),
                size_bytes: rec.size_bytes,
            };
            if let Err(e) = tokio::time::timeout(USAGE_TIMEOUT, c.delete_replica(req)).await {
                warn!(node = %node_id, error = %e, "replica delete deferred to its node");
            }
        }
        info!(id = %rec.id, "volume deleted");
        Ok(())
    }
}

impl Node {
    /// Raises or lowers a volume's replication factor by one, online. A new replica
    /// starts empty and out of sync; the coordinator's resync worker builds it (a full
    /// copy of the written regions) while the volume stays in use. A removed replica
    /// leaves the record first, then its space is freed on its node.
    #[instrument(skip(self))]
    pub async fn ha_update(&self, name: &str, repl: u32, node: &str) -> Result<pb::Volume> {
        let (rec, _) = self.volume_by_name(name).await?;
        if repl == 0 || repl > MAX_REPL {
            return Err(Error::InvalidArgument(format!(
                "repl {repl} is out of range (1-{MAX_REPL})"
            )));
        }
        if repl == rec.repl {
            return Err(Error::InvalidArgument(format!(
                "volume {name:?} already has repl {repl}"
            )));
        }
        if repl.abs_diff(rec.repl) != 1 {
            return Err(Error::InvalidArgument(format!(
                "repl changes by one at a time (volume {name:?} has repl {})",
                rec.repl
            )));
        }
        let pinned = (!node.is_empty()).then_some(node);
        if repl > rec.repl {
            let mut candidates = Vec::new();
            for n in self.node_records().await? {
                let usage = self.usage_of(&n, &[]).await;
                candidates.push(Candidate {
                    free_bytes: usage
                        .as_ref()
                        .map(|u| u.capacity.saturating_sub(u.pool_used))
                        .unwrap_or(0),
                    online: usage.is_some(),
                    id: n.id,
                    zone: n.zone,
                    rack: n.rack,
                });
            }
            let new = placement::add_one(&candidates, &rec.replicas, pinned)?;
            let rec = self
                .update_volume(&rec.id, |r| {
                    if r.replicas.contains(&new) {
                        return Err(Error::FailedPrecondition(
                            "replicas changed meanwhile".into(),
                        ));
                    }
                    let in_sync = r.in_sync();
                    r.in_sync = Some(in_sync);
                    r.replicas.push(new.clone());
                    r.repl += 1;
                    r.left_at.insert(new.clone(), 0);
                    Ok(())
                })
                .await?;
            info!(node = %new, "replica added; it is built in the background by the coordinator");
            return self.describe(&rec).await;
        }
        // Lowering: the named replica, else one not in sync, else the last; never the
        // last in-sync replica.
        let in_sync = rec.in_sync();
        let victim = match pinned {
            Some(n) if !rec.replicas.iter().any(|r| r == n) => {
                return Err(Error::InvalidArgument(format!(
                    "node {n} holds no replica of volume {name:?}"
                )))
            }
            Some(n) => n.to_string(),
            None => rec
                .replicas
                .iter()
                .rev()
                .find(|n| !in_sync.contains(n))
                .or_else(|| {
                    rec.replicas
                        .iter()
                        .rev()
                        .find(|n| rec.attached_node.as_ref() != Some(*n))
                })
                .or(rec.replicas.last())
                .cloned()
                .expect("a volume has replicas"),
        };
        if in_sync.len() == 1 && in_sync[0] == victim {
            return Err(Error::FailedPrecondition(format!(
                "node {victim} holds the only in-sync replica of volume {name:?}"
            )));
        }
        let rec = self
            .update_volume(&rec.id, |r| {
                r.replicas.retain(|n| *n != victim);
                let mut s = r.in_sync();
                s.retain(|n| *n != victim);
                if s.is_empty() {
                    return Err(Error::FailedPrecondition(
                        "no in-sync replica would remain".into(),
                    ));
                }
                r.in_sync = Some(s);
                r.left_at.remove(&victim);
                r.resync.remove(&victim);
                r.repl -= 1;
                if r.attached_node.is_some() && !r.retired.contains(&victim) {
                    r.retired.push(victim.clone());
                }
                Ok(())
            })
            .await?;
        // While attached, the coordinator may still read or copy from the removed
        // replica until it adopts the new list: the file stays (retired) and its node's
        // garbage collector frees it once the coordinator lets go. Detached: free it now.
        if rec.attached_node.is_none() {
            if victim == self.id {
                let _ = self.pool.delete(&rec.id);
            } else if let Ok(n) = self.node_record(&victim).await {
                if let Ok(mut c) = self.peers.block(&n.address) {
                    let req = ReplicaRef {
                        volume_id: rec.id.clone(),
                        size_bytes: rec.size_bytes,
                    };
                    let _ = tokio::time::timeout(USAGE_TIMEOUT, c.delete_replica(req)).await;
                }
            }
        }
        info!(node = %victim, "replica removed");
        self.describe(&rec).await
    }
}
