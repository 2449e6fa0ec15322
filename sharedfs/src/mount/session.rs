//! A mount's session with its coordinator: the callback stream that carries recalls,
//! finding the coordinator again after it moved, opening and replacing the session (and
//! reclaiming locks and open files in the new one), the mount's copy of its own locks,
//! heartbeats, and the clean close.

use super::*;

impl Rpc {
    /// Listens to the session's callback stream: drops the kernel's cached attributes of
    /// recalled inodes, then acknowledges. Resubscribes when the stream ends (a new
    /// session, a new coordinator).
    pub(super) fn callback_loop(self: Arc<Self>, notifier: fuser::Notifier) {
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
    pub(super) fn send_later(&self, op: Op) {
        if let Some(tx) = self.background.lock().expect("background").as_ref() {
            let _ = tx.send(op);
        }
    }

    pub(super) fn client(&self) -> PeerNamespaceClient {
        self.client.read().expect("client").clone()
    }

    /// Asks the node where the coordinator is now (it may take the volume over), then
    /// opens a session there. The old session's locks are gone with the old coordinator.
    pub(super) fn re_resolve(&self) {
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

    pub(super) fn open_session(&self) -> Result<(), tonic::Status> {
        self.replace_session(None)
    }

    /// Opens a new session, unless `stale` (the session a request just failed with) was
    /// replaced by another thread meanwhile. One at a time: the locks are reclaimed under
    /// the new session before it is published, so every other thread's request (an
    /// unlock, a close) still carries the old one, fails, waits here, and then runs after
    /// the reclaim.
    pub(super) fn replace_session(&self, stale: Option<u64>) -> Result<(), tonic::Status> {
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
    pub(super) fn note_setlk(&self, l: &Lk) {
        self.held.lock().expect("held locks").granted(l);
    }

    /// Notes the release of an owner's locks on a file: all of them (a close), or those
    /// taken through one open (`fh`, a flock'd file's close).
    pub(super) fn note_release(&self, ino: u64, owner: u64, fh: Option<u64>) {
        self.held
            .lock()
            .expect("held locks")
            .released(ino, owner, fh);
    }

    /// Asks a new session for every lock this mount held (after a failover the new
    /// coordinator grants them during its grace period, before anyone else's). A lock it
    /// refuses is lost: the application is not told (as with NFS), only the log says.
    pub(super) fn reclaim_locks(&self, session: u64) {
        let silent = self.renewed_at.lock().expect("renewed").elapsed();
        let lease = *self.lease.lock().expect("lease");
        let want = match self.held.lock().expect("held locks").reclaim(silent, lease) {
            Reclaim::Ask(want) if want.is_empty() => return,
            Reclaim::Ask(want) => want,
            Reclaim::Lost(n) => {
                warn!(volume = %self.volume_id, locks = n, ?silent, "cut off longer than the session lease: the locks held through the old session are lost");
                return;
            }
        };
        let mut c = self.client();
        let mut reclaimed = 0usize;
        for lk in want {
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
            warn!(volume = %self.volume_id, ino = lk.ino, owner = lk.owner, reason = %why, "a lock held through the previous coordinator is lost");
            self.held.lock().expect("held locks").refused(&lk);
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
}
