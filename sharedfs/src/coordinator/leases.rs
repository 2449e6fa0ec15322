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
//!
//! Bounded: a session holds at most `limit` leases. Granting one more evicts its least
//! recently granted lease: the caller recalls it from the mount (without waiting), and
//! until its current end it stays in the table unrenewable, so a change made before
//! the mount dropped it still waits for it. Memory therefore grows with the sessions, not
//! with the files they looked up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lru::LruCache;

/// Default of the per-session lease limit.
pub const DEFAULT_LIMIT: usize = 100_000;

/// Leases to recall from one session: its inodes and the latest expiry among them.
pub type Recall = (Vec<u64>, Instant);

#[derive(Debug)]
pub struct LeaseTable {
    lease: Duration,
    /// inode -> session -> expiry
    held: HashMap<u64, HashMap<u64, Instant>>,
    /// session -> end of its last renewal
    renewed: HashMap<u64, Instant>,
    /// session -> its leased inodes, least recently granted first out
    recency: HashMap<u64, LruCache<u64, ()>>,
    /// Evicted leases, no longer renewed: inode -> session -> fixed end.
    evicting: HashMap<u64, HashMap<u64, Instant>>,
    limit: usize,
}

impl LeaseTable {
    pub fn new(lease: Duration) -> Self {
        Self::with_limit(lease, DEFAULT_LIMIT)
    }

