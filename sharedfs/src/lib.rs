//! The shared namespace: one POSIX filesystem stored in a volume and mounted on many hosts.
//!
//! Layers, one folder each, bottom up:
//! - [`dev`]: the volume as a block device ([`volume_dev`]: a replicated Shoal volume).
//! - [`format`]: the on-volume structures (layout, journal and pages, the B-tree, the
//!   bitmap, inodes, fsck): pure, tested on an in-memory device.
//! - [`fs`]: the POSIX operations on those structures.
//! - [`coordinator`]: what runs on the volume's coordinator: the pure tables (leases,
//!   locks), the reply records, and the namespace service (its tonic shell inside).
//! - [`mount`]: the FUSE mount on any host: transport and session, the lease-bound
//!   cache, the FUSE adapter, the kernel mount.
//! - [`hooks`]: what the node calls to serve and mount namespaces.

pub mod coordinator;
pub mod dev;
pub mod error;
pub mod failpoints;
pub mod format;
pub mod fs;
pub mod hooks;
pub mod mount;
pub mod timing;
pub mod volume_dev;

pub use error::{FsError, Result};

/// A random 64-bit id (sessions, mounts): never equal to one an earlier run chose.
pub(crate) fn random_id() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}
