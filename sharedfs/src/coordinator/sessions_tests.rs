//! Unit tests of the session tables on a fake clock: renewal and expiry, open files,
//! the unlink grace, the grace windows after an unclean takeover, departed mounts.

use super::*;

const LEASE: Duration = Duration::from_secs(15);
const UNLINK: Duration = Duration::from_secs(3);
const ATTR: Duration = Duration::from_secs(3);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Tables of a coordinator that started at `t0` after a clean stop.
fn clean(t0: Instant) -> Sessions {
    Sessions::new(
        LEASE,
        UNLINK,
        Grace::after(false, false, LEASE, ATTR, t0),
        [],
        Vec::new(),
        t0,
    )
}

fn session(client: u64, t: Instant) -> Session {
    Session::new(client, "h".into(), "/m".into(), t)
}

#[test]
fn a_renewed_session_lives_and_a_silent_one_expires_with_what_it_held() {
    let t0 = Instant::now();
    let mut ss = clean(t0);
    ss.open(1, session(10, t0));
    ss.open(2, session(20, t0));
    ss.opened(2, 99);
    // Session 1 renews every 10 s; session 2 is never heard from again.
    for i in 1..=3 {
        assert!(ss.renew(1, t0 + secs(10 * i)).is_some());
        let e = ss.expire(t0 + secs(10 * i));
        if i == 1 {
            assert!(e.gone.is_empty(), "10 s is inside the lease");
        } else if i == 2 {
            assert_eq!(e.gone.len(), 1, "20 s without a heartbeat: gone");
            let (id, s) = &e.gone[0];
            assert_eq!(*id, 2);
            assert_eq!(s.opens.get(&99), Some(&1), "what it held goes with it");
        } else {
            assert!(e.gone.is_empty());
        }
    }
    assert!(ss.get(1).is_some());
    assert!(
        ss.renew(2, t0 + secs(31)).is_none(),
        "an expired session is not renewed"
    );
    assert!(ss.is_departed(20), "its mount may come back and retry");
    assert!(!ss.is_departed(10));
}

#[test]
fn opens_are_counted_over_sessions_and_the_last_close_is_told() {
    let t0 = Instant::now();
    let mut ss = clean(t0);
    ss.open(1, session(10, t0));
    ss.open(2, session(20, t0));
    ss.opened(1, 5);
    ss.opened(1, 5);
    ss.opened(2, 5);
    assert_eq!(ss.open_count(5), 3);
    assert!(ss.files_open());
    assert!(!ss.closed(1, 5));
    assert!(ss.closed(1, 5), "session 1's last handle");
    assert!(!ss.closed(1, 5), "nothing left to close");
    assert!(ss.closed(2, 5));
    assert_eq!(ss.open_count(5), 0);
    assert!(!ss.files_open());
    ss.reopen(2, &[(7, 2), (8, 1)]);
    assert_eq!(ss.open_count(7), 2);
    assert!(!ss.closed(3, 7), "an unknown session closes nothing");
}

#[test]
fn an_unlinked_file_lives_while_open_or_just_handed_out_then_is_freed_once() {
    let t0 = Instant::now();
    let mut ss = clean(t0);
    ss.open(1, session(10, t0));
    ss.opened(1, 5);
    assert!(ss.keep(5, t0), "open: kept until its last close");
    assert!(
        ss.expire(t0).free.is_empty(),
        "an open file is not deferred"
    );
    ss.closed(1, 5);
    assert!(!ss.keep(5, t0), "closed and never handed out: freed now");
    // Handed out (a path walk looked it up): kept for the unlink grace, then freed by
    // the tick, and only once.
    ss.hand_out(6, t0);
    assert!(ss.keep(6, t0 + secs(1)));
    assert!(
        ss.expire(t0 + secs(2)).free.is_empty(),
        "still inside the grace"
    );
    assert_eq!(ss.expire(t0 + UNLINK).free, vec![6]);
    assert!(
        ss.expire(t0 + UNLINK + secs(1)).free.is_empty(),
        "freed once"
    );
    // Deferred, then opened by number before the tick: kept by its open.
    ss.hand_out(7, t0);
    assert!(ss.keep(7, t0));
    ss.opened(1, 7);
    assert!(ss.expire(t0 + UNLINK).free.is_empty());
}

#[test]
fn after_an_unclean_stop_locks_files_and_changes_wait_for_their_windows() {
    let t0 = Instant::now();
    let g = Grace::after(true, true, LEASE, ATTR, t0);
    assert!(g.locks(t0) && g.locks(t0 + LEASE - secs(1)));
    assert!(!g.locks(t0 + LEASE), "reclaims end with a session's lease");
    assert!(g.files(t0 + secs(1)) && !g.files(t0 + LEASE));
    assert_eq!(
        g.quiet_until,
        Some(t0 + ATTR),
        "old attribute leases run out"
    );
    let open_files = Grace::after(false, true, LEASE, ATTR, t0);
    assert!(
        !open_files.locks(t0),
        "a clean stop leaves no locks to reclaim"
    );
    assert!(open_files.files(t0), "but open files to be told about");
    assert_eq!(open_files.quiet_until, None);
    let clean = Grace::after(false, false, LEASE, ATTR, t0);
    assert!(!clean.locks(t0) && !clean.files(t0) && clean.quiet_until.is_none());
}

