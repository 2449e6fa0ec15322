//! The FUSE client: a mount of a shared volume on any host, forwarding every operation
//! to the namespace service on the volume's coordinator: over gRPC, or as a plain call
//! when the coordinator is the node this mount lives in (`InProcess`).
//!
//! Coherence comes from the coordinator, which serializes all changes, and from caching
//! only under its leases: the kernel caches attributes for the lease's time (recalled by
//! inode invalidation), names are cached here (`cache.rs`; the kernel's entry timeout is
//! zero, so it asks us for every name), and files are opened with direct I/O, so every
//! read and write goes to the coordinator. See `docs/consistency.md`.
//!
//! A request that cannot reach the coordinator is retried, with the same sequence
//! number, until it can: applications see a pause, not `ENOTCONN`. A session the
//! coordinator no longer knows (it restarted, or the lease ran out) is reopened.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use shoal_blockd::peers::PeerNamespaceClient;
use shoal_blockd::shared::Resolver;
use shoal_proto::ns::ns_reply::Result as Res;
use shoal_proto::ns::ns_request::Op;
use shoal_proto::ns::*;
use tracing::{info, warn};

use crate::cache::{Cache, Effect, Fresh, Name};
use crate::fs::FIRST_COOKIE;
use crate::inode::Kind;
use crate::locks::{Held, LockTable, Mode as LockMode, Owner as LockOwnerId};

/// Largest read or write the kernel sends.
const MAX_IO: u32 = 1 << 20;
/// The kernel's entry timeout: names are cached here, not in the kernel (see `cache.rs`).
const TTL: Duration = Duration::ZERO;
const READDIR_BATCH: u32 = 256;
/// Entries per `readdirplus` call when the mount reads a whole directory.
const LIST_BATCH: u32 = 512;
/// A directory is read whole only up to this many entries.
const LIST_MAX: usize = 16_384;

/// How long the coordinator may stay unreachable before the mount asks its node to
/// find (or become) the coordinator again.
const RESOLVE_AFTER: Duration = Duration::from_secs(2);

/// Makes a client for a coordinator address.
pub type Connect = Arc<dyn Fn(&str) -> Option<PeerNamespaceClient> + Send + Sync>;

/// The namespace service of the node a mount lives in, and that node's address.
#[derive(Clone)]
pub struct InProcess {
    pub address: String,
    pub service: crate::service::NamespaceService,
}

/// A FUSE thread's own runtime and connection to the coordinator.
struct Local {
    rt: tokio::runtime::Runtime,
    client: PeerNamespaceClient,
    addr: String,
    /// The `Rpc` it belongs to (several mounts live in one process).
    owner: usize,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Local>> = const { std::cell::RefCell::new(None) };
}

/// The connection to the coordinator, shared by the FUSE threads and the heartbeat.
pub struct Rpc {
    volume_id: String,
    host: String,
    mountpoint: String,
    client: std::sync::RwLock<PeerNamespaceClient>,
    /// The coordinator's address (changes at a failover).
    addr: std::sync::RwLock<String>,
    resolve: Resolver,
    connect: Connect,
    /// Makes a client on a connection of its own, for one FUSE thread's own runtime.
    private: Connect,
    /// This node's address and namespace service: while the coordinator is this node,
    /// requests are calls in this process, not gRPC.
    in_process: Option<InProcess>,
    /// Serializes re-resolution among the FUSE threads.
    resolving: std::sync::Mutex<()>,
    /// Requests whose answer nobody waits for (closes), sent in order by one thread.
    background: std::sync::Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    session: AtomicU64,
    /// This mount's id at every coordinator: its changes' replies are recorded under it.
    id: u64,
    seq: AtomicU64,
    /// Numbers of the requests waiting for their answer: the lowest tells the
    /// coordinator which recorded replies it may forget.
    in_flight: Mutex<std::collections::BTreeSet<u64>>,
    rt: tokio::runtime::Handle,
    stopping: AtomicBool,
    /// Names and attributes held under the coordinator's leases.
    cache: Mutex<Cache>,
    /// The locks this mount holds at the coordinator (owners with session 0), as the
    /// coordinator granted them: reclaimed at a new coordinator after a failover.
    held: Mutex<LockTable>,
    /// How many times this mount has each file open (as the coordinator counted them):
    /// told to a new coordinator, so a file unlinked while open here outlives a failover.
    opened: Mutex<std::collections::HashMap<u64, u32>>,
    /// One session change at a time (see `replace_session`).
    session_lock: Mutex<()>,
    /// When the last heartbeat that the coordinator answered was sent, and the session
    /// lease: a mount silent for longer may have lost its locks to another mount.
    renewed_at: Mutex<std::time::Instant>,
    lease: Mutex<Duration>,
}

