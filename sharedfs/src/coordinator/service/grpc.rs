//! The tonic shell of the namespace service: [`NamespaceService`] decodes each call,
//! finds the served volume and hands the work to it ([`Served`]).

use super::*;
use crate::timing;

/// The namespace API of one node: every volume it coordinates.
#[derive(Clone)]
pub struct NamespaceService {
    peers: Arc<Peers>,
    volumes: Arc<RwLock<HashMap<String, Arc<Served>>>>,
    lease: Duration,
    /// Attribute leases one mount may hold at most (see [`LeaseTable`]).
    lease_limit: usize,
}

impl NamespaceService {
    /// `lease`: the session lease; `lease_limit`: attribute leases per mount at most.
    pub fn new(peers: Arc<Peers>, lease: Duration, lease_limit: usize) -> Self {
        Self {
            peers,
            volumes: Arc::new(RwLock::new(HashMap::new())),
            lease,
            lease_limit,
        }
    }

    /// Starts serving `fs` as volume `volume_id` while `gate` is open, with a task that
    /// expires sessions.
    pub fn add(&self, volume_id: &str, mut fs: Fs, rt: &tokio::runtime::Handle, gate: RoleGate) {
        // Found in service: the previous coordinator did not stop cleanly and mounts may
        // hold locks it granted. They get one session lease to reclaim them.
        let found = fs.set_in_service(SERVING).unwrap_or_else(|e| {
            warn!(volume = volume_id, error = %e, "cannot record the namespace as in service");
            SERVING
        });
        match found {
            STOPPED_CLEAN => {}
            STOPPED_WITH_OPEN_FILES => {
                info!(volume = volume_id, grace = ?self.lease, "files were open at the previous coordinator's stop: no unlinked file is freed during the grace period")
            }
            _ => {
                info!(volume = volume_id, grace = ?self.lease, "the previous coordinator did not stop cleanly: mounts may reclaim their locks and open files during the grace period")
            }
        }
        let mut served = Served::new(volume_id, fs, self.lease, found);
        served.gate = gate;
        served.leases = Mutex::new(LeaseTable::with_limit(ATTR_LEASE, self.lease_limit));
        let served = Arc::new(served);
        self.volumes
            .write()
            .expect("volumes")
            .insert(volume_id.to_string(), served.clone());
        let weak = Arc::downgrade(&served);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                // Not the coordinator now: nothing expires or is freed here.
                if !gate_open(&s.gate) {
                    continue;
                }
                tokio::task::spawn_blocking(move || s.expire(Instant::now()))
                    .await
                    .ok();
            }
        });
        info!(volume = volume_id, "serving the shared namespace");
    }

    pub fn remove(&self, volume_id: &str) {
        let gone = self.volumes.write().expect("volumes").remove(volume_id);
        if let Some(served) = gone {
            // A clean stop: the next coordinator needs no grace for locks unless some are
            // held, and none for files unless some are open (mounts elsewhere reclaim them
            // there). Nothing changes after this looks: `closing` turns requests away.
            let mut fs = served.fs.lock().expect("fs");
            served
                .closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if !gate_open(&served.gate) {
                // The role was lost: a successor may be serving already, and the volume
                // keeps the in-service mark it needs (mounts reclaim in its grace).
                info!(
                    volume = volume_id,
                    "stopped serving the shared namespace (role lost)"
                );
                return;
            }
            let locks_held = !served.locks.lock().expect("locks").is_empty();
            let files_open = fs.orphans().map_or(true, |o| !o.is_empty())
                || served.sessions.lock().expect("sessions").files_open();
            let state = if locks_held {
                SERVING
            } else if files_open {
                STOPPED_WITH_OPEN_FILES
            } else {
                STOPPED_CLEAN
            };
            if let Err(e) = fs.set_in_service(state) {
                warn!(volume = volume_id, error = %e, "cannot record a clean stop");
            }
            info!(volume = volume_id, "stopped serving the shared namespace");
        }
    }

    pub fn served(&self, volume_id: &str) -> Option<Arc<Served>> {
        self.volumes
            .read()
            .expect("volumes")
            .get(volume_id)
            .cloned()
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.peers.token_ok(req) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong cluster token: not a member of this cluster",
            ))
        }
    }

    fn volume(&self, volume_id: &str) -> Result<Arc<Served>, Status> {
        let served = self.served(volume_id).ok_or_else(|| {
            Status::unavailable(format!(
                "volume {volume_id} is not served by this node (its coordinator moved?)"
            ))
        })?;
        if !gate_open(&served.gate) {
            return Err(Status::unavailable(format!(
                "volume {volume_id}: this node cannot renew its coordinator role lease (cut off from the metadata store?)"
            )));
        }
        Ok(served)
    }
}

