//! What the plugin needs from the node, and the node's answer to it.
//!
//! The trait keeps the endpoint logic ([`crate::plugin`]) apart from the cluster, so it
//! can be unit-tested on its own; [`NodeBackend`] is the real thing every `shoal node`
//! runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use shoal_blockd::Node;
use shoal_proto::control::{CreateVolumeRequest, Volume};

use crate::error::PluginError;

/// A volume as Docker shows it (`docker volume inspect`).
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub created_unix: u64,
    /// Shown under `Status`.
    pub status: BTreeMap<String, Value>,
}

pub trait Backend: Send + Sync + 'static {
    /// Creates a volume; a volume of that name that exists already is success (Docker
    /// retries Create, and two hosts may create the same global volume).
    fn create(
        &self,
        req: CreateVolumeRequest,
    ) -> impl Future<Output = Result<(), PluginError>> + Send;
    /// [`PluginError::NotFound`] when no such volume exists.
    fn get(&self, name: &str) -> impl Future<Output = Result<VolumeInfo, PluginError>> + Send;
    fn list(&self) -> impl Future<Output = Result<Vec<VolumeInfo>, PluginError>> + Send;
    /// Deletes a volume no host uses.
    fn remove(&self, name: &str) -> impl Future<Output = Result<(), PluginError>> + Send;
    /// Mounts the volume's filesystem at `path` on this host. Returns true when it
    /// attached a non-shared volume here for it (to be detached after the last unmount).
    fn mount(
        &self,
        name: &str,
        path: &Path,
    ) -> impl Future<Output = Result<bool, PluginError>> + Send;
    fn unmount(
        &self,
        name: &str,
        path: &Path,
        detach: bool,
    ) -> impl Future<Output = Result<(), PluginError>> + Send;
}

/// The plugin's view of the node it runs in.
pub struct NodeBackend(pub Arc<Node>);

fn info(v: &Volume) -> VolumeInfo {
    let replicas: Vec<Value> = v
        .replicas
        .iter()
        .map(|r| json!({"node": r.node, "state": r.state}))
        .collect();
    let mounts: Vec<Value> = v
        .sessions
        .iter()
        .map(|s| json!({"host": s.host, "path": s.mountpoint}))
        .collect();
    let status = BTreeMap::from([
        ("id".to_string(), json!(v.id)),
        ("size_bytes".to_string(), json!(v.size_bytes)),
        ("used_bytes".to_string(), json!(v.used_bytes)),
        ("repl".to_string(), json!(v.repl)),
        ("shared".to_string(), json!(v.shared)),
        ("fs".to_string(), json!(v.fs)),
        ("io_priority".to_string(), json!(v.io_priority)),
        ("labels".to_string(), json!(v.labels)),
        ("state".to_string(), json!(v.state)),
        ("attached_node".to_string(), json!(v.attached_node)),
        ("degraded".to_string(), json!(v.degraded)),
        ("replicas".to_string(), Value::Array(replicas)),
        ("mounts".to_string(), Value::Array(mounts)),
    ]);
    VolumeInfo {
        name: v.name.clone(),
        created_unix: v.created_unix,
        status,
    }
}

impl NodeBackend {
    async fn record(&self, name: &str) -> Result<shoal_blockd::records::VolumeRecord, PluginError> {
        match self.0.volume_by_name(name).await {
            Ok((rec, _)) => Ok(rec),
            Err(shoal_blockd::Error::NotFound(_)) => Err(PluginError::NotFound(name.into())),
            Err(e) => Err(e.into()),
        }
    }
}

impl Backend for NodeBackend {
    async fn create(&self, req: CreateVolumeRequest) -> Result<(), PluginError> {
        let name = req.name.clone();
        match self.0.create_volume(req).await {
            Ok(_) => Ok(()),
            Err(shoal_blockd::Error::AlreadyExists(_)) => {
                tracing::info!(volume = %name, "create: the volume exists already");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, name: &str) -> Result<VolumeInfo, PluginError> {
        let rec = self.record(name).await?;
        Ok(info(&self.0.describe(&rec).await?))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
        Ok(self.0.list_volumes().await?.iter().map(info).collect())
    }

    async fn remove(&self, name: &str) -> Result<(), PluginError> {
        let rec = self.record(name).await?;
        if let Some(node) = rec.attached_node.clone() {
            let v = self.0.describe(&rec).await?;
            if !v.sessions.is_empty() {
                let hosts: Vec<String> = v
                    .sessions
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.mountpoint))
                    .collect();
                return Err(PluginError::InUse(format!(
                    "volume {name:?} is in use: mounted at {}",
                    hosts.join(", ")
                )));
            }
            if !rec.mount_path.is_empty() {
                return Err(PluginError::InUse(format!(
                    "volume {name:?} is in use: mounted at {} on node {node}",
                    rec.mount_path
                )));
            }
            if !rec.shared && node != self.0.id {
                return Err(PluginError::InUse(format!(
                    "volume {name:?} is in use: attached to node {node}"
                )));
            }
            // Attached but unused (a shared volume's coordinator outlives its mounts).
            self.0.detach(name).await?;
        }
        self.0.delete_volume(name).await?;
        Ok(())
    }

    async fn mount(&self, name: &str, path: &Path) -> Result<bool, PluginError> {
        let rec = self.record(name).await?;
        // Attached here by this mount (also when taken over from a dead node): detached
        // again after the last unmount, so another host can have it.
        let attach_here = !rec.shared && rec.attached_node.as_deref() != Some(self.0.id.as_str());
        let shown = path.to_string_lossy();
        if let Err(e) = self.0.mount(name, &shown).await {
            if attach_here && self.record(name).await?.attached_node.as_deref() == Some(&self.0.id)
            {
                // Attached, then the mount failed: do not keep it from other hosts.
                if let Err(d) = self.0.detach(name).await {
                    tracing::warn!(volume = %name, error = %d, "detach after a failed mount");
                }
            }
            return Err(e.into());
        }
        Ok(attach_here)
    }

    async fn unmount(&self, name: &str, path: &Path, detach: bool) -> Result<(), PluginError> {
        self.0.unmount(&path.to_string_lossy()).await?;
        if detach {
            // The unmount is done and stays done; a failed detach is only logged (the
            // volume stays attached here until `shoal volume detach`).
            if let Err(e) = self.0.detach(name).await {
                tracing::warn!(volume = %name, error = %e, "detach after the last unmount failed");
            }
        }
        Ok(())
    }
}
