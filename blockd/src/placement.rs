//! Replica placement: which nodes hold a new volume's replicas.
//!
//! Pure logic. Replicas go to distinct nodes; among the candidates each next pick
//! prefers a zone not used yet, then a rack not used yet, then the most free space.

use std::collections::HashSet;

use crate::error::{Error, Result};

/// A node that may hold a replica.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub zone: String,
    pub rack: String,
    pub free_bytes: u64,
    pub online: bool,
}

/// Chooses `repl` distinct nodes. `pinned`, when not empty, names them exactly.
pub fn place(candidates: &[Candidate], repl: u32, pinned: &[String]) -> Result<Vec<String>> {
    let repl = repl as usize;
    if repl == 0 {
        return Err(Error::InvalidArgument("repl must be at least 1".into()));
    }
    if repl > candidates.len() {
        return Err(Error::InvalidArgument(format!(
            "repl {repl} is more than the {} node(s) in the cluster",
            candidates.len()
        )));
    }
    if !pinned.is_empty() {
        if pinned.len() != repl {
            return Err(Error::InvalidArgument(format!(
                "{} node(s) pinned but repl is {repl}",
                pinned.len()
            )));
        }
        let mut seen = HashSet::new();
        for id in pinned {
            if !seen.insert(id) {
                return Err(Error::InvalidArgument(format!("node {id} pinned twice")));
            }
            let c = candidates
                .iter()
                .find(|c| &c.id == id)
                .ok_or_else(|| Error::InvalidArgument(format!("no node {id} in the cluster")))?;
            if !c.online {
                return Err(Error::FailedPrecondition(format!("node {id} is offline")));
            }
        }
        return Ok(pinned.to_vec());
    }
    let online: Vec<&Candidate> = candidates.iter().filter(|c| c.online).collect();
    if repl > online.len() {
        return Err(Error::FailedPrecondition(format!(
            "repl {repl} needs {repl} online nodes, only {} online",
            online.len()
        )));
    }
    let mut chosen: Vec<&Candidate> = Vec::with_capacity(repl);
    while chosen.len() < repl {
        let best = online
            .iter()
            .filter(|c| !chosen.iter().any(|p| p.id == c.id))
            .max_by(|a, b| {
                score(a, &chosen)
                    .cmp(&score(b, &chosen))
                    // Ties: the smaller id wins, so placement is deterministic.
                    .then_with(|| b.id.cmp(&a.id))
            })
            .expect("enough online candidates checked above");
        chosen.push(best);
    }
    Ok(chosen.into_iter().map(|c| c.id.clone()).collect())
}

/// Chooses one more node for a volume whose replicas are on `existing`: online, not
/// holding a replica, spread like [`place`].
pub fn add_one(
    candidates: &[Candidate],
    existing: &[String],
    pinned: Option<&str>,
) -> Result<String> {
    if let Some(id) = pinned {
        let c = candidates
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| Error::InvalidArgument(format!("no node {id} in the cluster")))?;
        if existing.contains(&c.id) {
            return Err(Error::InvalidArgument(format!(
                "node {id} already holds a replica"
            )));
        }
        if !c.online {
            return Err(Error::FailedPrecondition(format!("node {id} is offline")));
        }
        return Ok(c.id.clone());
    }
    let chosen: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| existing.contains(&c.id))
        .collect();
    candidates
        .iter()
        .filter(|c| c.online && !existing.contains(&c.id))
        .max_by(|a, b| {
            score(a, &chosen)
                .cmp(&score(b, &chosen))
                .then_with(|| b.id.cmp(&a.id))
        })
        .map(|c| c.id.clone())
        .ok_or_else(|| {
            Error::FailedPrecondition("no online node without a replica of this volume".into())
        })
}

fn score(c: &Candidate, chosen: &[&Candidate]) -> (bool, bool, u64) {
    let new_zone = !chosen.iter().any(|p| p.zone == c.zone);
    let new_rack = !chosen.iter().any(|p| p.zone == c.zone && p.rack == c.rack);
    (new_zone, new_rack, c.free_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, zone: &str, rack: &str, free: u64) -> Candidate {
        Candidate {
            id: id.into(),
            zone: zone.into(),
            rack: rack.into(),
            free_bytes: free,
            online: true,
        }
    }

    #[test]
    fn distinct_nodes_most_free_first() {
        let c = [
            cand("a", "z", "r", 10),
            cand("b", "z", "r", 30),
            cand("c", "z", "r", 20),
        ];
        assert_eq!(place(&c, 2, &[]).unwrap(), vec!["b", "c"]);
        assert_eq!(place(&c, 3, &[]).unwrap(), vec!["b", "c", "a"]);
    }

    #[test]
    fn spreads_over_racks_then_zones() {
        let c = [
            cand("a", "z1", "r1", 100),
            cand("b", "z1", "r1", 90),
            cand("c", "z1", "r2", 10),
            cand("d", "z2", "r1", 5),
        ];
        // First the most free; then another zone beats more free space; then another rack.
        assert_eq!(place(&c, 3, &[]).unwrap(), vec!["a", "d", "c"]);
    }

    #[test]
    fn refuses_too_many_and_offline() {
        let mut c = vec![cand("a", "z", "r", 1), cand("b", "z", "r", 1)];
        assert!(place(&c, 3, &[])
            .unwrap_err()
            .to_string()
            .contains("more than"));
        assert!(place(&c, 0, &[]).is_err());
        c[1].online = false;
        assert!(place(&c, 2, &[])
            .unwrap_err()
            .to_string()
            .contains("online"));
        assert_eq!(place(&c, 1, &[]).unwrap(), vec!["a"]);
    }

    #[test]
    fn add_one_prefers_a_new_zone_and_skips_holders() {
        let c = [
            cand("a", "z1", "r1", 100),
            cand("b", "z1", "r2", 90),
            cand("c", "z2", "r1", 10),
        ];
        assert_eq!(add_one(&c, &["a".into()], None).unwrap(), "c");
        assert_eq!(add_one(&c, &["a".into(), "c".into()], None).unwrap(), "b");
        assert!(add_one(&c, &["a".into(), "b".into(), "c".into()], None).is_err());
        assert!(add_one(&c, &["a".into()], Some("a")).is_err());
        assert_eq!(add_one(&c, &["a".into()], Some("b")).unwrap(), "b");
    }

    #[test]
    fn pinned_nodes_are_checked() {
        let c = [cand("a", "z", "r", 1), cand("b", "z", "r", 1)];
        assert_eq!(place(&c, 1, &["b".into()]).unwrap(), vec!["b"]);
        assert!(place(&c, 1, &["x".into()]).is_err());
        assert!(place(&c, 2, &["a".into(), "a".into()]).is_err());
        assert!(place(&c, 2, &["a".into()]).is_err());
    }
}