#[tonic::async_trait]
impl Namespace for NamespaceService {
    async fn open_session(
        &self,
        req: Request<OpenSessionRequest>,
    ) -> Result<Response<OpenSessionReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        // Random ids: a session of an earlier coordinator never matches a new one.
        let id = crate::random_id();
        let now = Instant::now();
        served.sessions.lock().expect("sessions").open(
            id,
            Session::new(r.client, r.host.clone(), r.mountpoint.clone(), now),
        );
        if !r.opens.is_empty() {
            let opens = r.opens;
            run_blocking(served.clone(), move |s| s.reopen(id, &opens))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        info!(volume = %r.volume_id, session = id, host = %r.host, mountpoint = %r.mountpoint, "session opened");
        Ok(Response::new(OpenSessionReply {
            session: id,
            lease_ms: self.lease.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        // Renews the session's leases, unless it may have missed a recall.
        let now = Instant::now();
        let renewed = served.with_session(r.session, |s| {
            let ok = s.may_renew();
            if ok {
                served.leases.lock().expect("leases").renew(r.session, now);
            }
            ok
        })?;
        Ok(Response::new(HeartbeatReply {
            renewed_ms: if renewed {
                ATTR_TTL.as_millis() as u32
            } else {
                0
            },
        }))
    }

    async fn close_session(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        let gone = served.sessions.lock().expect("sessions").close(r.session);
        if let Some(s) = gone {
            info!(volume = %r.volume_id, session = r.session, "session closed");
            let id = r.session;
            tokio::task::spawn_blocking(move || {
                let client = s.client;
                served.drop_session(id, s);
                served.forget_client(client);
            })
            .await
            .ok();
        }
        Ok(Response::new(HeartbeatReply::default()))
    }

    type CallbacksStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Recall, Status>> + Send + 'static>,
    >;

    async fn callbacks(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<Self::CallbacksStream>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The mount drops everything it cached before it listens again.
        served.with_session(r.session, |s| {
            s.listening(tx);
        })?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<HeartbeatReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        let waited = served.recalls.lock().expect("recalls").remove(&r.id);
        if let Some(done) = waited {
            let _ = done.send(());
        } else {
            let evicted = served.evictions.lock().expect("evictions").remove(&r.id);
            if let Some(session) = evicted {
                if let Some(s) = served.sessions.lock().expect("sessions").get_mut(session) {
                    s.recall_answered(true);
                }
            }
        }
        Ok(Response::new(HeartbeatReply::default()))
    }

    async fn list_sessions(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<SessionList>, Status> {
        self.check(&req)?;
        let served = self.volume(&req.get_ref().volume_id)?;
        let sessions = served
            .sessions()
            .into_iter()
            .map(|s| shoal_proto::ns::SessionInfo {
                id: s.id,
                host: s.host,
                mountpoint: s.mountpoint,
                age_ms: s.age.as_millis() as u64,
                open_files: s.open_files,
                locks: s.locks,
                leases: s.leases,
            })
            .collect();
        Ok(Response::new(SessionList { sessions }))
    }

    async fn fsck(&self, req: Request<FsckRequest>) -> Result<Response<FsckReport>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let served = self.volume(&r.volume_id)?;
        let report =
            tokio::task::spawn_blocking(move || served.fs.lock().expect("fs").fsck(r.repair))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("fsck: {e}")))?;
        Ok(Response::new(FsckReport {
            problems: report.problems,
            inodes: report.inodes,
            directories: report.directories,
            blocks_in_use: report.blocks_in_use,
            repaired: report.repaired,
        }))
    }

    async fn call(&self, req: Request<NsRequest>) -> Result<Response<NsReply>, Status> {
        self.check(&req)?;
        self.call_local(req.into_inner()).await.map(Response::new)
    }
}

impl NamespaceService {
    /// One namespace operation, for a mount in this process as for one over gRPC (which
    /// `call` checks first). A mount on the coordinator's own node calls this directly
    /// from its FUSE thread (`Handle::block_on`): the operation then runs on that thread,
    /// with no network round trip and no hand-off between threads.
    pub async fn call_local(&self, r: NsRequest) -> Result<NsReply, Status> {
        let served = self.volume(&r.volume_id)?;
        let replayed = served.with_session(r.session, |s| {
            s.replies
                .iter()
                .find(|(q, _)| *q == r.seq)
                .map(|(_, reply)| reply.clone())
        })?;
        if let Some(reply) = replayed {
            debug!(
                session = r.session,
                seq = r.seq,
                "retried request: first reply"
            );
            return Ok(reply);
        }
        if let Some(until) = served.grace().quiet_until {
            let now = Instant::now();
            if now < until {
                tokio::time::sleep(until - now).await;
            }
        }
        let waits_for_grace = match &r.op {
            Some(Op::Setlk(l)) => !l.reclaim && l.typ != libc::F_UNLCK,
            Some(Op::Getlk(_)) => true,
            _ => false,
        };
        if waits_for_grace {
            if let Some(reply) = served.hold_for_grace().await {
                return Ok(reply);
            }
        }
        let keep = mutates(&r.op);
        let (session, seq) = (r.session, r.seq);
        let reply = match &r.op {
            Some(Op::Setlk(l)) if l.wait && l.typ != libc::F_UNLCK => {
                served.lock_wait(session, l).await
            }
            _ => {
                let timed = timing::on().then(|| (Instant::now(), timing::op_name(r.op.as_ref())));
                let (reply, changed, dev) = run_blocking(served.clone(), move |s| {
                    if timed.is_some() {
                        timing::take();
                    }
                    let (reply, changed) = s.execute(session, &r);
                    let dev = timed.map(|_| timing::take());
                    if reply.errno == 0 {
                        if let Some(op) = &r.op {
                            crate::failpoints::after_commit(op);
                        }
                    }
                    (reply, changed, dev)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
                // Nobody else may still see the old attributes once this returns.
                let recall = Instant::now();
                served.recall(session, &changed).await;
                if let (Some((start, op)), Some(dev)) = (timed, dev) {
                    debug!(
                        target: timing::TARGET,
                        side = "coordinator",
                        op,
                        total_us = start.elapsed().as_micros() as u64,
                        recall_us = recall.elapsed().as_micros() as u64,
                        writes = dev.writes,
                        write_us = dev.write.as_micros() as u64,
                        flushes = dev.flushes,
                        flush_us = dev.flush.as_micros() as u64,
                        "namespace operation"
                    );
                }
                reply
            }
        };
        if reply.errno == libc::ESHUTDOWN {
            // `FsError::NotServing`: the mount finds the next coordinator and asks there.
            return Err(Status::unavailable(format!(
                "volume {} is no longer served by this node (its coordinator is stopping)",
                served.volume_id
            )));
        }
        // "Still waiting" is asked again under a new number: do not replay it.
        if keep && reply.errno != libc::EINPROGRESS {
            if let Some(s) = served.sessions.lock().expect("sessions").get_mut(session) {
                if s.replies.len() >= REPLAY_DEPTH {
                    s.replies.pop_front();
                }
                s.replies.push_back((seq, reply.clone()));
            }
        }
        Ok(reply)
    }
}

/// Runs `f` (which may block on the volume's I/O) from an async handler. On a
/// multi-threaded runtime it runs right here, the worker handing its other tasks to the
/// rest of the pool (`block_in_place`): most namespace operations take tens of
/// microseconds, and a hop to the blocking pool and back cost more than that.
async fn run_blocking<T: Send + 'static>(
    served: Arc<Served>,
    f: impl FnOnce(&Served) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        Ok(tokio::task::block_in_place(|| f(&served)))
    } else {
        tokio::task::spawn_blocking(move || f(&served)).await
    }
}