impl Rpc {
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        volume_id: &str,
        host: &str,
        mountpoint: &Path,
        addr: &str,
        client: PeerNamespaceClient,
        resolve: Resolver,
        connect: Connect,
        private: Connect,
        in_process: Option<InProcess>,
        rt: tokio::runtime::Handle,
    ) -> Result<Arc<Self>, tonic::Status> {
        let rpc = Arc::new(Self {
            volume_id: volume_id.to_string(),
            host: host.to_string(),
            mountpoint: mountpoint.to_string_lossy().into_owned(),
            client: std::sync::RwLock::new(client),
            addr: std::sync::RwLock::new(addr.to_string()),
            resolve,
            connect,
            private,
            in_process,
            resolving: std::sync::Mutex::new(()),
            background: std::sync::Mutex::new(None),
            session: AtomicU64::new(0),
            id: crate::random_id() | 1,
            seq: AtomicU64::new(1),
            in_flight: Mutex::new(std::collections::BTreeSet::new()),
            rt,
            stopping: AtomicBool::new(false),
            cache: Mutex::new(Cache::default()),
            held: Mutex::new(LockTable::default()),
            session_lock: Mutex::new(()),
            opened: Mutex::new(std::collections::HashMap::new()),
            renewed_at: Mutex::new(std::time::Instant::now()),
            lease: Mutex::new(Duration::from_secs(15)),
        });
        rpc.open_session()?;
        let (tx, rx) = std::sync::mpsc::channel::<Op>();
        *rpc.background.lock().expect("background") = Some(tx);
        let weak = Arc::downgrade(&rpc);
        std::thread::spawn(move || {
            while let Ok(op) = rx.recv() {
                let Some(rpc) = weak.upgrade() else { return };
                if let Err(e) = rpc.call_as(0, 0, op, &Effect::None) {
                    warn!(volume = %rpc.volume_id, error = ?e, "a close was not recorded");
                }
            }
        });
        Ok(rpc)
    }

    /// One call. To this node's own namespace service it is a call on this thread; over
    /// gRPC, outside a runtime (FUSE threads) it runs on the thread's own runtime and
    /// connection, so no other thread is involved; otherwise on the node's runtime.
    fn send(&self, msg: NsRequest) -> Result<tonic::Response<NsReply>, tonic::Status> {
        if let Some(p) = &self.in_process {
            let here = *self.addr.read().expect("addr") == p.address
                && p.service.served(&self.volume_id).is_some();
            if here {
                return self
                    .rt
                    .block_on(p.service.call_local(msg))
                    .map(tonic::Response::new);
            }
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let mut c = self.client();
            return self.rt.block_on(c.call(msg));
        }
        let addr = self.addr.read().expect("addr").clone();
        let me = self as *const Self as usize;
        LOCAL.with(|cell| {
            let mut local = cell.borrow_mut();
            let stale = local
                .as_ref()
                .is_none_or(|l| l.addr != addr || l.owner != me);
            if stale {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| tonic::Status::internal(format!("thread runtime: {e}")))?;
                let client = {
                    let _g = rt.enter();
                    (self.private)(&addr)
                }
                .ok_or_else(|| tonic::Status::unavailable(format!("no client for {addr}")))?;
                *local = Some(Local {
                    rt,
                    client,
                    addr,
                    owner: me,
                });
            }
            let l = local.as_mut().expect("set above");
            let mut c = l.client.clone();
            l.rt.block_on(c.call(msg))
        })
    }

    /// Listens to the session's callback stream: drops the kernel's cached attributes of
    /// recalled inodes, then acknowledges. Resubscribes when the stream ends (a new
    /// session, a new coordinator).
    fn callback_loop(self: Arc<Self>, notifier: fuser::Notifier) {
        std::thread::spawn(move || {
            // Its own runtime and connection: a recall and its acknowledgement then run on
            // this thread alone, without hand-offs to the node's runtime (every change to
            // something this mount caches waits for that acknowledgement).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(volume = %self.volume_id, error = %e, "no runtime for recalls: nothing is cached");
                    return;
                }
            };
            while !self.stopping.load(Ordering::Relaxed) {
                let addr = self.addr.read().expect("addr").clone();
                let private = {
                    let _in = rt.enter();
                    (self.private)(&addr)
                };
                let mut c = private.unwrap_or_else(|| self.client());
                let session = self.session.load(Ordering::SeqCst);
                let req = HeartbeatRequest {
                    volume_id: self.volume_id.clone(),
                    session,
                };
                // Recalls may have been missed while not listening: start afresh.
                self.cache().clear();
                let mut stream = match rt.block_on(c.callbacks(req)) {
                    Ok(s) => s.into_inner(),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                while let Ok(Some(recall)) = rt.block_on(stream.message()) {
                    self.cache.lock().expect("cache").recall(&recall.inodes);
                    for ino in &recall.inodes {
                        // Negative offset: attributes only (file data is not cached).
                        let _ = notifier.inval_inode(INodeNo(*ino), -1, 0);
                    }
                    let ack = AckRequest {
                        volume_id: self.volume_id.clone(),
                        session,
                        id: recall.id,
                    };
                    let _ = rt.block_on(c.ack(ack));
                }
            }
        });
    }

    /// Sends `op` without waiting for its answer (still in order, still retried).
    fn send_later(&self, op: Op) {
        if let Some(tx) = self.background.lock().expect("background").as_ref() {
            let _ = tx.send(op);
        }
    }

    fn client(&self) -> PeerNamespaceClient {
        self.client.read().expect("client").clone()
    }

    /// Asks the node where the coordinator is now (it may take the volume over), then
    /// opens a session there. The old session's locks are gone with the old coordinator.
    fn re_resolve(&self) {
        let Ok(_one) = self.resolving.try_lock() else {
            // Another thread is at it; wait for it instead.
            let _g = self.resolving.lock();
            return;
        };
        let old = self.session.load(Ordering::SeqCst);
        match (self.resolve)() {
            Ok(addr) => {
                if let Some(c) = (self.connect)(&addr) {
                    *self.client.write().expect("client") = c;
                    *self.addr.write().expect("addr") = addr.clone();
                    match self.replace_session(Some(old)) {
                        Ok(()) => {
                            info!(volume = %self.volume_id, coordinator = %addr, "reconnected to the coordinator")
                        }
                        Err(e) => {
                            warn!(volume = %self.volume_id, error = %e, "no session at the new coordinator yet")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(volume = %self.volume_id, error = %e, "cannot find the coordinator yet")
            }
        }
    }

    fn open_session(&self) -> Result<(), tonic::Status> {
        self.replace_session(None)
    }

    /// Opens a new session, unless `stale` (the session a request just failed with) was
    /// replaced by another thread meanwhile. One at a time: the locks are reclaimed under
    /// the new session before it is published, so every other thread's request (an
    /// unlock, a close) still carries the old one, fails, waits here, and then runs after
    /// the reclaim.
    fn replace_session(&self, stale: Option<u64>) -> Result<(), tonic::Status> {
        let _one = self.session_lock.lock().expect("session lock");
        if stale.is_some_and(|s| s != self.session.load(Ordering::SeqCst)) {
            return Ok(());
        }
        let mut c = self.client();
        let req = OpenSessionRequest {
            volume_id: self.volume_id.clone(),
            host: self.host.clone(),
            mountpoint: self.mountpoint.clone(),
            client: self.id,
            opens: self
                .opened
                .lock()
                .expect("opened")
                .iter()
                .map(|(ino, count)| OpenFile {
                    ino: *ino,
                    count: *count,
                })
                .collect(),
        };
        let r = self.rt.block_on(c.open_session(req))?.into_inner();
        // The leases were the old session's.
        self.cache.lock().expect("cache").clear();
        self.reclaim_locks(r.session);
        *self.renewed_at.lock().expect("renewed") = std::time::Instant::now();
        *self.lease.lock().expect("lease") = Duration::from_millis(r.lease_ms as u64);
        self.session.store(r.session, Ordering::SeqCst);
        Ok(())
    }

    /// Notes a lock change the coordinator accepted (`l` as sent).
    fn note_setlk(&self, l: &Lk) {
        let owner = LockOwnerId {
            session: 0,
            owner: l.owner,
        };
        let mut held = self.held.lock().expect("held locks");
        let mode = match l.typ {
            libc::F_RDLCK => LockMode::Read,
            libc::F_WRLCK => LockMode::Write,
            _ => {
                held.unlock(l.ino, owner, l.start, l.end);
                return;
            }
        };
        // Granted by the coordinator: recorded whatever this copy still shows (another
        // owner's unlock may be noted after this grant).
        held.force(
            l.ino,
            Held {
                owner,
                mode,
                start: l.start,
                end: l.end,
                pid: l.pid,
                fh: l.fh,
            },
        );
    }

    /// Notes the release of an owner's locks on a file: all of them (a close), or those
    /// taken through one open (`fh`, a flock'd file's close).
    fn note_release(&self, ino: u64, owner: u64, fh: Option<u64>) {
        let owner = LockOwnerId { session: 0, owner };
        let mut held = self.held.lock().expect("held locks");
        match fh {
            Some(fh) => held.release_open(ino, owner, fh),
            None => held.unlock(ino, owner, 0, u64::MAX),
        };
    }

    /// Asks a new session for every lock this mount held (after a failover the new
    /// coordinator grants them during its grace period, before anyone else's). A lock it
    /// refuses is lost: the application is not told (as with NFS), only the log says.
    fn reclaim_locks(&self, session: u64) {
        let held = self.held.lock().expect("held locks").all();
        if held.is_empty() {
            return;
        }
        let silent = self.renewed_at.lock().expect("renewed").elapsed();
        let lease = *self.lease.lock().expect("lease");
        if silent >= lease {
            // The coordinator may have expired the old session and given the locks to
            // another mount: reclaiming them could take them from their holder.
            warn!(volume = %self.volume_id, locks = held.len(), ?silent, "cut off longer than the session lease: the locks held through the old session are lost");
            *self.held.lock().expect("held locks") = LockTable::default();
            return;
        }
        let mut c = self.client();
        let mut reclaimed = 0usize;
        for (ino, h) in held {
            let lk = Lk {
                ino,
                owner: h.owner.owner,
                start: h.start,
                end: h.end,
                typ: match h.mode {
                    LockMode::Read => libc::F_RDLCK,
                    LockMode::Write => libc::F_WRLCK,
                },
                pid: h.pid,
                wait: false,
                fh: h.fh,
                reclaim: true,
            };
            let msg = NsRequest {
                volume_id: self.volume_id.clone(),
                session,
                seq: self.seq.fetch_add(1, Ordering::SeqCst),
                uid: 0,
                gid: 0,
                op: Some(Op::Setlk(lk)),
                retry: false,
                done_below: self.done_below(),
            };
            let why = match self.rt.block_on(c.call(msg)) {
                Ok(r) if r.get_ref().errno == 0 => {
                    reclaimed += 1;
                    continue;
                }
                Ok(r) => r.into_inner().detail,
                Err(s) => s.to_string(),
            };
            warn!(volume = %self.volume_id, ino, owner = h.owner.owner, reason = %why, "a lock held through the previous coordinator is lost");
            self.held
                .lock()
                .expect("held locks")
                .unlock(ino, h.owner, h.start, h.end);
        }
        info!(volume = %self.volume_id, reclaimed, "locks reclaimed at the coordinator");
    }

    /// Renews the session until the mount goes away.
    pub fn heartbeat_loop(self: Arc<Self>, every: Duration) {
        std::thread::spawn(move || {
            let mut failing_since: Option<std::time::Instant> = None;
            loop {
                std::thread::sleep(every);
                // Unmounted while asleep: the session is closed, renewing it would fail.
                if self.stopping.load(Ordering::Relaxed) {
                    break;
                }
                let mut c = self.client();
                let req = HeartbeatRequest {
                    volume_id: self.volume_id.clone(),
                    session: self.session.load(Ordering::SeqCst),
                };
                let hb_session = req.session;
                let sent = std::time::Instant::now();
                let ticket = self.cache().ticket(sent);
                match self.rt.block_on(c.heartbeat(req)) {
                    Ok(r) => {
                        failing_since = None;
                        *self.renewed_at.lock().expect("renewed") = sent;
                        let ms = r.into_inner().renewed_ms;
                        if ms > 0 {
                            self.cache().renew(
                                ticket,
                                Duration::from_millis(ms as u64),
                                std::time::Instant::now(),
                            );
                        }
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        warn!(volume = %self.volume_id, "session lost; opening a new one");
                        let _ = self.replace_session(Some(hb_session));
                    }
                    Err(s) => {
                        warn!(volume = %self.volume_id, error = %s, "heartbeat failed");
                        // An idle mount finds a new coordinator too: it may hold locks
                        // to reclaim there within the grace period.
                        let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= RESOLVE_AFTER {
                            self.re_resolve();
                            failing_since = None;
                        }
                    }
                }
            }
        });
    }

    pub fn close(&self) {
        // Pending closes go first (the channel is drained by its thread).
        self.background.lock().expect("background").take();
        self.stopping.store(true, Ordering::Relaxed);
        let mut c = self.client();
        let req = HeartbeatRequest {
            volume_id: self.volume_id.clone(),
            session: self.session.load(Ordering::SeqCst),
        };
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), c.close_session(req)).await
        });
    }

    /// Runs one operation; retries until the coordinator answers.
    fn call(&self, req: &Request, op: Op) -> Result<Option<Res>, Errno> {
        self.call_as(req.uid(), req.gid(), op, &Effect::None)
            .map(|(r, _)| r)
    }

    /// Like `call`, with how long the reply's attributes may be cached (their lease).
    fn call_ttl(&self, req: &Request, op: Op) -> Result<(Option<Res>, Duration), Errno> {
        self.call_as(req.uid(), req.gid(), op, &Effect::None)
    }

    /// Like `call_ttl` for an operation on names: the cache learns what it did.
    fn call_names(
        &self,
        req: &Request,
        op: Op,
        effect: &Effect,
    ) -> Result<(Option<Res>, Duration), Errno> {
        self.call_as(req.uid(), req.gid(), op, effect)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().expect("cache")
    }

    /// Keeps `opened` as the coordinator counts: an open or a create-and-open that
    /// succeeded adds one (a release takes one: `note_closed`).
    fn note_opens(&self, op: &Op, r: &NsReply) {
        let ino = match (op, &r.result) {
            (Op::Open(i), _) if r.errno == 0 => i.ino,
            (Op::Create(c), Some(Res::Attr(a))) if c.open && r.errno == 0 => a.ino,
            // Every other reply: no lock taken on the I/O path.
            _ => return,
        };
        *self.opened.lock().expect("opened").entry(ino).or_insert(0) += 1;
    }

    /// A release is on its way (whatever its answer will be): one open fewer.
    fn note_closed(&self, ino: u64) {
        let mut opened = self.opened.lock().expect("opened");
        if let Some(n) = opened.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                opened.remove(&ino);
            }
        }
    }

    /// The lowest number of a request still waiting for its answer (or the next one).
    fn done_below(&self) -> u64 {
        let waiting = self.in_flight.lock().expect("in flight");
        match waiting.first() {
            Some(s) => *s,
            None => self.seq.load(Ordering::SeqCst),
        }
    }

    fn call_as(
        &self,
        uid: u32,
        gid: u32,
        op: Op,
        effect: &Effect,
    ) -> Result<(Option<Res>, Duration), Errno> {
        let answering = InFlight::enter(&self.in_flight, &self.seq);
        let seq = answering.seq;
        let ticket = self.cache().ticket(std::time::Instant::now());
        let mut delay = Duration::from_millis(20);
        let mut failing_since: Option<std::time::Instant> = None;
        let mut retry = false;
        loop {
            let msg_session = self.session.load(Ordering::SeqCst);
            let msg = NsRequest {
                volume_id: self.volume_id.clone(),
                session: msg_session,
                seq,
                uid,
                gid,
                op: Some(op.clone()),
                retry,
                done_below: self.done_below(),
            };
            retry = true;
            match self.send(msg) {
                Ok(r) => {
                    let r = r.into_inner();
                    let ttl = Duration::from_millis(r.attr_ttl_ms as u64);
                    let effect = match (effect, &r.result) {
                        // The inode a lookup found is only known now.
                        (Effect::Looked { parent, name, .. }, Some(Res::Attr(a))) => {
                            Effect::Looked {
                                parent: *parent,
                                name: name.clone(),
                                ino: Some(a.ino),
                            }
                        }
                        (
                            Effect::Added {
                                parent, name, dir, ..
                            },
                            Some(Res::Attr(a)),
                        ) => Effect::Added {
                            parent: *parent,
                            name: name.clone(),
                            ino: a.ino,
                            dir: *dir,
                        },
                        (e, _) => e.clone(),
                    };
                    let fresh = Fresh {
                        ok: r.errno == 0,
                        attr: match &r.result {
                            Some(Res::Attr(a)) => Some((a, ttl)),
                            _ => None,
                        },
                        parents: r.parents.iter().collect(),
                        names_ttl: Duration::from_millis(r.names_ttl_ms as u64),
                        changed: &r.changed,
                        listed: match &r.result {
                            Some(Res::EntriesPlus(e)) => &e.entries,
                            _ => &[],
                        },
                        listed_ttl: ttl,
                    };
                    self.cache().settle(ticket, &fresh, &effect);
                    self.note_opens(&op, &r);
                    if r.errno != 0 {
                        return Err(Errno::from_i32(r.errno));
                    }
                    return Ok((r.result, ttl));
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    warn!(volume = %self.volume_id, "session lost; opening a new one");
                    if self.replace_session(Some(msg_session)).is_err() {
                        std::thread::sleep(delay);
                    }
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Internal
                    ) =>
                {
                    if self.stopping.load(Ordering::Relaxed) {
                        return Err(Errno::EIO);
                    }
                    warn!(volume = %self.volume_id, error = %s, "coordinator unreachable; retrying");
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= RESOLVE_AFTER {
                        self.re_resolve();
                        failing_since = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(s) => {
                    warn!(volume = %self.volume_id, error = %s, "namespace call refused");
                    return Err(Errno::EIO);
                }
            }
        }
    }
}

/// A request waiting for its answer, for as long as this lives.
struct InFlight<'a> {
    set: &'a Mutex<std::collections::BTreeSet<u64>>,
    seq: u64,
}

