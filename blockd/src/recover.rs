//! Rebuilding the cluster metadata from the replicas themselves (`shoal cluster recover`).
//!
//! Every replica carries a [`Descriptor`] in its version file's header (cluster, volume,
//! name, size, replication, …) beside its fencing epoch and region versions. When the
//! store is lost, each node runs `recover` once with the flags it starts with: it reads
//! its own pool, records what it found as evidence under `recovery/<volume>/<node>`,
//! and (re)computes each volume's record from the evidence of every node so far
//! ([`plan`], pure). The complete replicas (not marked as being caught up) with the
//! highest version are in sync; every other one is out of sync holding nothing (a full
//! resync rebuilds it). While a volume has recovery evidence, its record is no evidence
//! for deleting a replica it does not list (a node may not have reported yet). Nothing is deleted, no
//! replica is written, and a record that moved on since recovery (attached, changed) is
//! left as it is.

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cluster_join;
use crate::config::{NodeConfig, PoolKind};
use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::node::{open_store, read_pinned, store_name};
use crate::peers::secret_hash;
use crate::pool::Pool;
use crate::records::{self, ClusterRecord, Keys, VolumeRecord, RECORD_VERSION};
use crate::versions::Descriptor;

/// What one node's replica of a volume said about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub v: u32,
    pub node: String,
    pub descriptor: Descriptor,
    pub epoch: u64,
    pub complete_below: u64,
    pub max_version: u64,
    /// The replica was being caught up: it may lack regions below its highest version.
    #[serde(default)]
    pub catching_up: bool,
    /// Its host rebooted since it was last used: its versions may claim data a power
    /// cut took (see `Pool::open_replica`).
    #[serde(default)]
    pub rebooted: bool,
}

/// The volume record the evidence of its replicas supports (None: no evidence).
pub fn plan(evidence: &[Evidence]) -> Option<VolumeRecord> {
    let mut ev: Vec<&Evidence> = evidence.iter().collect();
    // Freshest first: complete replicas before ones being caught up (which may lack old
    // regions whatever their highest version), replicas whose host did not reboot before
    // ones whose did (whose versions may claim data a power cut took), then highest
    // version, then highest epoch, then node id (a stable order).
    ev.sort_by(|a, b| {
        (!b.catching_up, !b.rebooted, b.max_version, b.epoch)
            .cmp(&(!a.catching_up, !a.rebooted, a.max_version, a.epoch))
            .then(a.node.cmp(&b.node))
    });
    let top = *ev.first()?;
    let d = &top.descriptor;
    // Acknowledged writes are on every in-sync replica, so the in-sync ones are complete
    // replicas with the highest version; the others may have missed writes and copy
    // everything. (Only if every replica was being caught up is the freshest of them
    // taken: there is nothing better.)
    let in_sync: Vec<String> = ev
        .iter()
        .filter(|e| {
            e.max_version == top.max_version
                && e.catching_up == top.catching_up
                && e.rebooted == top.rebooted
        })
        .map(|e| e.node.clone())
        .collect();
    let keep = (d.repl as usize).max(in_sync.len());
    let replicas: Vec<String> = ev.iter().take(keep).map(|e| e.node.clone()).collect();
    // Extra stale copies stay on disk (retired) until the volume's next detach frees them.
    let retired: Vec<String> = ev.iter().skip(keep).map(|e| e.node.clone()).collect();
    let left_at = replicas
        .iter()
        .filter(|n| !in_sync.contains(n))
        .map(|n| (n.clone(), 0))
        .collect();
    Some(VolumeRecord {
        v: RECORD_VERSION,
        id: d.volume_id.clone(),
        name: d.name.clone(),
        size_bytes: d.size_bytes,
        repl: replicas.len() as u32,
        block_size: d.block_size,
        fs: d.fs.clone(),
        labels: d.labels.clone(),
        io_priority: d.io_priority.clone(),
        shared: d.shared,
        replicas,
        attached_node: None,
        device_path: String::new(),
        mount_path: String::new(),
        // A filesystem volume that was ever written was formatted by its first attach.
        formatted: d.formatted || (top.max_version > 0 && (d.fs == "ext4" || d.shared)),
        epoch: ev.iter().map(|e| e.epoch).max().unwrap_or(0),
        created_unix: d.created_unix,
        in_sync: Some(in_sync),
        left_at,
        resync: Default::default(),
        resync_bytes: Default::default(),
        // The replicas exist: a missing in-sync one is never made empty again.
        replicas_made: true,
        retired,
    })
}

