//! Joining a cluster without ever mistaking a wrong or empty store for a new cluster.
//!
//! A data dir remembers the cluster it joined (`cluster-id`, and the cluster's `uuid`,
//! made once when the cluster record is created). A node that holds data (a pinned
//! cluster, or replica files in its pool) and finds no record of that cluster in the
//! store, or a record of another cluster of the same name, refuses to start and touches
//! nothing: absence of a record is not evidence that its data is unwanted. The decision
//! is [`plan`], pure; [`join`] is the thin shell around the store.

use tracing::info;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::peers::secret_hash;
use crate::records::{self, ClusterRecord, Keys};

/// What this node already holds, read off its data dir and pool.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// The cluster uuid pinned by an earlier join (None: never pinned).
    pub pinned_uuid: Option<String>,
    /// Whether the data dir records an earlier join (its `cluster-id` file).
    pub pinned_cluster: bool,
    /// Replica files in the pool.
    pub replicas: usize,
    /// Where the node's state lives, for messages.
    pub data_dir: String,
    /// The store, for messages.
    pub store: String,
}

/// What to do with the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Make the cluster record (a new cluster) with this uuid.
    Create,
    /// Join the cluster of this uuid.
    Join(String),
    /// An older record without a uuid: give it one (the node pins it).
    Adopt,
}

/// Decides how a node joins; see the module doc. `found` is the store's record of the
/// cluster id, `secret_ok` whether this node's secret matches it.
pub fn plan(
    cluster_id: &str,
    local: &Local,
    found: Option<&ClusterRecord>,
    secret_ok: bool,
) -> Result<Plan> {
    let holds_data = local.pinned_uuid.is_some() || local.pinned_cluster || local.replicas > 0;
    let Some(rec) = found else {
        if holds_data {
            return Err(Error::FailedPrecondition(format!(
                "the metadata store ({}) has no record of cluster {cluster_id:?}{}, which \
                 this node joined before; it holds {} replica file(s) (data dir {}). \
                 Nothing was changed. If the store address is wrong, correct it. If the \
                 cluster's metadata was lost, run `shoal cluster recover` with this \
                 node's flags on every node to rebuild it from the replicas",
                local.store,
                local
                    .pinned_uuid
                    .as_deref()
                    .map(|u| format!(" (uuid {u})"))
                    .unwrap_or_default(),
                local.replicas,
                local.data_dir,
            )));
        }
        return Ok(Plan::Create);
    };
    if !secret_ok {
        return Err(Error::PermissionDenied(format!(
            "wrong secret for cluster {cluster_id:?}: this node cannot join it"
        )));
    }
    match (&local.pinned_uuid, rec.uuid.is_empty()) {
        (Some(mine), false) if *mine != rec.uuid => Err(Error::FailedPrecondition(format!(
            "the metadata store ({}) holds another cluster named {cluster_id:?} (uuid {}, \
             created at unix time {}) than the one this node joined (uuid {mine}); it \
             holds {} replica file(s) (data dir {}). Nothing was changed. Point the node \
             at its own cluster's store, or, if that store was lost, run `shoal cluster \
             recover` against an empty store",
            local.store, rec.uuid, rec.created_unix, local.replicas, local.data_dir,
        ))),
        (None, false) if local.replicas > 0 && !local.pinned_cluster => {
            Err(Error::FailedPrecondition(format!(
                "the pool of this node holds {} replica file(s) but its data dir {} never \
                 joined cluster {cluster_id:?} (uuid {}); nothing was changed. Start it \
                 with the data dir it ran with, or move the replica files away",
                local.replicas, local.data_dir, rec.uuid
            )))
        }
        (_, false) => Ok(Plan::Join(rec.uuid.clone())),
        (_, true) => Ok(Plan::Adopt),
    }
}

/// Creates the cluster record, or checks this node against it; returns the cluster's
/// uuid (to pin). `local` is what the node holds.
pub async fn join(
    meta: &MetaStore,
    keys: &Keys,
    cfg: &NodeConfig,
    local: &Local,
) -> Result<String> {
    let want = secret_hash(&cfg.cluster_id, &cfg.secret);
    loop {
        let found = meta.get(&keys.cluster()).await?;
        let rec: Option<ClusterRecord> = match &found {
            Some(kv) => Some(records::decode(&kv.key, &kv.value)?),
            None => None,
        };
        let secret_ok = rec.as_ref().is_some_and(|r| r.secret_hash == want);
        match plan(&cfg.cluster_id, local, rec.as_ref(), secret_ok)? {
            Plan::Join(uuid) => return Ok(uuid),
            Plan::Create => {
                let uuid = uuid::Uuid::new_v4().simple().to_string();
                let rec = ClusterRecord::new(&cfg.cluster_id, &want, &uuid);
                if meta
                    .put_if(&keys.cluster(), &records::encode(&rec), 0)
                    .await?
                {
                    info!(cluster = %cfg.cluster_id, %uuid, "created cluster");
                    return Ok(uuid);
                }
            }
            Plan::Adopt => {
                let kv = found.expect("adopt needs a record");
                let mut rec = rec.expect("adopt needs a record");
                rec.uuid = local
                    .pinned_uuid
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                if meta.put_if(&kv.key, &records::encode(&rec), kv.rev).await? {
                    return Ok(rec.uuid);
                }
            }
        }
        // Another node changed the record first: decide again against theirs.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RECORD_VERSION;

    fn rec(uuid: &str) -> ClusterRecord {
        ClusterRecord {
            v: RECORD_VERSION,
            cluster_id: "c".into(),
            secret_hash: "h".into(),
            created_unix: 1,
            uuid: uuid.into(),
        }
    }

    fn local(uuid: Option<&str>, pinned_cluster: bool, replicas: usize) -> Local {
        Local {
            pinned_uuid: uuid.map(str::to_string),
            pinned_cluster,
            replicas,
            data_dir: "/d".into(),
            store: "etcd".into(),
        }
    }

    #[test]
    fn a_fresh_node_creates_or_joins() {
        assert_eq!(
            plan("c", &local(None, false, 0), None, false).unwrap(),
            Plan::Create
        );
        assert_eq!(
            plan("c", &local(None, false, 0), Some(&rec("u1")), true).unwrap(),
            Plan::Join("u1".into())
        );
    }

    #[test]
    fn a_node_with_data_never_takes_an_empty_store_for_a_new_cluster() {
        for l in [
            local(Some("u1"), true, 0),
            local(None, true, 0),
            local(None, false, 3),
        ] {
            let err = plan("c", &l, None, false).unwrap_err().to_string();
            assert!(err.contains("no record of cluster \"c\""), "{err}");
            assert!(err.contains("shoal cluster recover"), "{err}");
        }
    }

    #[test]
    fn a_node_refuses_another_cluster_of_the_same_name() {
        let err = plan("c", &local(Some("u1"), true, 2), Some(&rec("u2")), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another cluster") && err.contains("u2"),
            "{err}"
        );
        // Replica files with no record of ever joining are not adopted either.
        assert!(plan("c", &local(None, false, 2), Some(&rec("u2")), true).is_err());
    }

    #[test]
    fn the_secret_is_checked_and_old_records_get_a_uuid() {
        let err = plan("c", &local(Some("u1"), true, 0), Some(&rec("u1")), false).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)));
        assert_eq!(
            plan("c", &local(None, true, 1), Some(&rec("")), true).unwrap(),
            Plan::Adopt
        );
        assert_eq!(
            plan("c", &local(Some("u1"), true, 1), Some(&rec("u1")), true).unwrap(),
            Plan::Join("u1".into())
        );
    }
}
