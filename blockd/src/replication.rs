//! Replication decisions as plain data: what a write's completions mean, and which
//! regions a returning replica must be sent. No I/O here; the coordinator
//! ([`crate::volume_io`]) acts on these answers, and the unit tests drive them directly.

use std::collections::BTreeMap;

/// What one replicated write (or flush) amounts to, from its completions on the
/// in-sync replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every in-sync replica has it.
    Complete,
    /// Some in-sync replicas failed and others have it: the failed ones must leave the
    /// in-sync set (durably, in the metadata store) before the write is acknowledged.
    Degraded { failed: Vec<String> },
    /// No in-sync replica has it: the write fails.
    Failed { errors: Vec<(String, String)> },
}

/// Counts completions. `results` holds one entry per in-sync replica.
pub fn outcome(results: &[(String, Result<(), String>)]) -> Outcome {
    let failed: Vec<(String, String)> = results
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| (n.clone(), e.clone())))
        .collect();
    if failed.is_empty() {
        Outcome::Complete
    } else if failed.len() == results.len() {
        Outcome::Failed { errors: failed }
    } else {
        Outcome::Degraded {
            failed: failed.into_iter().map(|(n, _)| n).collect(),
        }
    }
}

/// The watermark recorded when replicas leave the in-sync set: every version up to it
/// completed on them. `inflight` holds the versions not yet completed on all replicas.
pub fn left_at(inflight_min: Option<u64>, next_version: u64) -> u64 {
    inflight_min.unwrap_or(next_version).saturating_sub(1)
}

/// Where a resync starts: the regions to copy, ascending.
///
/// A region is copied when the source's version or the target's own version of it is
/// above `since` (the target may hold writes that were never acknowledged). On a resumed
/// resync, regions below `cursor` were copied already and are copied again only when
/// written at or after the first version the earlier pass sent live (`resumed_after`).
pub fn plan(
    source: &[(u64, u64)],
    target: &[(u64, u64)],
    since: u64,
    cursor: u64,
    resumed_after: u64,
) -> Vec<u64> {
    let mut want: BTreeMap<u64, ()> = BTreeMap::new();
    for &(region, version) in source.iter().chain(target) {
        // `resumed_after` is the first version the earlier pass sent live, so a write of
        // exactly that version may be the one that was missed: compare with >=.
        let bar = if region < cursor {
            since.max(resumed_after.saturating_sub(1))
        } else {
            since
        };
        if version > bar {
            want.insert(region, ());
        }
    }
    want.into_keys().collect()
}

/// What one in-sync replica answered when a new coordinator opened (fenced) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAnswer {
    pub node: String,
    /// Its completion watermark (see `RegionVersions::complete_below`).
    pub complete_below: u64,
    /// Some when its host rebooted since it was last used and no resync caught it up
    /// since: it may have lost or torn what it had not synced, and holds for sure only
    /// the versions below this (its last sync's watermark).
    pub reboot_below: Option<u64>,
}

/// What a new coordinator does with the answers of its in-sync replicas' opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterOpen {
    /// Replicas that leave the in-sync set, each at its `left_at`.
    pub leave: Vec<(String, u64)>,
    /// The watermark reconcile compares above: the lowest of the replicas that stay.
    pub reconcile_above: u64,
    /// Rebooted replicas that stay in sync (every answer was one: no better copy
    /// exists); their marks are cleared once reconcile made them equal and durable.
    pub clear_marks: Vec<String>,
}