/// What recovery did with one replica file.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    pub volume_id: String,
    pub name: String,
    /// "created", "updated", "kept" or "skipped".
    pub action: String,
    pub detail: String,
}

/// Runs recovery for the node whose flags are `cfg`; see the module doc.
pub async fn recover(cfg: &NodeConfig) -> Result<Vec<Recovered>> {
    cfg.validate()?;
    let dir = &cfg.data_dir;
    let missing = |what: &str| {
        Error::FailedPrecondition(format!(
            "data dir {} has no {what}: it never joined a cluster with this build, so \
             there is nothing to recover from it",
            dir.display()
        ))
    };
    let node_id = read_pinned(dir, "node-id")?.ok_or_else(|| missing("node-id"))?;
    let pinned_cluster = read_pinned(dir, "cluster-id")?.ok_or_else(|| missing("cluster-id"))?;
    if pinned_cluster != cfg.cluster_id {
        return Err(Error::PermissionDenied(format!(
            "data dir {} belongs to cluster {pinned_cluster:?}, not {:?}",
            dir.display(),
            cfg.cluster_id
        )));
    }
    let uuid = read_pinned(dir, "cluster-uuid")?.ok_or_else(|| missing("cluster-uuid"))?;
    let pool_dir = match cfg.pool_kind() {
        PoolKind::Directory(d) => d,
        PoolKind::Device { mountpoint, .. } => mountpoint,
    };
    let pool = Pool::open(&pool_dir, None)?;
    let meta = open_store(cfg).await?;
    let keys = Keys::new(&cfg.cluster_id);
    cluster_record(&meta, &keys, cfg, &uuid).await?;

    let mut ids: Vec<String> = pool.replica_ids()?.into_iter().collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let d = match pool.describe(&id) {
            Ok(d) => d,
            Err(e) => {
                out.push(skipped(&id, format!("cannot read its header: {e}")));
                continue;
            }
        };
        let Some(desc) = d.descriptor else {
            out.push(skipped(
                &id,
                "written before replicas described themselves".into(),
            ));
            continue;
        };
        if desc.cluster_uuid != uuid || desc.volume_id != id {
            out.push(skipped(
                &id,
                format!(
                    "its header names cluster uuid {} volume {}",
                    desc.cluster_uuid, desc.volume_id
                ),
            ));
            continue;
        }
        let ev = Evidence {
            v: RECORD_VERSION,
            node: node_id.clone(),
            descriptor: desc,
            epoch: d.epoch,
            complete_below: d.complete_below,
            max_version: d.max_version,
            catching_up: d.catching_up,
            rebooted: d.rebooted,
        };
        out.push(recover_one(&meta, &keys, ev).await?);
    }
    info!(node = %node_id, store = %store_name(cfg), replicas = out.len(), "recovery done");
    Ok(out)
}

fn skipped(id: &str, detail: String) -> Recovered {
    warn!(volume = %id, %detail, "replica skipped");
    Recovered {
        volume_id: id.to_string(),
        name: String::new(),
        action: "skipped".into(),
        detail,
    }
}

