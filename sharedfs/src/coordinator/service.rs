//! The namespace service: runs on a shared volume's coordinator and answers the
//! namespace API for every mount of that volume, on any host.
//!
//! It owns, per served volume, the one [`Fs`] (operations are serialized on it, so a
//! change is atomic for every client at once) and the sessions: who is mounted, which
//! inodes each mount holds open (an unlinked inode lives until the last close), and the
//! replies to recent requests, so a retried request returns the first answer instead
//! of running twice (changes that cannot safely run twice also record their outcome in
//! the volume, see [`crate::coordinator::replies`], so this holds across a failover too). A session
//! that stops renewing expires after the lease.
//!
//! Here: the served volume's state and the I/O around the pure tables ([`Served`]: it
//! reads the clock, does the file system work, sends recalls); the session bookkeeping
//! is [`crate::coordinator::sessions`]; `grpc.rs` is the tonic shell
//! ([`NamespaceService`]), `ops.rs` the operation table, `lock_wait.rs` lock requests
//! that wait, `tests.rs` the unit tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shoal_blockd::peers::Peers;
use shoal_blockd::role_lease::{gate_open, RoleGate, RoleLease};
use shoal_proto::ns::namespace_server::Namespace;
use shoal_proto::ns::ns_reply::Result as Res;
use shoal_proto::ns::ns_request::Op;
use shoal_proto::ns::*;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::coordinator::leases::LeaseTable;
use crate::coordinator::locks::{Held, LockTable, Mode, Owner};
use crate::coordinator::replies::{Outcome, ReplyTag};
use crate::coordinator::sessions::{Grace, Session, Sessions};
use crate::error::FsError;
use crate::format::inode::{Inode, Time as FsTime};
use crate::fs::{
    Cred, Fs, RenameMode, SetAttr as FsSetAttr, SERVING, STOPPED_CLEAN, STOPPED_WITH_OPEN_FILES,
};

/// How long a session lives without a heartbeat.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// Replies kept per session for retried requests.
const REPLAY_DEPTH: usize = 128;
/// How long the replies recorded for a mount that went away (its session expired, or it
/// had one at the previous coordinator and has not come back) are kept: a mount cut off
/// this long retries its last requests as new ones.
/// Unlinked inodes freed per transaction by the expiry tick.
const DESTROY_BATCH: usize = 64;
/// Entries with attributes per reply at most (the fs lock is held while they are read).
const READDIRPLUS_MAX: u32 = 512;
/// Entries per readdir reply at most.
const READDIR_MAX: u32 = 1024;
/// How long one F_SETLKW call waits before the client asks again (it stays queued).
const LOCK_POLL: Duration = Duration::from_secs(5);
/// An attribute lease: how long a mount may cache an inode's attributes unless recalled.
/// A change by another mount waits for the recall's acknowledgement, or at worst for the
/// lease to run out (a mount that died or hangs).
const ATTR_LEASE: Duration = Duration::from_secs(3);
/// What the mount is told: shorter than the lease, so its cache is gone before the
/// coordinator stops waiting for it even when the reply took a while to arrive.
const ATTR_TTL: Duration = Duration::from_secs(2);
/// How long an inode that lost its last name stays openable by number after a mount
/// was last told about it. A path walk looks the name up and then opens the inode in a
/// second request; another host may unlink or rename over the name in between (the
/// atomic-replace pattern), and the open must still find the file it looked up.
const UNLINK_GRACE: Duration = ATTR_LEASE;

/// A lease on the names in the directories of an operation on a name: the mount may
/// answer lookups there from what it knows until recalled (any other mount's change of a
/// name there changes the directory, which recalls the lease like an attribute lease).
#[derive(Default)]
struct NameLease {
    granted: bool,
    /// The directories' attributes after the operation.
    parents: Vec<Attr>,
}

/// What `inspect` shows of one session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub host: String,
    pub mountpoint: String,
    pub age: Duration,
    pub open_files: u32,
    pub locks: u32,
    pub leases: u32,
}

