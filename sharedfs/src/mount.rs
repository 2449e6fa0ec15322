//! The FUSE client: a mount of a shared volume on any host, forwarding every operation
//! to the namespace service on the volume's coordinator: over gRPC, or as a plain call
//! when the coordinator is the node this mount lives in (`InProcess`).
//!
//! Coherence comes from the coordinator, which serializes all changes, and from caching
//! only under its leases: the kernel caches attributes for the lease's time (recalled by
//! inode invalidation), names are cached here (`mount/cache.rs`; the kernel's entry timeout is
//! zero, so it asks us for every name), and files are opened with direct I/O, so every
//! read and write goes to the coordinator. See `docs/consistency.md`.
//!
//! A request that cannot reach the coordinator is retried, with the same sequence
//! number, until it can: applications see a pause, not `ENOTCONN`. A session the
//! coordinator no longer knows (it restarted, or the lease ran out) is reopened.
//!
//! Here: the transport and session ([`Rpc`]) and the mount's state ([`Client`]);
//! `fuse.rs` is the kernel adapter, `mount.rs` the `/dev/fuse` session.

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
use tracing::{debug, info, warn};

use crate::format::inode::Kind;
use crate::fs::FIRST_COOKIE;
use crate::mount::cache::{Cache, Effect, Fresh, Name};
use crate::mount::held::{HeldLocks, Reclaim};

/// Largest read or write the kernel sends.
const MAX_IO: u32 = 1 << 20;
/// The kernel's entry timeout: names are cached here, not in the kernel (see `mount/cache.rs`).
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
    pub service: crate::coordinator::service::NamespaceService,
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
    held: Mutex<HeldLocks>,
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
            held: Mutex::new(HeldLocks::default()),
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
            let timed = crate::timing::on().then(std::time::Instant::now);
            let sent = self.send(msg);
            if let Some(t) = timed {
                debug!(
                    target: crate::timing::TARGET,
                    side = "mount",
                    op = crate::timing::op_name(Some(&op)),
                    rpc_us = t.elapsed().as_micros() as u64,
                    "namespace call"
                );
            }
            match sent {
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

pub mod cache;
mod convert;
mod fuse;
pub mod held;
mod kernel;
mod locks;
mod session;
use convert::*;
pub use kernel::Mount;
