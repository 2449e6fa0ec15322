//! Upkeep of detached volumes: a replica that came back, one added by `ha-update`, or
//! one to rebuild because its node stayed away too long is caught up while its volume is
//! attached nowhere, without waiting for the next attach.
//!
//! Every node looks at the volume records every few seconds. A detached volume needs
//! upkeep when one of its replicas is out of the in-sync set and its node is online, or
//! when a replica's node has been offline longer than `--rebuild-after` and a spare node
//! is online. Of the online nodes holding an in-sync replica, the first by id does it:
//!
//! 1. it claims the volume by bumping its epoch in a conditional update that requires
//!    the volume to be still detached (as an attach does, but the record keeps naming no
//!    attached node);
//! 2. opens the volume's replicated I/O at that epoch (every in-sync replica fenced and
//!    reconciled), with no device and no client;
//! 3. adopts the record (rebuilds replicas of nodes gone too long) and resyncs every
//!    replica that is behind, with progress in the record as for an attached volume.
//!
//! An attach meanwhile — anywhere — bumps the epoch again: from then on the replicas
//! refuse the upkeep's copies and the record refuses its progress and rejoin updates, so
//! the attach goes ahead at once and the new coordinator's own worker takes the resync
//! over (resuming from the recorded progress). A pass that fails is not tried again for
//! that volume for [`RETRY_AFTER`], so a replica that cannot be caught up (a full pool)
//! does not make the epoch climb every few seconds.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn, Instrument};

use crate::error::{Error, Result};
use crate::node::Node;
use crate::records::VolumeRecord;
use crate::resync::{self, WorkerCtx};

/// How often a node looks for detached volumes that need upkeep.
const SCAN_EVERY: Duration = Duration::from_secs(3);
/// After a failed pass, how long a volume is left alone.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What one node remembers between scans.
#[derive(Default)]
struct Memory {
    /// Volume id -> replica node -> when this node first saw it offline.
    down_since: HashMap<String, HashMap<String, Instant>>,
    /// Volume id -> when its last pass failed.
    failed_at: HashMap<String, Instant>,
}

/// Runs the upkeep of detached volumes until the process ends.
pub async fn upkeep_loop(node: Arc<Node>) {
    let mut mem = Memory::default();
    loop {
        tokio::time::sleep(SCAN_EVERY).await;
        let recs = match node.volume_records().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "upkeep: cannot list volumes");
                continue;
            }
        };
        let spare_online = spare_online(&node).await;
        mem.down_since.retain(|id, _| {
            recs.iter()
                .any(|r| r.id == *id && r.attached_node.is_none())
        });
        for rec in recs {
            if rec.attached_node.is_some() {
                continue;
            }
            if !needs_upkeep(&node, &rec, &mut mem, &spare_online) {
                continue;
            }
            let span = info_span!("upkeep", volume = %rec.name);
            let down = mem.down_since.entry(rec.id.clone()).or_default();
            match run_pass(&node, &rec, down).instrument(span).await {
                Ok(()) => {
                    mem.failed_at.remove(&rec.id);
                }
                Err(e) => {
                    warn!(volume = %rec.name, error = %e, "upkeep of a detached volume stopped; will retry");
                    mem.failed_at.insert(rec.id.clone(), Instant::now());
                }
            }
        }
    }
}

/// Online nodes that could take a rebuilt replica, if any (ids).
async fn spare_online(node: &Node) -> Vec<String> {
    match node.node_records().await {
        Ok(nodes) => nodes
            .into_iter()
            .filter(|n| node.membership.is_online(&n.id))
            .map(|n| n.id)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether this node should run a pass for `rec` (detached) now.
fn needs_upkeep(node: &Node, rec: &VolumeRecord, mem: &mut Memory, online: &[String]) -> bool {
    if mem
        .failed_at
        .get(&rec.id)
        .is_some_and(|t| t.elapsed() < RETRY_AFTER)
    {
        return false;
    }
    let in_sync = rec.in_sync();
    // The first online in-sync holder does it; the others leave it alone.
    let doer = in_sync
        .iter()
        .filter(|n| node.membership.is_online(n))
        .min()
        .cloned();
    if doer.as_deref() != Some(node.id.as_str()) {
        return false;
    }
    let behind = rec
        .replicas
        .iter()
        .any(|n| !in_sync.contains(n) && node.membership.is_online(n));
    let now = Instant::now();
    let down = mem.down_since.entry(rec.id.clone()).or_default();
    down.retain(|n, _| rec.replicas.contains(n) && !node.membership.is_online(n));
    for n in &rec.replicas {
        if !node.membership.is_online(n) {
            down.entry(n.clone()).or_insert(now);
        }
    }
    let overdue = down
        .iter()
        .any(|(_, t)| now.duration_since(*t) >= node.cfg.rebuild_after);
    let spare = online.iter().any(|n| !rec.replicas.contains(n));
    behind || (overdue && spare)
}

/// Claims the detached volume, opens it, adopts the record and resyncs what is behind.
async fn run_pass(
    node: &Arc<Node>,
    rec: &VolumeRecord,
    down_since: &mut HashMap<String, Instant>,
) -> Result<()> {
    let name = rec.name.clone();
    let claimed = node
        .update_volume(&rec.id, |r| {
            if r.attached_node.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {name:?} was attached meanwhile"
                )));
            }
            r.epoch += 1;
            Ok(())
        })
        .await?;
    info!(
        epoch = claimed.epoch,
        "catching up the replicas of a detached volume"
    );
    let io = node.open_volume_io(&claimed, true).await?;
    let ctx = WorkerCtx {
        membership: node.membership.clone(),
        peers: node.peers.clone(),
        rebuild_after: node.cfg.rebuild_after,
        stop: Arc::new(AtomicBool::new(false)),
    };
    resync::follow_record(&io, &ctx, down_since).await?;
    for target in resync::behind(&io, &node.membership) {
        let bytes = resync::resync_node(&io, &target, Arc::new(AtomicBool::new(false))).await?;
        info!(node = %target, bytes, "resync of a detached volume finished");
    }
    Ok(())
}
