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
//! lost is at or above that), lists on each of them the regions written at or above it,
//! and copies each of those regions, with its version, from the replica that holds its
//! highest version (its own on a tie) to the others: a region is never copied over a
//! newer version of itself. Which unacknowledged write wins does not matter; what
//! matters is that every replica ends with the same one, and that no replica's newer
//! data is overwritten by an older copy.
//!
//! The watermark follows the writes, so the regions compared are those of the writes in
//! flight at the moment of the crash (plus, rarely, those written since a write that
//! failed everywhere), not the volume.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::resync::Side;
use crate::versions::first_version;
use crate::volume_io::VolumeIo;

/// Regions to compare and where to copy each from: every region any in-sync replica
/// lists as written at or above the watermark, once each, in ascending order, with the
/// index of the list (replica) that holds its highest version. Ties go to the earliest
/// list, so the caller lists its preferred source first. A replica never gets a region
/// copied over it from one that holds an older version of it.
pub fn plan(changed: &[Vec<(u64, u64)>]) -> Vec<(u64, usize)> {
    let mut best: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    for (i, list) in changed.iter().enumerate() {
        for &(region, version) in list {
            let e = best.entry(region).or_insert((version, i));
            if version > e.0 {
                *e = (version, i);
            }
        }
    }
    best.into_iter().map(|(r, (_, i))| (r, i)).collect()
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
    // The preferred source first: it wins ties.
    let mut nodes: Vec<&String> = in_sync.iter().filter(|n| n.as_str() == source).collect();
    nodes.extend(in_sync.iter().filter(|n| n.as_str() != source));
    let mut lists = Vec::with_capacity(nodes.len());
    for node in &nodes {
        match Side::new(io, node).changed(after) {
            Ok(list) => lists.push(list),
            Err(e) => return Ok(Round::Drop(node.to_string(), e)),
        }
    }
    let regions = plan(&lists);
    if regions.is_empty() {
        return Ok(Round::Done(0));
    }
    info!(volume = %io.volume_id, after, regions = regions.len(), %source, "reconciling in-sync replicas after a takeover");
    let mut dropped: Option<(String, Error)> = None;
    for &(region, from) in &regions {
        let from_node = nodes[from];
        let (data, version) = match Side::new(io, from_node).read_region(region) {
            Ok(r) => r,
            Err(e) => return Ok(Round::Drop(from_node.to_string(), e)),
        };
        for node in nodes.iter().filter(|n| **n != from_node) {
            if dropped.as_ref().is_some_and(|(d, _)| d == *node) {
                continue;
            }
            if let Err(e) = Side::new(io, node).write_region(region, data.clone(), version) {
                // Copy to the others first; this one leaves when the round ends.
                dropped = Some((node.to_string(), e));
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
    fn every_listed_region_once_in_order_from_its_newest_holder() {
        let a = vec![(7, 100), (2, 90)];
        let b = vec![(2, 95), (40, 101)];
        // Region 2 is newer on b: copied from b, never from a over it.
        assert_eq!(plan(&[a, b, vec![]]), vec![(2, 1), (7, 0), (40, 1)]);
        assert!(plan(&[vec![], vec![]]).is_empty());
    }

    #[test]
    fn ties_go_to_the_preferred_source_listed_first() {
        let local = vec![(3, 50)];
        let other = vec![(3, 50), (4, 49)];
        assert_eq!(plan(&[local, other]), vec![(3, 0), (4, 1)]);
    }

    #[test]
    fn without_a_watermark_the_previous_epoch_is_compared() {
        assert_eq!(compare_after(500, 3), 499);
        assert_eq!(compare_after(0, 3), first_version(2) - 1);
        assert_eq!(compare_after(0, 0), 0);
    }
}
