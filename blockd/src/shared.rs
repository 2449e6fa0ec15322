//! The seam between the node and the shared namespace (`sharedfs`), which builds on
//! this crate and so cannot be called from it directly: the binary hands the node an
//! implementation of [`SharedNamespaces`] at start.
//!
//! The node decides *where* a shared volume is served (its coordinator: the node it is
//! attached to) and asks the implementation to serve it there and to mount clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::records::VolumeRecord;
use crate::role_lease::RoleGate;
use crate::volume_io::VolumeIo;

/// Finds the volume's coordinator again after the current one stopped answering:
/// returns its gRPC address, taking the volume over on this node when its coordinator
/// is declared dead. Blocking; called from a mount's threads.
pub type Resolver = Arc<dyn Fn() -> Result<String> + Send + Sync>;

pub trait SharedNamespaces: Send + Sync {
    /// This node became the volume's coordinator: serve its namespace over `io`
    /// (formatting it on first use, replaying its journal otherwise), answering only
    /// while `gate` is open (this node holds the coordinator role). Blocking.
    fn serve(&self, rec: &VolumeRecord, io: Arc<VolumeIo>, gate: RoleGate) -> Result<()>;
    /// Stop serving a volume (detach, shutdown).
    fn stop(&self, volume_id: &str);
    /// Mount the volume's namespace at `path`, served by the node at `coordinator`
    /// (a gRPC address); `resolve` finds the coordinator again. Blocking.
    fn mount(
        &self,
        rec: &VolumeRecord,
        coordinator: &str,
        path: &Path,
        resolve: Resolver,
    ) -> Result<()>;
    /// Unmounts a client mount; Ok(false) when `path` is not one.
    fn unmount(&self, path: &Path) -> Result<bool>;
    /// Client mounts on this node: (volume id, path).
    fn mounts(&self) -> Vec<(String, PathBuf)>;
}