/// One served volume.
pub struct Served {
    pub volume_id: String,
    fs: Mutex<Fs>,
    /// Sessions, open files, unlinked files kept for now, departed mounts, the grace
    /// windows (lock order: `fs`, then `sessions`, then `leases`, `locks`, `recalls`,
    /// `evictions`).
    sessions: Mutex<Sessions>,
    locks: Mutex<LockTable>,
    /// Wakes F_SETLKW waiters whenever locks are released.
    lock_changed: tokio::sync::Notify,
    /// Who may cache which inode's attributes.
    leases: Mutex<LeaseTable>,
    /// Recalls waiting for their acknowledgement.
    recalls: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    /// Recalls of evicted leases (nobody waits for them) -> the session they went to:
    /// until acknowledged, the session's heartbeats renew nothing.
    evictions: Mutex<HashMap<u64, u64>>,
    next_recall: std::sync::atomic::AtomicU64,
    /// Set under the fs lock when this coordinator stops: every request after that is
    /// refused as "not served here" and asked again at the next coordinator, so nothing
    /// changes after the stop recorded what its successor must wait for.
    closing: std::sync::atomic::AtomicBool,
    /// Open while this node holds the volume's coordinator role: closed, every request
    /// is refused as "not served here" (see `shoal_blockd::coordinator_role`).
    gate: RoleGate,
}