    /// A table where a session holds at most `limit` (at least 1) leases.
    pub fn with_limit(lease: Duration, limit: usize) -> Self {
        Self {
            lease,
            held: HashMap::new(),
            renewed: HashMap::new(),
            recency: HashMap::new(),
            evicting: HashMap::new(),
            limit: limit.max(1),
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

    /// `session` may cache `ino` until `now + lease`. Returns the inodes whose leases
    /// were evicted to make room: the caller recalls them from the session.
    pub fn grant(&mut self, session: u64, ino: u64, now: Instant) -> Vec<u64> {
        self.held
            .entry(ino)
            .or_default()
            .insert(session, now + self.lease);
        let recent = self
            .recency
            .entry(session)
            .or_insert_with(LruCache::unbounded);
        recent.put(ino, ());
        let mut evicted = Vec::new();
        if recent.len() <= self.limit {
            return evicted;
        }
        // Evicted in batches of a sixteenth of the limit: one recall message each.
        let keep = self.limit - self.limit / 16;
        while recent.len() > keep {
            let Some((old, ())) = recent.pop_lru() else {
                break;
            };
            if let Some(holders) = self.held.get_mut(&old) {
                if let Some(exp) = holders.remove(&session) {
                    let end = Self::end(&self.renewed, session, exp);
                    self.evicting.entry(old).or_default().insert(session, end);
                }
                if holders.is_empty() {
                    self.held.remove(&old);
                }
            }
            evicted.push(old);
        }
        evicted
    }

    /// Forgets `ino` in `session`'s recency list (its lease left the table).
    fn forget(recency: &mut HashMap<u64, LruCache<u64, ()>>, session: u64, ino: u64) {
        if let Some(r) = recency.get_mut(&session) {
            r.pop(&ino);
        }
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
        let (renewed, recency) = (&self.renewed, &mut self.recency);
        let mut take = |s: u64, ino: u64, end: Instant| {
            let r = out.entry(s).or_insert((Vec::new(), end));
            if !r.0.contains(&ino) {
                r.0.push(ino);
            }
            r.1 = r.1.max(end);
        };
        for ino in inodes {
            if let Some(holders) = self.held.get_mut(ino) {
                holders.retain(|s, exp| {
                    let end = Self::end(renewed, *s, *exp);
                    if end <= now {
                        Self::forget(recency, *s, *ino);
                        return false;
                    }
                    if *s == from {
                        return true;
                    }
                    take(*s, *ino, end);
                    Self::forget(recency, *s, *ino);
                    false
                });
                if holders.is_empty() {
                    self.held.remove(ino);
                }
            }
            // Evicted but maybe not dropped by the mount yet: recalled like any other
            // (the changer's own too, harmlessly: its kernel is told by the reply anyway).
            for (s, end) in self.evicting.remove(ino).unwrap_or_default() {
                if end > now && s != from {
                    take(s, *ino, end);
                }
            }
        }
        out
    }

    /// Forgets a session's leases (it ended: its mount is gone).
    pub fn drop_session(&mut self, session: u64) {
        self.renewed.remove(&session);
        self.recency.remove(&session);
        for table in [&mut self.held, &mut self.evicting] {
            table.retain(|_, h| {
                h.remove(&session);
                !h.is_empty()
            });
        }
    }

    /// Forgets leases that ran out (they would only be dropped when recalled).
    pub fn prune(&mut self, now: Instant) {
        let (renewed, recency) = (&self.renewed, &mut self.recency);
        self.held.retain(|ino, h| {
            h.retain(|s, exp| {
                let live = Self::end(renewed, *s, *exp) > now;
                if !live {
                    Self::forget(recency, *s, *ino);
                }
                live
            });
            !h.is_empty()
        });
        self.evicting.retain(|_, h| {
            h.retain(|_, end| *end > now);
            !h.is_empty()
        });
    }

    /// Leases held in all, evicted ones not yet run out included (for tests and
    /// inspection).
    pub fn count(&self) -> usize {
        self.held.values().map(|h| h.len()).sum::<usize>()
            + self.evicting.values().map(|h| h.len()).sum::<usize>()
    }

    /// Leases `session` holds (not counting evicted ones).
    pub fn held_by(&self, session: u64) -> usize {
        self.recency.get(&session).map_or(0, |r| r.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_at_most_the_limit_and_evicts_the_least_recent() {
        let t0 = Instant::now();
        let mut l = LeaseTable::with_limit(LEASE, 3);
        for ino in 1..=3 {
            assert!(l.grant(1, ino, t0).is_empty());
        }
        // A second grant of 1 makes it recent: 2 goes first.
        assert!(l.grant(1, 1, t0).is_empty());
        assert_eq!(l.grant(1, 4, t0), vec![2]);
        assert_eq!(l.grant(1, 5, t0), vec![3]);
        assert_eq!(l.held_by(1), 3);
        // Another session has its own room.
        assert!(l.grant(2, 2, t0).is_empty());
        // Evicted leases stay until they run out, then the table is back to the bound.
        assert_eq!(l.count(), 6);
        l.prune(t0 + LEASE);
        assert_eq!(l.count(), 0, "nothing renewed: all ran out");
    }

    #[test]
    fn an_evicted_lease_is_not_renewed_but_still_recalled_until_it_runs_out() {
        let t0 = Instant::now();
        let mut l = LeaseTable::with_limit(LEASE, 1);
        l.grant(1, 10, t0);
        assert_eq!(l.grant(1, 11, t0 + Duration::from_secs(1)), vec![10]);
        // A heartbeat renews what the session holds, not the evicted lease.
        l.renew(1, t0 + Duration::from_secs(2));
        l.prune(t0 + Duration::from_secs(3));
        assert_eq!(l.count(), 1, "the evicted lease ran out at t0 + 3 s");
        assert_eq!(l.held_by(1), 1);

        // Before it runs out, a change by another mount still recalls it.
        let mut l = LeaseTable::with_limit(LEASE, 1);
        l.grant(1, 10, t0);
        assert_eq!(l.grant(1, 11, t0), vec![10]);
        let r = l.take_conflicting(2, &[10], t0 + Duration::from_secs(1));
        assert_eq!(r[&1], (vec![10], t0 + LEASE));
        assert_eq!(l.count(), 1, "taken back");
        // Bounded over many files: a `find` over 10 000 inodes holds 100.
        let mut l = LeaseTable::with_limit(LEASE, 100);
        let mut recalls = 0;
        for ino in 0..10_000 {
            recalls += usize::from(!l.grant(7, ino, t0).is_empty());
        }
        let held = l.held_by(7);
        assert!((94..=100).contains(&held), "{held}");
        assert!(
            recalls < 10_000 / 6 + 1,
            "evicted in batches: {recalls} recalls"
        );
        l.renew(7, t0 + Duration::from_secs(2));
        l.prune(t0 + LEASE);
        assert_eq!(
            l.count(),
            held,
            "the evicted ran out, the held were renewed"
        );
    }

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
