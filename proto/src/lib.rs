//! The Shoal wire protocol.
//!
//! Layout:
//! - [`control`]: the control API a CLI (or any client) speaks to a node: cluster status,
//!   volumes, attach / mount.
//! - [`block`]: the node-to-node block API: replica reads, writes, flushes and discards.
//! - [`ns`]: the namespace API a sharedfs mount speaks to its volume's coordinator.
//!
//! The `.proto` files in `proto/` are the source of truth; this crate only compiles them.

/// Control API (`shoal.control.v1`).
pub mod control {
    tonic::include_proto!("shoal.control.v1");
}

/// Block replication API (`shoal.block.v1`).
pub mod block {
    tonic::include_proto!("shoal.block.v1");
}

/// Namespace API (`shoal.ns.v1`).
pub mod ns {
    tonic::include_proto!("shoal.ns.v1");
}

/// Metadata header that carries a node's proof of cluster membership on node-to-node calls.
pub const CLUSTER_TOKEN_HEADER: &str = "x-shoal-cluster-token";
