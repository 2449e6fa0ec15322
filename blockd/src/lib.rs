//! The Shoal storage node.
//!
//! Layout, bottom up:
//! - [`error`], [`size`], [`config`]: the error type, human sizes, node configuration.
//! - [`meta`], [`records`]: cluster metadata (etcd or embedded) and the records in it;
//!   [`cluster_join`]: joining without taking an empty store for a new cluster;
//!   [`recover`]: rebuilding the metadata from the replicas' own headers.
//! - [`pool`]: local replica files, thin-provisioned.
//! - [`placement`]: which nodes hold a volume's replicas (pure logic).
//! - [`membership`]: SWIM gossip (foca) for liveness.
//! - [`peers`]: gRPC channels to other nodes and the cluster token.
//! - [`volume_io`]: the coordinator's replicated reads and writes; [`write_wire`] and
//!   [`write_http`] carry its replica writes without copying their data in user space.
//! - [`device_fs`], [`host`], [`attach`]: a volume exposed on a node as a raw file, a
//!   loop device and an ext4 mount.
//! - [`volumes`], [`status`], [`services`], [`node`]: the control path and the node.
//!
//! Nothing here knows about files inside a volume: that is `sharedfs`.

pub mod activity;
pub mod attach;
pub mod auth;
pub mod cluster_join;
pub mod config;
pub mod coordinator_role;
pub mod detached;
pub mod device_fs;
pub mod error;
pub mod gossip_auth;
pub mod host;
pub mod membership;
pub mod meta;
pub mod node;
pub mod peers;
pub mod placement;
pub mod pool;
pub mod powerloss;
pub mod range_lock;
pub mod read_cache;
pub mod reconcile;
pub mod records;
pub mod recover;
pub mod replication;
pub mod resync;
pub mod role_lease;
pub mod services;
pub mod shared;
pub mod size;
pub mod status;
pub mod thread_io;
pub mod versions;
pub mod volume_io;
pub mod volumes;
pub mod write_http;
pub mod write_wire;
pub mod writeback;

pub use config::NodeConfig;
pub use error::{Error, Result};
pub use node::Node;