/// Decides [`AfterOpen`]. A rebooted replica never counts in sync while one that did not
/// reboot answered: it leaves at the lower of what it surely holds and
/// `prev_epoch_below` (the start of the previous epoch, which covers that coordinator's
/// unacknowledged writes). When every answer rebooted (a whole-cluster power cut), all
/// stay: each holds everything ever synced, which is all a power cut may not take.
pub fn after_open(answers: &[OpenAnswer], prev_epoch_below: u64) -> AfterOpen {
    let healthy = answers.iter().any(|a| a.reboot_below.is_none());
    let (leave, stay): (Vec<&OpenAnswer>, Vec<&OpenAnswer>) = answers
        .iter()
        .partition(|a| healthy && a.reboot_below.is_some());
    AfterOpen {
        leave: leave
            .iter()
            .map(|a| {
                let held = a.reboot_below.unwrap_or(0).saturating_sub(1);
                (a.node.clone(), held.min(prev_epoch_below))
            })
            .collect(),
        reconcile_above: stay.iter().map(|a| a.complete_below).min().unwrap_or(0),
        clear_marks: stay
            .iter()
            .filter(|a| a.reboot_below.is_some())
            .map(|a| a.node.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: &str) -> (String, Result<(), String>) {
        (n.into(), Ok(()))
    }
    fn bad(n: &str) -> (String, Result<(), String>) {
        (n.into(), Err("boom".into()))
    }

    #[test]
    fn completions_decide_the_outcome() {
        assert_eq!(outcome(&[ok("a"), ok("b")]), Outcome::Complete);
        assert_eq!(
            outcome(&[ok("a"), bad("b"), bad("c")]),
            Outcome::Degraded {
                failed: vec!["b".into(), "c".into()]
            }
        );
        assert!(
            matches!(outcome(&[bad("a"), bad("b")]), Outcome::Failed { errors } if errors.len() == 2)
        );
        assert!(matches!(outcome(&[bad("a")]), Outcome::Failed { .. }));
        assert_eq!(outcome(&[ok("a")]), Outcome::Complete);
    }

    #[test]
    fn left_at_is_below_every_unfinished_write() {
        assert_eq!(left_at(Some(10), 15), 9);
        assert_eq!(left_at(None, 15), 14);
        assert_eq!(left_at(Some(0), 1), 0);
    }

    #[test]
    fn plan_copies_newer_regions_of_either_side() {
        let source = [(1, 5), (2, 9), (7, 12)];
        let target = [(3, 11), (2, 4)];
        assert_eq!(plan(&source, &target, 8, 0, 0), vec![2, 3, 7]);
        // Full copy for a new replica: every written region.
        assert_eq!(plan(&source, &[], 0, 0, 0), vec![1, 2, 7]);
        // Resume at cursor 3: regions below it only if written after the first pass began.
        assert_eq!(plan(&source, &target, 0, 3, 10), vec![3, 7]);
        assert_eq!(plan(&source, &target, 0, 3, 8), vec![2, 3, 7]);
        // A write of exactly the first live version may be the one that was missed.
        assert_eq!(plan(&source, &target, 0, 3, 9), vec![2, 3, 7]);
    }

    fn ans(node: &str, below: u64, reboot_below: Option<u64>) -> OpenAnswer {
        OpenAnswer {
            node: node.into(),
            complete_below: below,
            reboot_below,
        }
    }

    #[test]
    fn a_rebooted_replica_leaves_while_a_healthy_one_answered() {
        // b rebooted: it holds for sure only below 40 (its last sync), whatever its
        // versions say.
        let a = after_open(&[ans("a", 90, None), ans("b", 40, Some(40))], 70);
        assert_eq!(a.leave, vec![("b".to_string(), 39)]);
        assert_eq!(
            a.reconcile_above, 90,
            "the rebooted replica does not lower it"
        );
        assert!(a.clear_marks.is_empty());
        // The previous epoch's start bounds it too.
        let a = after_open(&[ans("a", 90, None), ans("b", 80, Some(80))], 70);
        assert_eq!(a.leave, vec![("b".to_string(), 70)]);
        // Never synced with a watermark: resynced in full.
        let a = after_open(&[ans("a", 90, None), ans("b", 0, Some(0))], 70);
        assert_eq!(a.leave, vec![("b".to_string(), 0)]);
    }

    #[test]
    fn when_every_replica_rebooted_all_stay_and_their_marks_go() {
        let a = after_open(&[ans("a", 50, Some(50)), ans("b", 40, Some(40))], 70);
        assert!(a.leave.is_empty());
        assert_eq!(a.reconcile_above, 40);
        assert_eq!(a.clear_marks, vec!["a".to_string(), "b".to_string()]);
        // No reboot at all: nothing changes.
        let a = after_open(&[ans("a", 50, None), ans("b", 60, None)], 70);
        assert!(a.leave.is_empty() && a.clear_marks.is_empty());
        assert_eq!(a.reconcile_above, 50);
        assert_eq!(after_open(&[], 70).reconcile_above, 0);
    }
}
