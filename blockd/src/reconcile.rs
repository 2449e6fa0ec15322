//! Takeover reconciliation: makes the in-sync replicas equal where the previous
//! coordinator's unfinished writes may have left them different.
//!
//! A coordinator that dies with writes in flight may leave each of them on some
//! replicas and not on others, and all of those replicas stay in the in-sync set (none
//! of them failed a write). Reads served by different replicas could then disagree. So
//! every write carries the coordinator's completion watermark — every version below it
//! was on every in-sync replica when it was sent — and each replica keeps the highest
//! watermark it was told (in memory, and in its version file at every flush). Before a
//! new coordinator serves, [`reconcile`] takes the lowest watermark its in-sync replicas
//! report (a replica that lost power reports the one of its last flush, and everything it
//! lost is at or above that), lists on each of them the regions written at or above it, and copies each of
//! those regions, with its version, from one replica (its own, when it has one) to the
//! others. Which outcome wins does not matter: none of those writes was acknowledged.
//! What matters is that every replica ends with the same one.
//!
//! The watermark follows the writes, so the regions compared are those of the writes in
//! flight at the moment of the crash (plus, rarely, those written since a write that
//! failed everywhere), not the volume.

use std::collections::BTreeSet;

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::resync::Side;
use crate::versions::first_version;
use crate::volume_io::VolumeIo;

/// Regions to compare: every region any in-sync replica lists as written at or above
/// the watermark, once each, in ascending order.
pub fn plan(changed: &[Vec<(u64, u64)>]) -> Vec<u64> {
    let set: BTreeSet<u64> = changed
        .iter()
        .flat_map(|list| list.iter().map(|(region, _)| *region))
        .collect();
    set.into_iter().collect()
}

/// The version after which a region may differ between in-sync replicas: just below
/// the lowest completion watermark they report, or, when none reports one (replicas
/// written before the watermark existed), the start of the previous epoch.
pub fn compare_after(complete_below: u64, epoch: u64) -> u64 {
    if complete_below > 0 {
        complete_below - 1
    } else {
        first_version(epoch.saturating_sub(1)).saturating_sub(1)
    }
}

/// Reconciles the in-sync replicas of a volume this node just opened at its epoch
/// (nothing is served yet). Returns the regions copied. A replica that fails a step
/// leaves the in-sync set (to be resynced from the watermark); at least one stays.
pub fn reconcile(io: &VolumeIo, complete_below: u64) -> Result<u64> {
    let after = compare_after(complete_below, io.epoch);
    // Each round either finishes or removes one replica, so this ends.
    loop {
        let in_sync = io.in_sync();
        if in_sync.len() < 2 {
            return Ok(0);
        }
        let source = if in_sync.contains(&io.local_node) && io.is_local(&io.local_node) {
            io.local_node.clone()
        } else {
            in_sync.iter().next().cloned().expect("two or more")
        };
        match round(io, &in_sync, &source, after)? {
            Round::Done(copied) => return Ok(copied),
            Round::Drop(node, why) => {
                warn!(volume = %io.volume_id, %node, error = %why, "reconcile: replica failed; leaving the in-sync set");
                io.remove_from_in_sync(std::slice::from_ref(&node), after)?;
            }
        }
    }
}

enum Round {
    Done(u64),
    /// This replica failed a step: it leaves the set and the round starts over.
    Drop(String, Error),
}

fn round(io: &VolumeIo, in_sync: &BTreeSet<String>, source: &str, after: u64) -> Result<Round> {
    let mut lists = Vec::with_capacity(in_sync.len());
    for node in in_sync {
        match Side::new(io, node).changed(after) {
            Ok(list) => lists.push(list),
            Err(e) => return Ok(Round::Drop(node.clone(), e)),
        }
    }
    let regions = plan(&lists);
    if regions.is_empty() {
        return Ok(Round::Done(0));
    }
    info!(volume = %io.volume_id, after, regions = regions.len(), %source, "reconciling in-sync replicas after a takeover");
    let from = Side::new(io, source);
    let mut dropped: Option<(String, Error)> = None;
    for &region in &regions {
        let (data, version) = match from.read_region(region) {
            Ok(r) => r,
            Err(e) => return Ok(Round::Drop(source.to_string(), e)),
        };
        for node in in_sync.iter().filter(|n| n.as_str() != source) {
            if dropped.as_ref().is_some_and(|(d, _)| d == node) {
                continue;
            }
            if let Err(e) = Side::new(io, node).write_region(region, data.clone(), version) {
                // Copy to the others first; this one leaves when the round ends.
                dropped = Some((node.clone(), e));
            }
        }
    }
    if let Some((node, e)) = dropped {
        return Ok(Round::Drop(node, e));
    }
    info!(volume = %io.volume_id, regions = regions.len(), "in-sync replicas reconciled");
    Ok(Round::Done(regions.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_every_listed_region_once_in_order() {
        let a = vec![(7, 100), (2, 90)];
        let b = vec![(2, 95), (40, 101)];
        assert_eq!(plan(&[a, b, vec![]]), vec![2, 7, 40]);
        assert!(plan(&[vec![], vec![]]).is_empty());
    }

    #[test]
    fn without_a_watermark_the_previous_epoch_is_compared() {
        assert_eq!(compare_after(500, 3), 499);
        assert_eq!(compare_after(0, 3), first_version(2) - 1);
        assert_eq!(compare_after(0, 0), 0);
    }
}