/// Makes the cluster record with the pinned uuid if the store has none; refuses another
/// cluster's record or a wrong secret.
async fn cluster_record(meta: &MetaStore, keys: &Keys, cfg: &NodeConfig, uuid: &str) -> Result<()> {
    let want = secret_hash(&cfg.cluster_id, &cfg.secret);
    let rec = ClusterRecord::new(&cfg.cluster_id, &want, uuid);
    if meta
        .put_if(&keys.cluster(), &records::encode(&rec), 0)
        .await?
    {
        info!(cluster = %cfg.cluster_id, %uuid, "cluster record recovered");
        return Ok(());
    }
    let kv = meta
        .get(&keys.cluster())
        .await?
        .ok_or_else(|| Error::Internal("cluster record vanished".into()))?;
    let found: ClusterRecord = records::decode(&kv.key, &kv.value)?;
    let local = cluster_join::Local {
        pinned_uuid: Some(uuid.to_string()),
        pinned_cluster: true,
        replicas: 0,
        data_dir: cfg.data_dir.display().to_string(),
        store: store_name(cfg),
    };
    match cluster_join::plan(
        &cfg.cluster_id,
        &local,
        Some(&found),
        found.secret_hash == want,
    )? {
        cluster_join::Plan::Join(_) => Ok(()),
        _ => Err(Error::FailedPrecondition(format!(
            "the store's record of cluster {:?} has no uuid; start a node of it once first",
            cfg.cluster_id
        ))),
    }
}

