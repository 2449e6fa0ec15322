//! `shoal status` and the shared printing of volumes.

use serde_json::{json, Value};
use shoal_blockd::size::format_size;
use shoal_proto::control::control_client::ControlClient;
use shoal_proto::control::{StatusRequest, Volume};
use tonic::transport::Channel;

use crate::{status_error, table};

pub async fn status(client: &mut ControlClient<Channel>, as_json: bool) -> anyhow::Result<()> {
    let s = client
        .status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let nodes: Vec<Value> = s
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id, "address": n.address, "gossip_address": n.gossip_address,
                    "zone": n.zone, "rack": n.rack, "state": n.state,
                    "capacity_bytes": n.capacity_bytes, "used_bytes": n.used_bytes,
                })
            })
            .collect();
        let out = json!({
            "cluster_id": s.cluster_id,
            "local_node_id": s.local_node_id,
            "capacity_bytes": s.capacity_bytes,
            "used_bytes": s.used_bytes,
            "provisioned_bytes": s.provisioned_bytes,
            "overcommit": overcommit(s.provisioned_bytes, s.capacity_bytes),
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let online = s.nodes.iter().filter(|n| n.state == "online").count();
    println!(
        "Cluster {}  (answered by node {})",
        s.cluster_id, s.local_node_id
    );
    println!(
        "Nodes: {online} online of {}   Capacity: {}   Used: {}   Provisioned: {} ({:.2}x of capacity)",
        s.nodes.len(),
        format_size(s.capacity_bytes),
        format_size(s.used_bytes),
        format_size(s.provisioned_bytes),
        overcommit(s.provisioned_bytes, s.capacity_bytes),
    );
    println!();
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.address.clone(),
                n.zone.clone(),
                n.rack.clone(),
                n.state.clone(),
                format_size(n.capacity_bytes),
                format_size(n.used_bytes),
            ]
        })
        .collect();
    table::print(
        &["ID", "ADDRESS", "ZONE", "RACK", "STATE", "CAPACITY", "USED"],
        &rows,
    );
    Ok(())
}

fn overcommit(provisioned: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        (provisioned as f64 / capacity as f64 * 100.0).round() / 100.0
    }
}

/// The scripting view of a volume (names are a contract: see docs/cli.md).
pub fn volume_json(v: &Volume) -> Value {
    json!({
        "name": v.name,
        "id": v.id,
        "size_bytes": v.size_bytes,
        "used_bytes": v.used_bytes,
        "repl": v.repl,
        "shared": v.shared,
        "fs": v.fs,
        "state": v.state,
        "attached_node": if v.attached_node.is_empty() { Value::Null } else { json!(v.attached_node) },
        "device_path": if v.device_path.is_empty() { Value::Null } else { json!(v.device_path) },
        "mount_path": if v.mount_path.is_empty() { Value::Null } else { json!(v.mount_path) },
        "block_size": v.block_size,
        "io_priority": v.io_priority,
        "labels": v.labels,
        "epoch": v.epoch,
        "coordinator": if v.attached_node.is_empty() { Value::Null } else { json!(v.attached_node) },
        "degraded": v.degraded,
        "created_unix": v.created_unix,
        "replicas": v.replicas.iter().map(|r| {
            let mut o = json!({
                "node": r.node, "state": r.state, "used_bytes": r.used_bytes,
                "last_resync_bytes": r.last_resync_bytes,
            });
            if r.state == "resyncing" {
                o["resync_done_bytes"] = json!(r.resync_done_bytes);
                o["resync_total_bytes"] = json!(r.resync_total_bytes);
                o["resync_left_bytes"] =
                    json!(r.resync_total_bytes.saturating_sub(r.resync_done_bytes));
                o["resync_percent"] = json!(percent(r.resync_done_bytes, r.resync_total_bytes));
            }
            o
        }).collect::<Vec<_>>(),
        "sessions": v.sessions.iter().map(|s| json!({
            "id": s.id, "host": s.host, "mountpoint": s.mountpoint,
            "age_seconds": s.age_ms / 1000, "open_files": s.open_files, "locks": s.locks,
            "leases": s.leases,
        })).collect::<Vec<_>>(),
    })
}

/// Prints one volume for people.
pub fn volume_text(v: &Volume) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    println!("Volume      {}", v.name);
    println!("ID          {}", v.id);
    println!("Size        {}", format_size(v.size_bytes));
    println!("Used        {}", format_size(v.used_bytes));
    println!("Repl        {}", v.repl);
    println!("Block size  {}", format_size(v.block_size as u64));
    println!("FS          {}", v.fs);
    println!("Priority    {}", v.io_priority);
    let degraded = if v.degraded { " (degraded)" } else { "" };
    println!("State       {}{degraded}", v.state);
    println!("Epoch       {}", v.epoch);
    println!("Attached    {}", dash(&v.attached_node));
    println!("Device      {}", dash(&v.device_path));
    println!("Mounted at  {}", dash(&v.mount_path));
    if !v.labels.is_empty() {
        let mut labels: Vec<String> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!("Labels      {}", labels.join(","));
    }
    println!("Replicas:");
    let rows: Vec<Vec<String>> = v
        .replicas
        .iter()
        .map(|r| {
            let state = if r.state == "resyncing" {
                format!(
                    "resyncing {:.0}% ({} left)",
                    percent(r.resync_done_bytes, r.resync_total_bytes),
                    format_size(r.resync_total_bytes.saturating_sub(r.resync_done_bytes))
                )
            } else {
                r.state.clone()
            };
            vec![r.node.clone(), state, format_size(r.used_bytes)]
        })
        .collect();
    table::print(&["NODE", "STATE", "USED"], &rows);
    if v.shared {
        println!("Mounts:");
        let rows: Vec<Vec<String>> = v
            .sessions
            .iter()
            .map(|s| {
                vec![
                    s.host.clone(),
                    s.mountpoint.clone(),
                    format!("{}s", s.age_ms / 1000),
                    s.open_files.to_string(),
                    s.locks.to_string(),
                ]
            })
            .collect();
        table::print(&["HOST", "MOUNTPOINT", "AGE", "OPEN", "LOCKS"], &rows);
    }
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (done as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// `shoal cluster join-token`: the token on stdout (the only line, for scripts), how to
/// use it on stderr.
pub async fn join_token(
    client: &mut ControlClient<Channel>,
    ttl: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = client
        .create_join_token(shoal_proto::control::JoinTokenRequest {
            ttl_secs: ttl.as_secs(),
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    if as_json {
        println!(
            "{}",
            serde_json::json!({"token": r.token, "expires_unix": r.expires_unix})
        );
        return Ok(());
    }
    println!("{}", r.token);
    eprintln!(
        "One node may join with this token within {} s: start it with SHOAL_JOIN_TOKEN set \
         to the token (or --join-token-file FILE) and the cluster's --kvdb and --cluster-id; \
         it keeps the secret in its data dir.",
        ttl.as_secs()
    );
    Ok(())
}
