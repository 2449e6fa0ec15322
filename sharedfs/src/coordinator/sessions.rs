//! The coordinator's session bookkeeping: which mounts have a live session and what each
//! holds open, which files that lost their last name must live on for now, which mounts
//! left reply records behind, and the grace windows after an unclean takeover. Pure
//! state with the time passed in: the namespace service (`service.rs`) reads the clock,
//! does the file system work these tables ask for, and sends the recalls.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use shoal_proto::ns::{NsReply, Recall};
use tonic::Status;

/// How long a mount that left reply records behind (no session here) may come back and
/// retry before its records are forgotten.
pub const REPLY_HORIZON: Duration = Duration::from_secs(600);

/// One mount's session at this coordinator.
pub struct Session {
    /// The mount's id, the same for all its sessions (0: an old mount without one).
    pub client: u64,
    pub host: String,
    pub mountpoint: String,
    pub opened: Instant,
    pub last_seen: Instant,
    /// The latest replies to its changes, by sequence number (a retry is answered here).
    pub replies: VecDeque<(u64, NsReply)>,
    /// Open handles per inode.
    pub opens: HashMap<u64, u32>,
    /// The mount's callback stream, once it listens: only then may it cache.
    pub callbacks: Option<tokio::sync::mpsc::UnboundedSender<Result<Recall, Status>>>,
    /// Recalls sent to it and not answered yet: its heartbeats renew nothing meanwhile.
    pub recalling: u32,
    /// A recall could not reach it or went unanswered: no renewals until it listens again
    /// (and so has dropped everything it cached).
    pub lapsed: bool,
}

impl Session {
    /// Whether its heartbeat renews its leases: it listens for recalls, none of them is
    /// unanswered (it could extend what it was told to drop), and none went astray.
    pub fn may_renew(&self) -> bool {
        self.callbacks.is_some() && !self.lapsed && self.recalling == 0
    }

    /// Its mount listens for recalls again, having dropped everything it cached.
    pub fn listening(&mut self, tx: tokio::sync::mpsc::UnboundedSender<Result<Recall, Status>>) {
        self.callbacks = Some(tx);
        self.lapsed = false;
    }

    /// A recall was put on its stream (`sent`) or could not be (the stream is gone).
    pub fn recall_sent(&mut self, sent: bool) {
        if sent {
            self.recalling += 1;
        } else {
            self.lapsed = true;
        }
    }

    /// A recall sent to it was acknowledged, or not in time (`answered` false): then its
    /// copy may be stale, and nothing is renewed until it listens again.
    pub fn recall_answered(&mut self, answered: bool) {
        self.recalling = self.recalling.saturating_sub(1);
        self.lapsed |= !answered;
    }

    pub fn new(client: u64, host: String, mountpoint: String, now: Instant) -> Self {
        Session {
            client,
            host,
            mountpoint,
            opened: now,
            last_seen: now,
            replies: VecDeque::new(),
            opens: HashMap::new(),
            callbacks: None,
            recalling: 0,
            lapsed: false,
        }
    }
}

/// The windows a coordinator opens when it starts after another (set once, at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    /// Until then, mounts reclaim the locks they held at the previous coordinator and
    /// every other lock request waits (the previous one did not stop cleanly).
    pub locks_until: Option<Instant>,
    /// Until then no file that lost its last name is freed: mounts coming from the
    /// previous coordinator have not all said yet which files they have open (unless it
    /// stopped cleanly with no file open anywhere).
    pub files_until: Option<Instant>,
    /// Until then operations wait (the previous one did not stop cleanly): attribute
    /// leases it granted, which this one cannot recall, have run out by then everywhere.
    pub quiet_until: Option<Instant>,
}

