//! The coordinator's role lease, as seen by the coordinator: until when it may serve.
//!
//! A shared volume's coordinator holds its role through a lease in the metadata store
//! (an etcd lease with a TTL on `coordinators/<volume>`). The store drops the lease
//! `ttl` after the last renewal it received; a successor claims the role only once the
//! key is gone. So the coordinator must stop serving before the store can have dropped
//! it, measured on its own clock: it counts from the moment it *sent* the renewal (the
//! store received it later, so expires it later) and takes off a drift allowance for
//! clocks that run at different rates plus a fixed margin for a request already past
//! the check when the time runs out.
//!
//! This module is the pure part (time passed in, unit-tested on a fake clock); the
//! renewing task lives in [`crate::coordinator_role`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much faster the coordinator's clock may run than the store's, as a fraction of
/// the TTL: 5 %, far above the drift of any working clock (NTP keeps it under 0.05 %).
pub const DRIFT: f64 = 0.05;
/// Taken off the serving window on top of the drift: a request that passed the check
/// just before the end finishes within it.
pub const MARGIN: Duration = Duration::from_millis(500);

/// See the module doc.
#[derive(Debug, Clone)]
pub struct RoleLease {
    ttl: Duration,
    /// Serving is allowed strictly before this instant; None: never renewed, or lost.
    serve_until: Option<Instant>,
    /// The store reported the lease gone (or another coordinator took over): never
    /// serve again under it.
    lost: bool,
}

impl RoleLease {
    /// A lease the store granted (or renewed) with `ttl`, in a request sent at `sent_at`.
    pub fn granted(ttl: Duration, sent_at: Instant) -> Self {
        let mut l = Self {
            ttl,
            serve_until: None,
            lost: false,
        };
        l.renewed(sent_at);
        l
    }

    /// A lease that allows serving for as long as the process lives: a single-host
    /// node with its embedded store has no other node that could take over.
    pub fn unbounded() -> Self {
        Self {
            ttl: Duration::MAX,
            serve_until: None,
            lost: false,
        }
    }

    /// The store confirmed a renewal sent at `sent_at`.
    pub fn renewed(&mut self, sent_at: Instant) {
        if self.lost || self.ttl == Duration::MAX {
            return;
        }
        let window = self.ttl.mul_f64(1.0 - DRIFT).saturating_sub(MARGIN);
        let until = sent_at + window;
        // Renewals may be answered out of order: the window only ever grows.
        if self.serve_until.is_none_or(|u| until > u) {
            self.serve_until = Some(until);
        }
    }

    /// The lease is gone: stop for good.
    pub fn lose(&mut self) {
        self.lost = true;
        self.serve_until = None;
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// May the coordinator answer a request at `now`?
    pub fn may_serve(&self, now: Instant) -> bool {
        if self.lost {
            return false;
        }
        if self.ttl == Duration::MAX {
            return true;
        }
        self.serve_until.is_some_and(|u| now < u)
    }

    /// How often to renew: four times per TTL, so two renewals can be lost in a row
    /// before serving pauses.
    pub fn renew_every(&self) -> Duration {
        if self.ttl == Duration::MAX {
            return Duration::from_secs(3600);
        }
        self.ttl / 4
    }
}

/// The lease shared between the renewing task and the service that checks it.
pub type RoleGate = Arc<Mutex<RoleLease>>;

/// Checks a gate now.
pub fn gate_open(gate: &RoleGate) -> bool {
    gate.lock().expect("role gate").may_serve(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn serving_ends_before_the_store_can_expire_the_lease() {
        let t0 = Instant::now();
        let l = RoleLease::granted(TTL, t0);
        assert!(l.may_serve(t0));
        // 10 s * 0.95 - 0.5 s = 9 s after the request was sent.
        assert!(l.may_serve(t0 + Duration::from_millis(8999)));
        assert!(!l.may_serve(t0 + Duration::from_secs(9)));
        // The store counts from when it received the request, at or after t0: it
        // expires the lease at t0 + 10 s at the earliest, a second after serving ended.
        assert!(!l.may_serve(t0 + TTL));
    }

    #[test]
    fn a_renewal_extends_from_when_it_was_sent_and_never_shrinks() {
        let t0 = Instant::now();
        let mut l = RoleLease::granted(TTL, t0);
        l.renewed(t0 + Duration::from_secs(5));
        assert!(l.may_serve(t0 + Duration::from_secs(13)));
        assert!(!l.may_serve(t0 + Duration::from_secs(14)));
        // A late answer to an older renewal does not pull the end back.
        l.renewed(t0 + Duration::from_secs(1));
        assert!(l.may_serve(t0 + Duration::from_secs(13)));
    }

    #[test]
    fn renewals_that_stop_arriving_stop_serving() {
        let t0 = Instant::now();
        let mut l = RoleLease::granted(TTL, t0);
        for i in 1..=4 {
            l.renewed(t0 + l.renew_every() * i);
        }
        let last = t0 + l.renew_every() * 4;
        assert!(l.may_serve(last + Duration::from_secs(8)));
        assert!(
            !l.may_serve(last + Duration::from_secs(9)),
            "cut off: nothing renews"
        );
    }

    #[test]
    fn a_lost_lease_never_serves_again() {
        let t0 = Instant::now();
        let mut l = RoleLease::granted(TTL, t0);
        l.lose();
        assert!(!l.may_serve(t0));
        l.renewed(t0 + Duration::from_secs(1));
        assert!(!l.may_serve(t0 + Duration::from_secs(1)), "stays lost");
        assert!(l.is_lost());
    }

    #[test]
    fn an_unbounded_lease_serves_until_lost() {
        let t0 = Instant::now();
        let mut l = RoleLease::unbounded();
        assert!(l.may_serve(t0 + Duration::from_secs(86400 * 365)));
        l.lose();
        assert!(!l.may_serve(t0));
    }

    #[test]
    fn renewing_four_times_per_ttl() {
        assert_eq!(
            RoleLease::granted(TTL, Instant::now()).renew_every(),
            Duration::from_millis(2500)
        );
    }
}