/// Records one replica's evidence and folds it into its volume's record.
async fn recover_one(meta: &MetaStore, keys: &Keys, ev: Evidence) -> Result<Recovered> {
    let id = ev.descriptor.volume_id.clone();
    let name = ev.descriptor.name.clone();
    let done = |action: &str, detail: String| Recovered {
        volume_id: id.clone(),
        name: name.clone(),
        action: action.into(),
        detail,
    };
    if meta.get(&keys.tombstone(&id)).await?.is_some() {
        return Ok(done(
            "kept",
            "the volume was deleted (tombstone); its file is left for the node to free".into(),
        ));
    }
    let me = ev.node.clone();
    meta.put(&keys.recovery_of(&id, &me), &records::encode(&ev))
        .await?;
    loop {
        let mut all = Vec::new();
        for kv in meta.list(&keys.recovery(&id)).await? {
            all.push(records::decode::<Evidence>(&kv.key, &kv.value)?);
        }
        let others: Vec<Evidence> = all.iter().filter(|e| e.node != me).cloned().collect();
        let rec = plan(&all).expect("our own evidence is there");
        let key = keys.volume(&id);
        let (rev, action) = match meta.get(&key).await? {
            None => (0, "created"),
            Some(kv) => {
                let current: VolumeRecord = records::decode(&kv.key, &kv.value)?;
                if current == rec {
                    return Ok(done("kept", "already recovered".into()));
                }
                if plan(&others).as_ref() != Some(&current) {
                    // The record is not (only) what recovery made of the other nodes'
                    // evidence: a live record, or one changed since. Leave it.
                    let listed = current.keeps_data_on(&me);
                    return Ok(done(
                        "kept",
                        if listed {
                            "its record exists and lists this node".into()
                        } else {
                            "its record exists and moved on since; this replica was not added"
                                .into()
                        },
                    ));
                }
                (kv.rev, "updated")
            }
        };
        if meta.put_if(&key, &records::encode(&rec), rev).await? {
            let name_key = keys.volume_name(&rec.name);
            let named = meta.put_if(&name_key, &rec.id, 0).await?;
            let detail = format!(
                "epoch {}, in sync: {}, replicas: {}",
                rec.epoch,
                rec.in_sync().join(","),
                rec.replicas.join(",")
            );
            let taken = match meta.get(&name_key).await? {
                Some(kv) if !named && kv.value != rec.id => {
                    format!("; its name is taken by volume {}, so it has none", kv.value)
                }
                _ => String::new(),
            };
            info!(volume = %id, name = %rec.name, action, %detail, "volume recovered");
            return Ok(done(action, format!("{detail}{taken}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(node: &str, epoch: u64, max_version: u64) -> Evidence {
        Evidence {
            v: RECORD_VERSION,
            node: node.into(),
            descriptor: Descriptor {
                cluster_id: "c".into(),
                cluster_uuid: "u".into(),
                volume_id: "vol1".into(),
                name: "db".into(),
                size_bytes: 1 << 30,
                repl: 2,
                block_size: 4096,
                fs: "ext4".into(),
                shared: false,
                io_priority: "medium".into(),
                labels: Default::default(),
                formatted: false,
                created_unix: 5,
            },
            epoch,
            complete_below: 0,
            max_version,
            catching_up: false,
            rebooted: false,
        }
    }

    #[test]
    fn a_replica_whose_host_rebooted_is_in_sync_only_when_every_one_did() {
        // b's host rebooted: its higher version may be one whose data a power cut took.
        let mut b = ev("b", 3, 120);
        b.rebooted = true;
        let rec = plan(&[b.clone(), ev("a", 3, 100)]).unwrap();
        assert_eq!(rec.in_sync(), ["a"]);
        assert_eq!(rec.left_at["b"], 0);
        // Every host rebooted: the freshest of them are taken (there is nothing better).
        let mut a = ev("a", 3, 100);
        a.rebooted = true;
        let rec = plan(&[b, a]).unwrap();
        assert_eq!(rec.in_sync(), ["b"]);
    }

    #[test]
    fn the_freshest_replicas_are_in_sync_and_the_rest_copy_everything() {
        let rec = plan(&[ev("a", 3, 100), ev("b", 2, 60)]).unwrap();
        assert_eq!(rec.replicas, ["a", "b"]);
        assert_eq!(rec.in_sync(), ["a"]);
        assert_eq!(rec.left_at["b"], 0, "a full resync");
        assert_eq!(rec.epoch, 3);
        assert!(rec.attached_node.is_none());
        assert!(rec.formatted, "written ext4 volume was formatted");
        assert_eq!((rec.name.as_str(), rec.size_bytes), ("db", 1 << 30));
    }

    #[test]
    fn equal_versions_are_all_in_sync_whatever_the_epoch() {
        let rec = plan(&[ev("a", 3, 100), ev("b", 4, 100)]).unwrap();
        // Freshest first: the one that follows the newer epoch.
        assert_eq!(rec.in_sync(), ["b", "a"]);
        assert!(rec.left_at.is_empty());
        assert_eq!(rec.epoch, 4);
    }

    #[test]
    fn a_replica_being_caught_up_is_never_in_sync_whatever_its_version() {
        // A resync target gets every live write, so its highest version matches, but
        // regions it had not copied yet are holes.
        let mut b = ev("b", 3, 100);
        b.catching_up = true;
        let rec = plan(&[b, ev("a", 3, 100)]).unwrap();
        assert_eq!(rec.in_sync(), ["a"]);
        assert_eq!(rec.left_at["b"], 0);
    }

    #[test]
    fn extra_stale_copies_are_retired_not_deleted() {
        let rec = plan(&[ev("a", 3, 100), ev("b", 3, 100), ev("c", 1, 5)]).unwrap();
        assert_eq!(rec.replicas, ["a", "b"]);
        assert_eq!(rec.retired, ["c"]);
        assert!(rec.keeps_data_on("c"));
        // More in-sync copies than the factor: all kept in sync.
        let rec = plan(&[ev("a", 3, 100), ev("b", 3, 100), ev("c", 3, 100)]).unwrap();
        assert_eq!(rec.in_sync().len(), 3);
        assert_eq!(rec.repl, 3);
    }

    #[test]
    fn nothing_to_plan_without_evidence_and_an_unwritten_volume_is_not_formatted() {
        assert!(plan(&[]).is_none());
        assert!(!plan(&[ev("a", 1, 0)]).unwrap().formatted);
    }
}