impl Grace {
    /// After a previous coordinator that left the volume `unclean` (it did not stop:
    /// locks may be held) or with `files_open`; `lease` is a session's lease, `attr` an
    /// attribute lease.
    pub fn after(
        unclean: bool,
        files_open: bool,
        lease: Duration,
        attr: Duration,
        now: Instant,
    ) -> Self {
        Grace {
            locks_until: unclean.then(|| now + lease),
            files_until: (unclean || files_open).then(|| now + lease),
            quiet_until: unclean.then(|| now + attr),
        }
    }

    pub fn locks(&self, now: Instant) -> bool {
        self.locks_until.is_some_and(|end| now < end)
    }

    pub fn files(&self, now: Instant) -> bool {
        self.files_until.is_some_and(|end| now < end)
    }
}

/// What [`Sessions::expire`] leaves the caller to do.
#[derive(Default)]
pub struct Expired {
    /// Files that lost their last name and may be freed now.
    pub free: Vec<u64>,
    /// Sessions whose lease ran out, removed: their locks, leases and open files go.
    pub gone: Vec<(u64, Session)>,
}

/// See the module doc.
pub struct Sessions {
    live: HashMap<u64, Session>,
    /// A session is dropped once it was not seen for this long.
    lease: Duration,
    /// An inode that lost its last name stays openable by number this long after a mount
    /// was last told about it (a path walk looks it up, then opens it by number).
    unlink_grace: Duration,
    grace: Grace,
    /// When each inode was last handed to a mount (pruned after `unlink_grace`).
    handed: HashMap<u64, Instant>,
    /// Unlinked inodes kept for now; the expiry tick looks at them again.
    deferred: Vec<u64>,
    /// Mounts with replies recorded in the volume and no session here, since when.
    departed: HashMap<u64, Instant>,
    /// Files found unlinked while open at start after an unclean stop: freed after the
    /// files grace unless a mount said it has them open (then at their last close).
    inherited_orphans: Vec<u64>,
}

impl Sessions {
    /// The tables of a coordinator starting at `now` with `grace`; `departed` are the
    /// mounts with recorded replies (every one a previous coordinator's), `orphans` the
    /// files it left unlinked while open.
    pub fn new(
        lease: Duration,
        unlink_grace: Duration,
        grace: Grace,
        departed: impl IntoIterator<Item = u64>,
        orphans: Vec<u64>,
        now: Instant,
    ) -> Self {
        Sessions {
            live: HashMap::new(),
            lease,
            unlink_grace,
            grace,
            handed: HashMap::new(),
            deferred: Vec::new(),
            departed: departed.into_iter().map(|c| (c, now)).collect(),
            inherited_orphans: orphans,
        }
    }

    pub fn grace(&self) -> Grace {
        self.grace
    }

    /// A new session: its mount is no longer departed.
    pub fn open(&mut self, id: u64, s: Session) {
        self.departed.remove(&s.client);
        self.live.insert(id, s);
    }

    pub fn get(&self, id: u64) -> Option<&Session> {
        self.live.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.live.get_mut(&id)
    }

    /// The live session `id`, renewed at `now`; None when it expired.
    pub fn renew(&mut self, id: u64, now: Instant) -> Option<&mut Session> {
        let s = self.live.get_mut(&id)?;
        s.last_seen = now;
        Some(s)
    }

    /// Removes a session (its mount closed it); the caller frees what it held.
    pub fn close(&mut self, id: u64) -> Option<Session> {
        self.live.remove(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Session)> {
        self.live.iter()
    }

    /// Whether any session has a file open.
    pub fn files_open(&self) -> bool {
        self.live.values().any(|s| !s.opens.is_empty())
    }

    /// Open handles of `ino` over every session.
    pub fn open_count(&self, ino: u64) -> u32 {
        self.live
            .values()
            .map(|s| s.opens.get(&ino).copied().unwrap_or(0))
            .sum()
    }

    /// Counts one more open of `ino` in session `id`.
    pub fn opened(&mut self, id: u64, ino: u64) {
        if let Some(s) = self.live.get_mut(&id) {
            *s.opens.entry(ino).or_insert(0) += 1;
        }
    }

    /// Counts one close of `ino` in session `id`; true when it was the session's last.
    pub fn closed(&mut self, id: u64, ino: u64) -> bool {
        let Some(s) = self.live.get_mut(&id) else {
            return false;
        };
        let Some(n) = s.opens.get_mut(&ino) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            s.opens.remove(&ino);
            return true;
        }
        false
    }