impl<'a> InFlight<'a> {
    /// Takes the next number and notes it as waiting, in one step: a `done_below`
    /// computed meanwhile cannot pass a number already handed out.
    fn enter(set: &'a Mutex<std::collections::BTreeSet<u64>>, next: &AtomicU64) -> Self {
        let mut waiting = set.lock().expect("in flight");
        let seq = next.fetch_add(1, Ordering::SeqCst);
        waiting.insert(seq);
        InFlight { set, seq }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("in flight").remove(&self.seq);
    }
}

fn time(t: &Option<shoal_proto::ns::Time>) -> SystemTime {
    match t {
        Some(t) if t.sec >= 0 => UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec),
        Some(t) => {
            UNIX_EPOCH - Duration::new((-t.sec) as u64, 0) + Duration::from_nanos(t.nsec as u64)
        }
        None => UNIX_EPOCH,
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_type(code: u32) -> FileType {
    match Kind::from_code(code as u8) {
        Ok(k) => file_type(k.mode_bits()),
        Err(_) => FileType::RegularFile,
    }
}

fn to_file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(&a.atime),
        mtime: time(&a.mtime),
        ctime: time(&a.ctime),
        crtime: time(&a.crtime),
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn attr_of(r: Option<Res>) -> Result<FileAttr, Errno> {
    match r {
        Some(Res::Attr(a)) => Ok(to_file_attr(&a)),
        _ => Err(Errno::EIO),
    }
}

fn entry_of(parent: INodeNo, name: &OsStr) -> Entry {
    Entry {
        parent: parent.0,
        name: name.as_bytes().to_vec(),
    }
}

/// The payload of a data reply, without copying it (reads go straight to the kernel).
fn data_of(r: Option<Res>) -> bytes::Bytes {
    match r {
        Some(Res::Data(d)) => d,
        _ => bytes::Bytes::new(),
    }
}

fn system_time(t: SystemTime) -> shoal_proto::ns::Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => shoal_proto::ns::Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            shoal_proto::ns::Time { sec, nsec }
        }
    }
}

