//! Attribute leases: which mount may cache which inode's attributes, and until when.
//! Pure state with the time passed in, so the rules are tested without a clock.
//!
//! A lease is granted when a reply hands a mount an inode's attributes. A change to an
//! inode takes back every *other* mount's valid lease on it: the coordinator recalls them
//! (and waits for the acknowledgement, or at worst for the expiry returned here) before
//! the change returns. The changing mount keeps its own lease: its kernel refreshes its
//! copy from the reply or invalidates it itself.
//!
//! A session's heartbeat renews all of its leases at once ([`LeaseTable::renew`]): a
//! lease runs until the later of its grant's end and the session's last renewal's end.
//! A lease taken back by a recall is gone from the table, so no renewal extends it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Leases to recall from one session: its inodes and the latest expiry among them.
pub type Recall = (Vec<u64>, Instant);

#[derive(Debug)]
pub struct LeaseTable {
    lease: Duration,
    /// inode -> session -> expiry
    held: HashMap<u64, HashMap<u64, Instant>>,
    /// session -> end of its last renewal
    renewed: HashMap<u64, Instant>,
}

impl LeaseTable {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            held: HashMap::new(),
            renewed: HashMap::new(),
        }
    }

    /// Renews every lease `session` holds until `now + lease`.
    pub fn renew(&mut self, session: u64, now: Instant) {
        self.renewed.insert(session, now + self.lease);
    }

    /// When `session`'s lease granted to end at `exp` really ends.
    fn end(renewed: &HashMap<u64, Instant>, session: u64, exp: Instant) -> Instant {
        renewed.get(&session).map_or(exp, |r| exp.max(*r))
    }

    /// `session` may cache `ino` until `now + lease`.
    pub fn grant(&mut self, session: u64, ino: u64, now: Instant) {
        self.held
            .entry(ino)
            .or_default()
            .insert(session, now + self.lease);
    }

    /// Takes back the leases on `inodes` that sessions other than `from` hold and that are
    /// still valid at `now`, grouped by session. Expired leases are dropped on the way.
    pub fn take_conflicting(
        &mut self,
        from: u64,
        inodes: &[u64],
        now: Instant,
    ) -> HashMap<u64, Recall> {
        let mut out: HashMap<u64, Recall> = HashMap::new();
        let renewed = &self.renewed;
        for ino in inodes {
            let Some(holders) = self.held.get_mut(ino) else {
                continue;
            };
            holders.retain(|s, exp| {
                let end = Self::end(renewed, *s, *exp);
                if end <= now {
                    return false;
                }
                if *s == from {
                    return true;
                }
                let r = out.entry(*s).or_insert((Vec::new(), end));
                if !r.0.contains(ino) {
                    r.0.push(*ino);
                }
                r.1 = r.1.max(end);
                false
            });
            if holders.is_empty() {
                self.held.remove(ino);
            }
        }
        out
    }

    /// Forgets a session's leases (it ended: its mount is gone).
    pub fn drop_session(&mut self, session: u64) {
        self.renewed.remove(&session);
        self.held.retain(|_, h| {
            h.remove(&session);
            !h.is_empty()
        });
    }

    /// Forgets leases that ran out (they would only be dropped when recalled).
    pub fn prune(&mut self, now: Instant) {
        let renewed = &self.renewed;
        self.held.retain(|_, h| {
            h.retain(|s, exp| Self::end(renewed, *s, *exp) > now);
            !h.is_empty()
        });
    }

    /// Leases held in all (for tests and inspection).
    pub fn count(&self) -> usize {
        self.held.values().map(|h| h.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    #[test]
    fn a_change_recalls_other_sessions_and_keeps_the_changers_own() {
        let t0 = Instant::now();
        let mut l = LeaseTable::new(LEASE);
        l.grant(1, 10, t0);
        l.grant(2, 10, t0 + Duration::from_secs(1));
        l.grant(3, 11, t0);
        let r = l.take_conflicting(1, &[10, 11], t0 + Duration::from_secs(2));
        assert_eq!(r.len(), 2);
        assert_eq!(r[&2], (vec![10], t0 + Duration::from_secs(4)));
        assert_eq!(r[&3].0, vec![11]);
        // Taken back: a second change has nobody to recall but session 1 is still leased.
        assert!(l
            .take_conflicting(1, &[10, 11], t0 + Duration::from_secs(2))
            .is_empty());
        assert_eq!(l.count(), 1);
        assert_eq!(
            l.take_conflicting(9, &[10], t0 + Duration::from_secs(2))[&1].0,
            vec![10]
        );
    }

    #[test]
    fn expired_leases_are_not_recalled_and_a_renewal_extends() {
        let t0 = Instant::now();
        let mut l = LeaseTable::new(LEASE);
        l.grant(2, 10, t0);
        assert!(
            l.take_conflicting(1, &[10], t0 + LEASE).is_empty(),
            "expired exactly then"
        );
        assert_eq!(l.count(), 0, "and forgotten");
        l.grant(2, 10, t0);
        l.grant(2, 10, t0 + Duration::from_secs(2));
        let r = l.take_conflicting(1, &[10], t0 + Duration::from_secs(4));
        assert_eq!(r[&2].1, t0 + Duration::from_secs(5), "the renewal counts");
    }

    #[test]
    fn a_renewal_extends_every_lease_of_the_session_but_not_a_recalled_one() {
        let t0 = Instant::now();
        let mut l = LeaseTable::new(LEASE);
        l.grant(2, 10, t0);
        l.grant(2, 11, t0);
        l.grant(3, 10, t0);
        let t1 = t0 + Duration::from_secs(2);
        // Recalled before the renewal: gone, so the renewal cannot bring it back.
        assert_eq!(l.take_conflicting(1, &[11], t1)[&2].0, vec![11]);
        l.renew(2, t1);
        let t2 = t0 + LEASE + Duration::from_secs(1);
        let r = l.take_conflicting(1, &[10, 11], t2);
        assert_eq!(
            r.len(),
            1,
            "session 3's lease ran out, 2's was renewed: {r:?}"
        );
        assert_eq!(r[&2], (vec![10], t1 + LEASE));
        l.grant(2, 12, t0);
        l.prune(t1 + LEASE);
        assert_eq!(l.count(), 0, "renewed leases run out too");
    }

    #[test]
    fn one_recall_per_session_covers_all_its_inodes() {
        let t0 = Instant::now();
        let mut l = LeaseTable::new(LEASE);
        for ino in [1, 2, 3] {
            l.grant(7, ino, t0 + Duration::from_millis(ino * 100));
        }
        let r = l.take_conflicting(1, &[3, 1, 2, 1], t0);
        assert_eq!(r.len(), 1);
        let (mut inos, until) = r[&7].clone();
        inos.sort();
        assert_eq!(inos, vec![1, 2, 3]);
        assert_eq!(until, t0 + Duration::from_millis(300) + LEASE);
    }

    #[test]
    fn an_ended_session_holds_nothing() {
        let t0 = Instant::now();
        let mut l = LeaseTable::new(LEASE);
        l.grant(4, 1, t0);
        l.grant(4, 2, t0);
        l.grant(5, 2, t0);
        l.drop_session(4);
        assert_eq!(l.count(), 1);
        l.prune(t0 + LEASE);
        assert_eq!(l.count(), 0, "expired leases are pruned");
        assert!(l.take_conflicting(1, &[1], t0).is_empty());
    }
}