    /// Counts the files a mount says it has open (it comes from another session or
    /// coordinator) in its new session `id`.
    pub fn reopen(&mut self, id: u64, live: &[(u64, u32)]) {
        if let Some(s) = self.live.get_mut(&id) {
            for (ino, n) in live {
                *s.opens.entry(*ino).or_insert(0) += n;
            }
        }
    }

    /// Notes that a mount was told about `ino` at `now` (and may open it by number).
    pub fn hand_out(&mut self, ino: u64, now: Instant) {
        self.handed.insert(ino, now);
    }

    /// Whether an inode that lost its last name must live on for now: open somewhere
    /// (its last close comes back), or (looked at again by [`Sessions::expire`]) inside
    /// the files grace or handed to a mount within the unlink grace.
    pub fn keep(&mut self, ino: u64, now: Instant) -> bool {
        if self.open_count(ino) > 0 {
            return true;
        }
        let recent = self
            .handed
            .get(&ino)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.unlink_grace);
        if self.grace.files(now) || recent {
            self.deferred.push(ino);
            return true;
        }
        false
    }

    /// The expiry tick at `now`: the deferred (and, after the files grace, inherited)
    /// unlinked files that may be freed, and the sessions not seen for a lease, removed
    /// (their mounts now departed: they may come back and retry).
    pub fn expire(&mut self, now: Instant) -> Expired {
        let unlink_grace = self.unlink_grace;
        self.handed
            .retain(|_, t| now.saturating_duration_since(*t) < unlink_grace);
        let mut deferred = std::mem::take(&mut self.deferred);
        if !self.grace.files(now) {
            deferred.append(&mut self.inherited_orphans);
        }
        deferred.sort_unstable();
        deferred.dedup();
        let free = deferred
            .into_iter()
            .filter(|ino| !self.keep(*ino, now))
            .collect();
        let lease = self.lease;
        let dead: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > lease)
            .map(|(id, _)| *id)
            .collect();
        let mut gone = Vec::with_capacity(dead.len());
        for id in dead {
            if let Some(s) = self.live.remove(&id) {
                if s.client != 0 {
                    self.departed.insert(s.client, now);
                }
                gone.push((id, s));
            }
        }
        Expired { free, gone }
    }

    /// Mounts gone for [`REPLY_HORIZON`] without a session here: their reply records may
    /// be forgotten (then [`Sessions::forgot`]). A mount with a session is not departed.
    pub fn departed_due(&mut self, now: Instant) -> HashSet<u64> {
        let live: HashSet<u64> = self.live.values().map(|s| s.client).collect();
        self.departed.retain(|c, _| !live.contains(c));
        self.departed
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= REPLY_HORIZON)
            .map(|(c, _)| *c)
            .collect()
    }

    /// The reply records of `clients` were forgotten.
    pub fn forgot(&mut self, clients: &HashSet<u64>) {
        self.departed.retain(|c, _| !clients.contains(c));
    }

    /// A mount's reply records could not be forgotten at its unmount: tried again once
    /// it has been gone for the horizon.
    pub fn depart(&mut self, client: u64, now: Instant) {
        self.departed.insert(client, now);
    }

    pub fn is_departed(&self, client: u64) -> bool {
        self.departed.contains_key(&client)
    }

    /// Whether mount `client` has a session here.
    pub fn has_client(&self, client: u64) -> bool {
        self.live.values().any(|s| s.client == client)
    }
}

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod tests;