/// See the module doc.
pub struct Client {
    rpc: Arc<Rpc>,
    /// Handles of opens: each open gets its own, so a lock taken through one open is
    /// told from one taken through a later open with the same kernel lock owner.
    next_fh: std::sync::atomic::AtomicU64,
    /// (inode, lock owner) pairs that took a lock here: their close must release them.
    posix_owners: Mutex<std::collections::HashSet<(u64, u64)>>,
}

impl Client {
    pub fn new(rpc: Arc<Rpc>) -> Self {
        Self {
            rpc,
            next_fh: std::sync::atomic::AtomicU64::new(1),
            posix_owners: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// The kernel keeps no names (they are cached here); attributes for their lease.
    fn entry(&self, reply: ReplyEntry, r: Result<(Option<Res>, Duration), Errno>) {
        match r.and_then(|(r, ttl)| attr_of(r).map(|a| (a, ttl))) {
            Ok((a, ttl)) => reply.entry_with_ttls(&ttl, &TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, reply: ReplyEmpty, r: Result<Option<Res>, Errno>) {
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Reads directory `dir` with attributes into the cache (up to [`LIST_MAX`] entries);
    /// when it got to the end with nothing changed meanwhile, every name there is known.
    fn list_dir(&self, req: &Request, dir: u64) {
        let first = self.rpc.cache().ticket(std::time::Instant::now());
        let mut cookie = FIRST_COOKIE;
        let mut seen = 0;
        while seen < LIST_MAX {
            let r = self.rpc.call_names(
                req,
                Op::Readdirplus(ReadDir {
                    ino: dir,
                    cookie,
                    limit: LIST_BATCH,
                }),
                &Effect::Listed { parent: dir },
            );
            let entries = match r {
                Ok((Some(Res::EntriesPlus(e)), _)) => e.entries,
                _ => return,
            };
            let Some(last) = entries.last() else {
                self.rpc
                    .cache()
                    .listed_all(dir, first, std::time::Instant::now());
                return;
            };
            cookie = last.cookie + 1;
            seen += entries.len();
        }
    }

    /// Unlink or rmdir (`op` makes the request from the name).
    fn remove_name(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        op: fn(Entry) -> Op,
        reply: ReplyEmpty,
    ) {
        let effect = Effect::Removed {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
        };
        let r = self
            .rpc
            .call_names(req, op(entry_of(parent, name)), &effect);
        self.empty(reply, r.map(|(r, _)| r));
    }

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        open: bool,
    ) -> Result<(Option<Res>, Duration), Errno> {
        let effect = Effect::Added {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            ino: 0,
            dir: mode & libc::S_IFMT == libc::S_IFDIR,
        };
        self.rpc.call_names(
            req,
            Op::Create(Create {
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                mode,
                rdev,
                symlink_target: target,
                open,
            }),
            &effect,
        )
    }
}

impl Filesystem for Client {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // fcntl and flock locks come to us (and so to the coordinator's one table)
        // instead of staying local to this host's kernel.
        if let Err(missing) =
            config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS)
        {
            warn!(
                ?missing,
                "the kernel cannot forward locks: they would be local only"
            );
            return Err(std::io::Error::other(
                "kernel lacks FUSE lock forwarding; refusing a mount with host-local locks",
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let op = Op::Getlk(Lk {
            ino: ino.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
            wait: false,
            fh: fh.0,
            reclaim: false,
        });
        // Held back while a new coordinator lets mounts reclaim their locks: ask again.
        let r = loop {
            match self.rpc.call(req, op.clone()) {
                Err(e) if e == Errno::EINPROGRESS => continue,
                r => break r,
            }
        };
        match r {
            Ok(Some(Res::Lock(l))) => reply.locked(l.start, l.end, l.typ, l.pid),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lk = Lk {
            ino: ino.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
            wait: sleep,
            fh: fh.0,
            reclaim: false,
        };
        let op = Op::Setlk(lk);
        loop {
            match self.rpc.call(req, op.clone()) {
                Ok(_) => {
                    self.rpc.note_setlk(&lk);
                    if typ != libc::F_UNLCK {
                        // Remembered so the close (FLUSH) of this owner releases it.
                        self.posix_owners
                            .lock()
                            .expect("posix owners")
                            .insert((ino.0, lock_owner.0));
                    }
                    return reply.ok();
                }
                // Queued at the coordinator and not granted yet: ask again.
                Err(e) if e == Errno::EINPROGRESS => continue,
                Err(e) => return reply.error(e),
            }
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let now = std::time::Instant::now();
        let known = {
            let cache = self.rpc.cache();
            match cache.name(parent.0, name.as_bytes(), now) {
                Name::Found(ino) => cache.attr(ino, now).map(Some),
                Name::Absent => Some(None),
                Name::Unknown => None,
            }
        };
        // Many unknown names asked for here: read the whole directory instead (when it
        // is known to be small enough; the bigger, the more misses first: `cache.rs`).
        let list = known.is_none() && {
            let mut cache = self.rpc.cache();
            match cache.attr(parent.0, now) {
                Some((a, _)) if a.size <= LIST_MAX as u64 => cache.note_miss(parent.0, a.size),
                _ => false,
            }
        };
        let known = match known {
            None if list => {
                self.list_dir(req, parent.0);
                let now = std::time::Instant::now();
                let cache = self.rpc.cache();
                match cache.name(parent.0, name.as_bytes(), now) {
                    Name::Found(ino) => cache.attr(ino, now).map(Some),
                    Name::Absent => Some(None),
                    Name::Unknown => None,
                }
            }
            known => known,
        };
        match known {
            Some(Some((a, ttl))) => {
                return reply.entry_with_ttls(&ttl, &TTL, &to_file_attr(&a), Generation(0))
            }
            Some(None) => return reply.error(Errno::ENOENT),
            None => {}
        }
        let effect = Effect::Looked {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            ino: None,
        };
        let r = self.rpc.call_names(
            req,
            Op::Lookup(Lookup {
                parent: parent.0,
                name: name.as_bytes().to_vec(),
            }),
            &effect,
        );
        self.entry(reply, r);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let cached = self.rpc.cache().attr(ino.0, std::time::Instant::now());
        if let Some((a, ttl)) = cached {
            return reply.attr(&ttl, &to_file_attr(&a));
        }
        match self
            .rpc
            .call_ttl(req, Op::Getattr(Ino { ino: ino.0 }))
            .and_then(|(r, ttl)| attr_of(r).map(|a| (a, ttl)))
        {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (at, at_now) = match atime {
            Some(TimeOrNow::SpecificTime(t)) => (Some(system_time(t)), false),
            Some(TimeOrNow::Now) => (None, true),
            None => (None, false),
        };
        let (mt, mt_now) = match mtime {
            Some(TimeOrNow::SpecificTime(t)) => (Some(system_time(t)), false),
            Some(TimeOrNow::Now) => (None, true),
            None => (None, false),
        };
        let op = Op::Setattr(SetAttr {
            ino: ino.0,
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: at,
            mtime: mt,
            atime_now: at_now,
            mtime_now: mt_now,
        });
        match self
            .rpc
            .call_ttl(req, op)
            .and_then(|(r, ttl)| attr_of(r).map(|a| (a, ttl)))
        {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.rpc.call(req, Op::Readlink(Ino { ino: ino.0 })) {
            Ok(r) => reply.data(&data_of(r)),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.create_node(req, parent, name, mode, rdev, None, false);
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.create_node(
            req,
            parent,
            name,
            libc::S_IFDIR | (mode & 0o7777),
            0,
            None,
            false,
        );
        self.entry(reply, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_name(req, parent, name, Op::Unlink, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_name(req, parent, name, Op::Rmdir, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.create_node(
            req,
            parent,
            link_name,
            libc::S_IFLNK | 0o777,
            0,
            Some(target.as_os_str().as_bytes().to_vec()),
            false,
        );
        self.entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let bits = flags.bits();
        let mode = if bits & libc::RENAME_EXCHANGE != 0 {
            2
        } else if bits & libc::RENAME_NOREPLACE != 0 {
            1
        } else if bits == 0 {
            0
        } else {
            reply.error(Errno::EINVAL);
            return;
        };
        let effect = Effect::Renamed {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            new_parent: newparent.0,
            new_name: newname.as_bytes().to_vec(),
            exchange: mode == 2,
        };
        let r = self.rpc.call_names(
            req,
            Op::Rename(Rename {
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                new_parent: newparent.0,
                new_name: newname.as_bytes().to_vec(),
                mode,
            }),
            &effect,
        );
        self.empty(reply, r.map(|(r, _)| r));
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let effect = Effect::Added {
            parent: newparent.0,
            name: newname.as_bytes().to_vec(),
            ino: ino.0,
            dir: false,
        };
        let r = self.rpc.call_names(
            req,
            Op::Link(Link {
                ino: ino.0,
                parent: newparent.0,
                name: newname.as_bytes().to_vec(),
            }),
            &effect,
        );
        self.entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.rpc.call(req, Op::Open(Ino { ino: ino.0 })) {
            Ok(_) => reply.opened(self.new_fh(), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.rpc.call(
            req,
            Op::Read(Read {
                ino: ino.0,
                offset,
                length: size,
            }),
        ) {
            Ok(r) => reply.data(&data_of(r)),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = Op::Write(Write {
            ino: ino.0,
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            append: flags.0 & libc::O_APPEND != 0,
        });
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let r = self.rpc.call(req, op).and_then(|r| {
            if sync {
                self.rpc.call(req, Op::Fsync(Ino { ino: ino.0 }))?;
            }
            Ok(r)
        });
        match r {
            Ok(_) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are synchronous to the coordinator: nothing is buffered here. But a
        // close drops the process's POSIX locks on the file (the kernel keeps no record
        // of them and sends no unlock): do it, when this owner locked this file at all.
        let held = self
            .posix_owners
            .lock()
            .expect("posix owners")
            .remove(&(ino.0, lock_owner.0));
        if !held {
            return reply.ok();
        }
        let op = Op::Setlk(Lk {
            ino: ino.0,
            owner: lock_owner.0,
            start: 0,
            end: u64::MAX,
            typ: libc::F_UNLCK,
            pid: 0,
            wait: false,
            fh: fh.0,
            reclaim: false,
        });
        match self.rpc.call(req, op) {
            Ok(_) => {
                self.rpc.note_release(ino.0, lock_owner.0, None);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The kernel passes the owner when the file's flock locks must go: that must be
        // done before close() returns. A plain close only lowers an open count at the
        // coordinator, and is sent without waiting.
        if let Some(o) = lock_owner {
            // A flock'd file: its locks go with this close (below), so forget them here.
            self.posix_owners
                .lock()
                .expect("posix owners")
                .remove(&(ino.0, o.0));
        }
        let op = Op::Release(Release {
            ino: ino.0,
            lock_owner: lock_owner.map(|o| o.0),
            fh: fh.0,
        });
        self.rpc.note_closed(ino.0);
        if let Some(o) = lock_owner {
            let r = self.rpc.call(req, op);
            if r.is_ok() {
                self.rpc.note_release(ino.0, o.0, Some(fh.0));
            }
            self.empty(reply, r);
        } else {
            self.rpc.send_later(op);
            reply.ok();
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.rpc.call(req, Op::Fsync(Ino { ino: ino.0 }));
        self.empty(reply, r);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A directory's changes are in the same journal: the same flush.
        self.fsync(req, ino, fh, datasync, reply);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Offsets: 1 and 2 follow "." and ".."; an entry with cookie c is followed by c+1.
        if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
            reply.ok();
            return;
        }
        if offset <= 1 && reply.add(ino, 2, FileType::Directory, "..") {
            reply.ok();
            return;
        }
        let mut cookie = offset.max(FIRST_COOKIE);
        loop {
            let r = self.rpc.call(
                req,
                Op::Readdir(ReadDir {
                    ino: ino.0,
                    cookie,
                    limit: READDIR_BATCH,
                }),
            );
            let entries = match r {
                Ok(Some(Res::Entries(e))) => e.entries,
                Ok(_) => Vec::new(),
                Err(e) => {
                    reply.error(e);
                    return;
                }
            };
            if entries.is_empty() {
                reply.ok();
                return;
            }
            for e in entries {
                let name = OsStr::from_bytes(&e.name);
                if reply.add(INodeNo(e.ino), e.cookie + 1, kind_type(e.kind), name) {
                    reply.ok();
                    return;
                }
                cookie = e.cookie + 1;
            }
        }
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.rpc.call(req, Op::Statfs(Ino { ino: 1 })) {
            Ok(Some(Res::Statfs(s))) => reply.statfs(
                s.blocks,
                s.free,
                s.free,
                s.free.max(1 << 20),
                s.free.max(1 << 20),
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.rpc.call(
            req,
            Op::Setxattr(Xattr {
                ino: ino.0,
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            }),
        );
        self.empty(reply, r);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.rpc.call(
            req,
            Op::Getxattr(Xattr {
                ino: ino.0,
                name: name.as_bytes().to_vec(),
                value: vec![],
                flags: 0,
            }),
        );
        match r {
            Ok(r) => {
                let d = data_of(r);
                if size == 0 {
                    reply.size(d.len() as u32);
                } else if d.len() > size as usize {
                    reply.error(Errno::ERANGE);
                } else {
                    reply.data(&d);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.rpc.call(req, Op::Listxattr(Ino { ino: ino.0 })) {
            Ok(Some(Res::Names(n))) => {
                let mut buf = Vec::new();
                for name in n.names {
                    buf.extend_from_slice(&name);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32);
                } else if buf.len() > size as usize {
                    reply.error(Errno::ERANGE);
                } else {
                    reply.data(&buf);
                }
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.rpc.call(
            req,
            Op::Removexattr(Xattr {
                ino: ino.0,
                name: name.as_bytes().to_vec(),
                value: vec![],
                flags: 0,
            }),
        );
        self.empty(reply, r);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        // One round trip: create and open together.
        let r = self
            .create_node(req, parent, name, mode, 0, None, true)
            .and_then(|(r, _)| attr_of(r));
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                self.new_fh(),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.rpc.call(
            req,
            Op::Fallocate(Fallocate {
                ino: ino.0,
                offset,
                length,
                mode,
            }),
        );
        self.empty(reply, r);
    }
}

/// Whether `path` is still the mount made with device number `dev`.
fn is_our_mount(path: &Path, dev: u64) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    let (Ok(here), Ok(above)) = (std::fs::metadata(path), std::fs::metadata(parent)) else {
        // A dead FUSE connection makes stat fail: still a mount point, and ours.
        return true;
    };
    here.dev() == dev && here.dev() != above.dev()
}

/// Mounts a FUSE filesystem of type `fuse.shoal` at `path` and returns the `/dev/fuse`
/// descriptor that serves it. Mounted here rather than by fuser, which always mounts as
/// plain `fuse`: with the subtype, `/proc/mounts` and `df -T` say what it is, and
/// `mount -o remount,ro` goes to `mount.fuse.shoal` (or, without that helper, straight
/// to the kernel) instead of `mount.fuse`, which cannot remount it.
fn mount_fuse(volume_name: &str, path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let fd = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        fd.as_raw_fd()
    );
    nix::mount::mount(
        Some(format!("shoal:{volume_name}").as_str()),
        path,
        Some("fuse.shoal"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )?;
    Ok(fd)
}

/// A mounted client.
pub struct Mount {
    pub volume_id: String,
    pub path: PathBuf,
    rpc: Arc<Rpc>,
    session: Option<fuser::BackgroundSession>,
    /// Device number of the mount (to tell it from whatever else is mounted there later).
    dev: u64,
}

impl Mount {
    /// Mounts `volume_id` at `path`, served by the coordinator behind `client`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        volume_id: &str,
        volume_name: &str,
        host: &str,
        path: &Path,
        addr: &str,
        client: PeerNamespaceClient,
        resolve: Resolver,
        connect: Connect,
        private: Connect,
        in_process: Option<InProcess>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let rpc = Rpc::connect(
            volume_id, host, path, addr, client, resolve, connect, private, in_process, rt,
        )
        .map_err(|s| std::io::Error::other(format!("opening a session: {}", s.message())))?;
        // Often enough to renew the leases (2 s at the mount) before they run out.
        rpc.clone().heartbeat_loop(Duration::from_millis(700));
        let mut config = fuser::Config::default();
        // Containers run as any user: everyone may use the mount, the modes decide.
        config.acl = fuser::SessionACL::All;
        // Threads blocked in F_SETLKW must not starve the unlock that frees them.
        config.n_threads = Some(16);
        config.clone_fd = true;
        let fd = match mount_fuse(volume_name, path) {
            Ok(fd) => fd,
            Err(e) => {
                rpc.close();
                return Err(e);
            }
        };
        let session =
            match fuser::Session::from_fd(Client::new(rpc.clone()), fd, config.acl, config)
                .and_then(|s| s.spawn())
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
                    rpc.close();
                    return Err(e);
                }
            };
        // Only now: a stat of the new mount waits for the session to answer.
        let dev = std::fs::metadata(path).map(|m| m.dev()).unwrap_or(0);
        rpc.clone().callback_loop(session.notifier());
        info!(volume = volume_id, path = %path.display(), "shared namespace mounted");
        Ok(Self {
            volume_id: volume_id.to_string(),
            path: path.to_path_buf(),
            rpc,
            session: Some(session),
            dev,
        })
    }

    /// Unmounts and closes the session. A mount in use (open files, a process inside)
    /// is left as it is and EBUSY returned, as umount(8) does; the mount stays served.
    pub fn stop(&mut self) -> std::io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        // Only our own mount: if someone unmounted it and mounted something else at this
        // path meanwhile, that is not ours to take away.
        let ours = is_our_mount(&self.path, self.dev);
        if ours {
            if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::empty()) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    self.session = Some(s);
                    return Err(std::io::Error::from(e));
                }
            }
        }
        // The session thread ends when the kernel lets go of the connection, which a
        // bind copy of the mount elsewhere (a container's) can delay: wait a moment,
        // then leave the thread to finish on its own rather than block the caller.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !s.guard.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if s.guard.is_finished() {
            let _ = s.join();
        } else {
            warn!(path = %self.path.display(), "the FUSE connection outlives the unmount (a bind copy in use?)");
        }
        self.rpc.close();
        Ok(())
    }
}
