//! Lock requests that wait: for the grace period after an unclean takeover (reclaims
//! first), and F_SETLKW, queued in the lock table and woken when locks are released.

use super::*;

/// The lock a request asks for.
pub(super) fn held(session: u64, l: &Lk) -> Result<Held, FsError> {
    let mode = match l.typ {
        libc::F_RDLCK => Mode::Read,
        libc::F_WRLCK => Mode::Write,
        t => return Err(FsError::Invalid(format!("lock type {t}"))),
    };
    if l.end < l.start {
        return Err(FsError::Invalid("lock range ends before it starts".into()));
    }
    Ok(Held {
        owner: Owner {
            session,
            owner: l.owner,
        },
        mode,
        start: l.start,
        end: l.end,
        pid: l.pid,
        fh: l.fh,
    })
}

/// A waiter's id: the same for every poll of one blocked request, so it keeps its
/// place in the queue.
pub(super) fn waiter_id(session: u64, l: &Lk) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (session, l.owner, l.ino, l.start, l.end, l.typ).hash(&mut h);
    h.finish()
}

impl Served {
    /// F_SETLKW: takes the lock, or queues and waits up to [`LOCK_POLL`] for it.
    pub(super) fn in_grace(&self, now: Instant) -> bool {
        self.grace().locks(now)
    }

    /// The grace windows (set once, at start).
    pub(super) fn grace(&self) -> Grace {
        self.sessions.lock().expect("sessions").grace()
    }

    /// A lock request (other than a reclaim or an unlock) during the grace period waits
    /// for its end, at most [`LOCK_POLL`] per call; Some("still waiting") when the grace
    /// is still on after that (the mount asks again).
    pub(super) async fn hold_for_grace(&self) -> Option<NsReply> {
        let end = self.grace().locks_until?;
        let now = Instant::now();
        if now >= end {
            return None;
        }
        tokio::time::sleep((end - now).min(LOCK_POLL)).await;
        self.in_grace(Instant::now()).then(|| NsReply {
            errno: libc::EINPROGRESS,
            detail: "locks are being reclaimed after a coordinator change".into(),
            ..Default::default()
        })
    }

    pub(super) async fn lock_wait(&self, session: u64, l: &Lk) -> NsReply {
        let want = match held(session, l) {
            Ok(w) => w,
            Err(e) => return fail(&e),
        };
        let id = waiter_id(session, l);
        let deadline = tokio::time::Instant::now() + LOCK_POLL;
        loop {
            // Register for wake-ups before looking, so a release in between is not missed.
            let notified = self.lock_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut t = self.locks.lock().expect("locks");
                if self.stopped() {
                    t.dequeue(id);
                    return fail(&FsError::NotServing);
                }
                if t.take_grant(id) || t.try_lock(l.ino, want).is_ok() {
                    t.dequeue(id);
                    return NsReply::default();
                }
                t.enqueue(id, l.ino, want);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // Still queued: the client asks again with a new request.
                if !self.stopped() && self.locks.lock().expect("locks").take_grant(id) {
                    return NsReply::default();
                }
                return NsReply {
                    errno: libc::EINPROGRESS,
                    detail: "still waiting for the lock".into(),
                    ..Default::default()
                };
            }
        }
    }
}
