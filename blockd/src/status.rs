//! Cluster status: every registered node with its liveness and space, and the totals.

use shoal_proto::control::{NodeStatus, StatusReply};

use crate::error::Result;
use crate::node::Node;

impl Node {
    /// The cluster as this node sees it.
    pub async fn status(&self) -> Result<StatusReply> {
        let mut nodes = Vec::new();
        let (mut capacity, mut used) = (0u64, 0u64);
        let mut records = self.node_records().await?;
        records.sort_by(|a, b| a.address.cmp(&b.address));
        for rec in records {
            // Online means gossip has not declared the node dead: the same rule that
            // decides whether its volumes may be taken over.
            let online = self.membership.is_online(&rec.id);
            let usage = self.usage_of(&rec, &[]).await;
            let (cap, u) = usage
                .map(|u| (u.capacity, u.pool_used))
                .unwrap_or((rec.capacity_bytes, 0));
            capacity += cap;
            used += u;
            nodes.push(NodeStatus {
                id: rec.id,
                address: rec.address,
                gossip_address: rec.gossip,
                zone: rec.zone,
                rack: rec.rack,
                state: if online { "online" } else { "offline" }.into(),
                capacity_bytes: cap,
                used_bytes: u,
            });
        }
        let provisioned = self
            .volume_records()
            .await?
            .iter()
            .map(|v| v.size_bytes * v.repl as u64)
            .sum();
        Ok(StatusReply {
            cluster_id: self.cfg.cluster_id.clone(),
            local_node_id: self.id.clone(),
            capacity_bytes: capacity,
            used_bytes: used,
            provisioned_bytes: provisioned,
            nodes,
        })
    }
}