impl Served {
    /// Serves `fs`, which a previous coordinator left in in-service state `found`.
    fn new(volume_id: &str, mut fs: Fs, lease: Duration, found: u64) -> Self {
        let now = Instant::now();
        let grace = Grace::after(
            found == SERVING,
            found != STOPPED_CLEAN,
            lease,
            ATTR_LEASE,
            now,
        );
        let orphans = fs.orphans().unwrap_or_else(|e| {
            warn!(volume = volume_id, error = %e, "cannot list the files unlinked while open");
            Vec::new()
        });
        let inherited_orphans = if grace.files_until.is_some() {
            orphans
        } else {
            // A clean stop before: no mount has any of them open.
            if let Err(e) = fs.destroy_many(&orphans) {
                warn!(volume = volume_id, error = %e, "cannot free files left unlinked");
            }
            Vec::new()
        };
        // Every mount with recorded replies was a previous coordinator's.
        let departed = fs.reply_clients().unwrap_or_else(|e| {
            warn!(volume = volume_id, error = %e, "cannot list the recorded replies");
            Vec::new()
        });
        Served {
            sessions: Mutex::new(Sessions::new(
                lease,
                UNLINK_GRACE,
                grace,
                departed,
                inherited_orphans,
                now,
            )),
            gate: Arc::new(Mutex::new(RoleLease::unbounded())),
            closing: std::sync::atomic::AtomicBool::new(false),
            volume_id: volume_id.to_string(),
            fs: Mutex::new(fs),
            locks: Mutex::new(LockTable::default()),
            lock_changed: tokio::sync::Notify::new(),
            leases: Mutex::new(LeaseTable::new(ATTR_LEASE)),
            recalls: Mutex::new(HashMap::new()),
            evictions: Mutex::new(HashMap::new()),
            next_recall: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Whether this coordinator stopped serving: it is closing, or its role gate closed
    /// (checked where a request commits, not only where it arrived: a request may have
    /// waited for seconds in between).
    fn stopped(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst) || !gate_open(&self.gate)
    }

    /// Runs `f` on a live session (renewing it); NOT_FOUND when it expired.
    fn with_session<T>(&self, id: u64, f: impl FnOnce(&mut Session) -> T) -> Result<T, Status> {
        let mut ss = self.sessions.lock().expect("sessions");
        let s = ss
            .renew(id, Instant::now())
            .ok_or_else(|| Status::not_found("session expired"))?;
        Ok(f(s))
    }

    /// Notes that a mount now knows `ino` (and may open it by number).
    fn hand_out(&self, ino: u64) {
        self.sessions
            .lock()
            .expect("sessions")
            .hand_out(ino, Instant::now());
    }

    /// Frees an inode that lost its last link, unless a mount still has it open or was
    /// told about it within [`UNLINK_GRACE`] (then the expiry tick comes back to it).
    fn maybe_destroy(&self, ino: u64, now: Instant) {
        if self.sessions.lock().expect("sessions").keep(ino, now) {
            return;
        }
        // Leaves it alone if it got a name again meanwhile.
        if let Err(e) = self.fs.lock().expect("fs").destroy_many(&[ino]) {
            warn!(volume = %self.volume_id, ino, error = %e, "freeing an unlinked file failed");
        }
    }

    /// The expiry tick: frees the unlinked files nobody may reach any more, drops
    /// sessions whose lease ran out (and what they held), forgets old reply records.
    fn expire(&self, now: Instant) {
        self.leases.lock().expect("leases").prune(now);
        let expired = self.sessions.lock().expect("sessions").expire(now);
        // In batches: one journal write frees many (an `rm -rf` leaves thousands).
        for batch in expired.free.chunks(DESTROY_BATCH) {
            let mut fs = self.fs.lock().expect("fs");
            if let Err(e) = fs.destroy_many(batch) {
                warn!(volume = %self.volume_id, error = %e, "freeing unlinked files failed");
            }
        }
        for (id, s) in expired.gone {
            info!(volume = %self.volume_id, session = id, host = %s.host, "session expired: its locks are released");
            self.drop_session(id, s);
        }
        self.forget_departed(now);
    }

    /// Counts the files a mount says it has open (it comes from another session or
    /// coordinator) in its new session, so they outlive an unlink until it closes them.
    fn reopen(&self, session: u64, opens: &[OpenFile]) {
        if opens.is_empty() {
            return;
        }
        let live: Vec<(u64, u32)> = {
            let mut fs = self.fs.lock().expect("fs");
            opens
                .iter()
                .filter(|o| o.count > 0 && fs.getattr(o.ino).is_ok())
                .map(|o| (o.ino, o.count))
                .collect()
        };
        self.sessions
            .lock()
            .expect("sessions")
            .reopen(session, &live);
        info!(volume = %self.volume_id, session, files = live.len(), gone = opens.len() - live.len(), "open files reclaimed");
    }

    /// Forgets the recorded replies of mounts gone longer than the reply horizon.
    fn forget_departed(&self, now: Instant) {
        let due = self.sessions.lock().expect("sessions").departed_due(now);
        if due.is_empty() {
            return;
        }
        match self
            .fs
            .lock()
            .expect("fs")
            .forget_replies(|c| due.contains(&c))
        {
            Ok(n) => {
                debug!(volume = %self.volume_id, records = n, mounts = due.len(), "forgot the replies of mounts gone for good");
                self.sessions.lock().expect("sessions").forgot(&due);
            }
            Err(e) => warn!(volume = %self.volume_id, error = %e, "cannot forget old replies"),
        }
    }

    /// Forgets a mount's recorded replies (it unmounted: it retries nothing).
    fn forget_client(&self, client: u64) {
        if client == 0 || self.sessions.lock().expect("sessions").has_client(client) {
            return;
        }
        if let Err(e) = self.fs.lock().expect("fs").forget_replies(|c| c == client) {
            warn!(volume = %self.volume_id, error = %e, "cannot forget a mount's replies (tried again later)");
            self.sessions
                .lock()
                .expect("sessions")
                .depart(client, Instant::now());
        }
    }

    /// The answer to a retried change that already ran (by this coordinator or an
    /// earlier one), from its recorded outcome, as things are now. Called with the fs
    /// lock held since the record was read, so the change cannot run in between.
    fn answer_recorded(
        &self,
        mut fs: std::sync::MutexGuard<'_, Fs>,
        session: u64,
        op: &Op,
        (outcome, ran_in): (Outcome, u64),
    ) -> Result<Option<Res>, FsError> {
        let result = match outcome {
            Outcome::Done => None,
            Outcome::Inode(ino) => Some(Res::Attr(to_attr(&fs.getattr(ino)?))),
        };
        drop(fs);
        if let (Op::Create(c), Some(Res::Attr(a))) = (op, &result) {
            self.hand_out(a.ino);
            // The mount holds what it created open. Counted where it ran; a new session
            // (the mount's list of open files did not have it yet) counts it now.
            if c.open && ran_in != session {
                self.sessions
                    .lock()
                    .expect("sessions")
                    .opened(session, a.ino);
            }
        }
        info!(volume = %self.volume_id, session, "a retried change had already run: its recorded outcome is the answer");
        Ok(result)
    }

    /// Frees what a session held: its locks (waking waiters) and its open files.
    fn drop_session(&self, id: u64, s: Session) {
        self.leases.lock().expect("leases").drop_session(id);
        self.evictions
            .lock()
            .expect("evictions")
            .retain(|_, session| *session != id);
        self.locks.lock().expect("locks").release_session(id);
        self.lock_changed.notify_waiters();
        for ino in s.opens.keys() {
            self.maybe_destroy(*ino, Instant::now());
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        let now = Instant::now();
        let locks = self.locks.lock().expect("locks");
        let mut out: Vec<SessionInfo> = self
            .sessions
            .lock()
            .expect("sessions")
            .iter()
            .map(|(id, s)| SessionInfo {
                id: *id,
                host: s.host.clone(),
                mountpoint: s.mountpoint.clone(),
                age: now.duration_since(s.opened),
                open_files: s.opens.values().sum(),
                locks: locks.count_session(*id) as u32,
                leases: 0,
            })
            .collect();
        // Not under the sessions lock: elsewhere the leases lock is taken inside it.
        let leases = self.leases.lock().expect("leases");
        for s in &mut out {
            s.leases = leases.held_by(s.id) as u32;
        }
        out
    }

    /// Runs one operation. Returns the reply and the inodes whose attributes it changed
    /// (other mounts' leases on them must be recalled before the reply goes out).
    fn execute(&self, session: u64, req: &NsRequest) -> (NsReply, Vec<u64>) {
        // Only a change that records its outcome needs the mount's id.
        let client = match &req.op {
            Some(op) if recorded(op) => self
                .sessions
                .lock()
                .expect("sessions")
                .get(session)
                .map_or(0, |s| s.client),
            _ => 0,
        };
        let tag = (client != 0).then_some(ReplyTag {
            client,
            session,
            seq: req.seq,
            done_below: req.done_below,
        });
        let cred = Cred {
            uid: req.uid,
            gid: req.gid,
        };
        let Some(op) = &req.op else {
            return (
                fail(&FsError::Invalid("request without an operation".into())),
                vec![],
            );
        };
        let mut changed = Vec::new();
        let leased = std::cell::Cell::new(false);
        let mut names = NameLease::default();
        let result = match self.run(
            session,
            (tag, req.retry),
            cred,
            op,
            &mut changed,
            &leased,
            &mut names,
        ) {
            // An operation on an inode (not a name) that another host removed since this
            // mount looked it up: ESTALE makes the kernel walk the path again (open and
            // stat retry once), as over NFS, instead of failing with ENOENT.
            Err(FsError::NotFound) if by_inode(op) => Err(FsError::Stale),
            other => other,
        };
        let reply = match result {
            Ok(result) => NsReply {
                errno: 0,
                detail: String::new(),
                attr_ttl_ms: if leased.get() {
                    ATTR_TTL.as_millis() as u32
                } else {
                    0
                },
                result,
                ..Default::default()
            },
            Err(e) => fail(&e),
        };
        let reply = NsReply {
            names_ttl_ms: if names.granted {
                ATTR_TTL.as_millis() as u32
            } else {
                0
            },
            parents: names.parents,
            changed: changed.clone(),
            ..reply
        };
        (reply, changed)
    }

    /// Leases `dirs`' names to `session` (see [`NameLease`]); with `attrs`, also returns
    /// their attributes as they are now. Called under the fs lock, after the change.
    fn lease_names(
        &self,
        session: u64,
        fs: &mut Fs,
        dirs: &[u64],
        attrs: bool,
        out: &mut NameLease,
    ) {
        let mut all = true;
        for d in dirs {
            all &= self.grant(session, *d);
            if attrs {
                match fs.getattr(*d) {
                    Ok(i) => out.parents.push(to_attr(&i)),
                    Err(_) => all = false,
                }
            }
        }
        out.granted = all;
        if !all {
            out.parents.clear();
        }
    }

    /// Records that `session` may cache `ino`'s attributes; false when it cannot be
    /// recalled (no callback stream), and so must not cache.
    fn grant(&self, session: u64, ino: u64) -> bool {
        let mut sessions = self.sessions.lock().expect("sessions");
        let Some(s) = sessions.get_mut(session) else {
            return false;
        };
        let Some(tx) = s.callbacks.as_ref() else {
            return false;
        };
        let evicted = self
            .leases
            .lock()
            .expect("leases")
            .grant(session, ino, Instant::now());
        if !evicted.is_empty() {
            // Past the session's lease limit: its oldest leases are recalled without
            // waiting (they stay in the table, unrenewed, until they run out). Until the
            // mount acknowledges, its heartbeats renew nothing, so it cannot extend what
            // it was told to drop.
            let id = self
                .next_recall
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sent = tx
                .send(Ok(Recall {
                    id,
                    inodes: evicted,
                }))
                .is_ok();
            s.recall_sent(sent);
            if sent {
                self.evictions
                    .lock()
                    .expect("evictions")
                    .insert(id, session);
            }
        }
        true
    }

    /// Takes back every other session's lease on `inodes`: tells them over their callback
    /// streams and waits for their acknowledgements (at most until the leases expire).
    async fn recall(&self, from: u64, inodes: &[u64]) {
        if inodes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut waits = Vec::new();
        let mut deadline = now;
        let mut lapse = false;
        {
            // Sessions first, then leases (as `heartbeat`): a renewal lands either before
            // the leases are taken (and counts in `deadline`) or after the session is
            // marked recalling (and renews nothing).
            let mut sessions = self.sessions.lock().expect("sessions");
            let targets = self
                .leases
                .lock()
                .expect("leases")
                .take_conflicting(from, inodes, now);
            if targets.is_empty() {
                return;
            }
            let mut recalls = self.recalls.lock().expect("recalls");
            for (s, (inos, exp)) in targets {
                deadline = deadline.max(exp);
                let Some(session) = sessions.get_mut(s) else {
                    lapse = true;
                    continue;
                };
                let id = self
                    .next_recall
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (done, wait) = tokio::sync::oneshot::channel();
                let sent = session
                    .callbacks
                    .as_ref()
                    .is_some_and(|tx| tx.send(Ok(Recall { id, inodes: inos })).is_ok());
                session.recall_sent(sent);
                if sent {
                    recalls.insert(id, done);
                    waits.push((s, id, wait));
                } else {
                    lapse = true;
                }
            }
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        for (s, id, wait) in waits {
            let answered = tokio::time::timeout_at(deadline, wait).await.is_ok();
            if !answered {
                warn!(volume = %self.volume_id, "a mount did not answer a recall: waited for its lease to run out");
                self.recalls.lock().expect("recalls").remove(&id);
            }
            if let Some(session) = self.sessions.lock().expect("sessions").get_mut(s) {
                session.recall_answered(answered);
            }
        }
        // A mount whose stream is gone cannot answer: its lease must lapse.
        if lapse {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

mod grpc;
mod lock_wait;
mod ops;
pub use grpc::NamespaceService;
use lock_wait::held;
pub use ops::to_attr;
use ops::{by_inode, fail, mutates, recorded};

#[cfg(test)]
mod tests;
