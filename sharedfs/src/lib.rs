//! The shared namespace: one POSIX filesystem stored in a volume and mounted on many hosts.
//!
//! Layers, bottom up: [`dev`] (the volume as a block device), [`layout`] (where things
//! are), [`journal`] and [`pages`] (atomic metadata transactions), [`btree`] (the one
//! ordered map every namespace record lives in), [`alloc`] (the free-space bitmap), and
//! [`fs`] (inodes, directories, extents, xattrs: the POSIX operations). Over the
//! network: [`service`] (the namespace API on the coordinator; [`replies`] keeps its answers to
//! changes in the volume), [`client`] (the FUSE
//! mount on any host), [`hooks`] (what the node calls), [`volume_dev`] (a replicated
//! volume as the block device).

pub mod alloc;
pub mod btree;
pub mod cache;
pub mod client;
pub mod dev;
pub mod error;
pub mod failpoints;
pub mod fs;
pub mod fsck;
pub mod hooks;
pub mod inode;
pub mod journal;
pub mod layout;
pub mod leases;
pub mod locks;
pub mod pages;
pub mod replies;
pub mod service;
pub mod volume_dev;

pub use error::{FsError, Result};

/// A random 64-bit id (sessions, mounts): never equal to one an earlier run chose.
pub(crate) fn random_id() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}