#[test]
fn inherited_orphans_are_freed_after_the_files_grace_unless_reclaimed_open() {
    let t0 = Instant::now();
    let mut ss = Sessions::new(
        LEASE,
        UNLINK,
        Grace::after(true, true, LEASE, ATTR, t0),
        [],
        vec![40, 41],
        t0,
    );
    // A mount comes back from the previous coordinator with 41 open.
    ss.open(1, session(10, t0 + secs(1)));
    ss.reopen(1, &[(41, 1)]);
    // An unlink during the grace is deferred, whoever had it.
    assert!(ss.keep(42, t0 + secs(2)));
    ss.renew(1, t0 + secs(10));
    assert!(
        ss.expire(t0 + secs(10)).free.is_empty(),
        "inside the files grace"
    );
    let mut freed = ss.expire(t0 + LEASE).free;
    freed.sort_unstable();
    assert_eq!(freed, vec![40, 42], "41 is open: freed at its last close");
    assert!(ss.closed(1, 41));
    assert!(!ss.keep(41, t0 + LEASE));
}

#[test]
fn departed_mounts_are_forgotten_after_the_horizon_unless_they_come_back() {
    let t0 = Instant::now();
    // Mounts 10 and 20 left reply records at the previous coordinator.
    let mut ss = Sessions::new(
        LEASE,
        UNLINK,
        Grace::after(false, false, LEASE, ATTR, t0),
        [10, 20],
        Vec::new(),
        t0,
    );
    assert!(ss.departed_due(t0 + secs(60)).is_empty());
    // 10 comes back: not departed any more.
    ss.open(1, session(10, t0 + secs(60)));
    assert!(!ss.is_departed(10));
    let due = ss.departed_due(t0 + REPLY_HORIZON);
    assert_eq!(due, HashSet::from([20]));
    // The forget failed: asked again at the next tick.
    assert_eq!(ss.departed_due(t0 + REPLY_HORIZON + secs(1)), due);
    ss.forgot(&due);
    assert!(ss.departed_due(t0 + REPLY_HORIZON + secs(2)).is_empty());
    // An unmount whose forget failed departs now and waits the horizon again.
    assert!(ss.has_client(10));
    ss.close(1);
    assert!(!ss.has_client(10));
    let t1 = t0 + secs(700);
    ss.depart(10, t1);
    assert!(ss.departed_due(t1 + secs(1)).is_empty());
    assert_eq!(ss.departed_due(t1 + REPLY_HORIZON), HashSet::from([10]));
}

#[test]
fn a_session_open_under_a_departed_mount_keeps_it_from_being_forgotten() {
    let t0 = Instant::now();
    let mut ss = clean(t0);
    ss.open(1, session(10, t0));
    // Another session of the same mount expires: the mount is departed, but it has a
    // live session, so its records are not due.
    ss.open(2, session(10, t0));
    ss.renew(1, t0 + secs(20));
    let e = ss.expire(t0 + secs(20));
    assert_eq!(e.gone.len(), 1);
    assert!(ss.departed_due(t0 + REPLY_HORIZON + secs(30)).is_empty());
    assert!(!ss.is_departed(10), "a live session clears the departure");
}

#[test]
fn a_recalled_holder_renews_nothing_until_it_answers_and_a_silent_one_until_it_listens() {
    use crate::coordinator::leases::LeaseTable;
    let t0 = Instant::now();
    let mut leases = LeaseTable::new(ATTR);
    let mut holder = session(10, t0);
    assert!(
        !holder.may_renew(),
        "not listening for recalls: it may not cache"
    );
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    holder.listening(tx.clone());
    assert!(holder.may_renew());
    leases.grant(1, 5, t0);
    // Another mount changes inode 5 a second later: the holder's lease is recalled, and
    // the change waits at most until that lease runs out.
    let targets = leases.take_conflicting(2, &[5], t0 + secs(1));
    let (inodes, until) = targets.get(&1).expect("the holder is recalled");
    assert_eq!(inodes, &vec![5]);
    assert_eq!(*until, t0 + ATTR, "the wait ends when its lease would have");
    holder.recall_sent(true);
    assert!(
        !holder.may_renew(),
        "while the recall is out it renews nothing"
    );
    // A slow holder answers in time: renewals go on.
    holder.recall_answered(true);
    assert!(holder.may_renew());
    // Another recall goes unanswered until the deadline: the holder lapsed, and renews
    // nothing, even with no recall out, until it listens again (dropping its cache).
    holder.recall_sent(true);
    holder.recall_answered(false);
    assert!(!holder.may_renew());
    holder.listening(tx);
    assert!(holder.may_renew());
    // A dead holder's stream is gone: the recall cannot be sent, and it lapses at once.
    holder.recall_sent(false);
    assert!(!holder.may_renew());
    assert_eq!(holder.recalling, 0, "nothing is waited for from it");
}
