//! The operation table of the namespace service: each namespace request applied to the
//! [`Fs`] under its lock (with the lease, open-count and lock-table bookkeeping it needs),
//! and what the replies and reply records are made of.

use super::*;

impl Served {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        session: u64,
        (tag, retry): (Option<ReplyTag>, bool),
        cred: Cred,
        op: &Op,
        changed: &mut Vec<u64>,
        leased: &std::cell::Cell<bool>,
        names: &mut NameLease,
    ) -> Result<Option<Res>, FsError> {
        // Under the fs lock: a change that commits after this read recalls the lease.
        let attr = |i: Inode| {
            self.hand_out(i.ino);
            leased.set(self.grant(session, i.ino));
            Ok(Some(Res::Attr(to_attr(&i))))
        };
        let mut orphan = None;
        let out =
            {
                let mut fs = self.fs.lock().expect("fs");
                if self.stopped() {
                    return Err(FsError::NotServing);
                }
                // A retry of a change that may have run: its record and the change itself are
                // read and made under this one hold of the fs lock, so a retry that overtakes
                // its first attempt cannot run the change a second time.
                let recorded = match tag {
                    Some(t) if retry => fs.recorded_reply(t.client, t.seq)?,
                    _ => None,
                };
                if let Some(found) = recorded {
                    return self.answer_recorded(fs, session, op, found);
                }
                match op {
                    Op::Lookup(l) => {
                        // Before the answer, so a negative one is leased too.
                        self.lease_names(session, &mut fs, &[l.parent], false, names);
                        attr(fs.lookup(l.parent, &l.name)?)
                    }
                    Op::Getattr(i) => attr(fs.getattr(i.ino)?),
                    Op::Setattr(s) => {
                        let now = FsTime::now();
                        let pick = |t: &Option<shoal_proto::ns::Time>, is_now: bool| {
                            if is_now {
                                Some(now)
                            } else {
                                t.as_ref().map(|t| FsTime {
                                    sec: t.sec,
                                    nsec: t.nsec,
                                })
                            }
                        };
                        let set = FsSetAttr {
                            perm: s.mode,
                            uid: s.uid,
                            gid: s.gid,
                            size: s.size,
                            atime: pick(&s.atime, s.atime_now),
                            mtime: pick(&s.mtime, s.mtime_now),
                            ctime: None,
                        };
                        changed.push(s.ino);
                        // A truncate may commit in steps: its record goes with the first.
                        attr(fs.recorded_ahead(tag, Outcome::Inode(s.ino), |fs| {
                            fs.setattr(s.ino, &set)
                        })?)
                    }
                    Op::Create(c) => {
                        let i = fs.recorded(
                            tag,
                            |fs| {
                                fs.create(
                                    c.parent,
                                    &c.name,
                                    c.mode,
                                    c.rdev,
                                    cred,
                                    c.symlink_target.as_deref(),
                                )
                            },
                            inode,
                        )?;
                        changed.push(c.parent);
                        self.lease_names(session, &mut fs, &[c.parent], true, names);
                        let ino = i.ino;
                        let r = attr(i);
                        // Counted before the fs lock goes, so a stop sees it (see `remove`).
                        if c.open {
                            self.sessions.lock().expect("sessions").opened(session, ino);
                        }
                        drop(fs);
                        r
                    }
                    Op::Link(l) => {
                        changed.extend([l.ino, l.parent]);
                        let i = fs.recorded(tag, |fs| fs.link(l.ino, l.parent, &l.name), inode)?;
                        self.lease_names(session, &mut fs, &[l.parent], true, names);
                        attr(i)
                    }
                    Op::Unlink(e) => {
                        let child = fs.lookup(e.parent, &e.name).map(|i| i.ino);
                        orphan = fs.recorded(tag, |fs| fs.unlink(e.parent, &e.name), done)?;
                        self.lease_names(session, &mut fs, &[e.parent], true, names);
                        changed.push(e.parent);
                        changed.extend(child.ok());
                        Ok(None)
                    }
                    Op::Rmdir(e) => {
                        let child = fs.lookup(e.parent, &e.name).map(|i| i.ino);
                        fs.recorded(tag, |fs| fs.rmdir(e.parent, &e.name), done)?;
                        self.lease_names(session, &mut fs, &[e.parent], true, names);
                        changed.push(e.parent);
                        changed.extend(child.ok());
                        Ok(None)
                    }
                    Op::Rename(r) => {
                        let mode = match r.mode {
                            0 => RenameMode::Replace,
                            1 => RenameMode::NoReplace,
                            2 => RenameMode::Exchange,
                            m => return Err(FsError::Invalid(format!("rename mode {m}"))),
                        };
                        let src = fs.lookup(r.parent, &r.name).map(|i| i.ino);
                        let dst = fs.lookup(r.new_parent, &r.new_name).map(|i| i.ino);
                        orphan = fs.recorded(
                            tag,
                            |fs| fs.rename(r.parent, &r.name, r.new_parent, &r.new_name, mode),
                            done,
                        )?;
                        let dirs = [r.parent, r.new_parent];
                        self.lease_names(session, &mut fs, &dirs, true, names);
                        changed.extend(dirs);
                        changed.extend(src.ok());
                        changed.extend(dst.ok());
                        Ok(None)
                    }
                    Op::Readdirplus(r) => {
                        let limit = r.limit.clamp(1, READDIRPLUS_MAX) as usize;
                        // The lease on the names first: a change after this read recalls it.
                        self.lease_names(session, &mut fs, &[r.ino], false, names);
                        let mut entries = Vec::new();
                        let mut all = true;
                        for e in fs.readdir(r.ino, r.cookie, limit)? {
                            let Ok(i) = fs.getattr(e.ino) else { continue };
                            self.hand_out(i.ino);
                            all &= self.grant(session, i.ino);
                            entries.push(DirEntryPlus {
                                cookie: e.cookie,
                                name: e.name,
                                attr: Some(to_attr(&i)),
                            });
                        }
                        leased.set(all && names.granted);
                        Ok(Some(Res::EntriesPlus(EntriesPlus { entries })))
                    }
                    Op::Readdir(r) => {
                        let limit = r.limit.clamp(1, READDIR_MAX) as usize;
                        let entries = fs
                            .readdir(r.ino, r.cookie, limit)?
                            .into_iter()
                            .map(|e| DirEntry {
                                cookie: e.cookie,
                                ino: e.ino,
                                kind: e.kind.code() as u32,
                                name: e.name,
                            })
                            .collect();
                        Ok(Some(Res::Entries(Entries { entries })))
                    }
                    Op::Read(r) => {
                        let len = r.length.min(16 << 20);
                        Ok(Some(Res::Data(fs.read(r.ino, r.offset, len)?.into())))
                    }
                    Op::Write(w) => {
                        changed.push(w.ino);
                        attr(fs.recorded(
                            tag,
                            |fs| fs.write(w.ino, w.offset, &w.data, w.append),
                            inode,
                        )?)
                    }
                    Op::Fsync(_) => {
                        fs.sync()?;
                        Ok(None)
                    }
                    Op::Statfs(_) => {
                        let s = fs.statfs();
                        Ok(Some(Res::Statfs(StatFs {
                            blocks: s.blocks,
                            free: s.free,
                            block_size: s.block_size,
                            name_max: s.name_max,
                        })))
                    }
                    Op::Getxattr(x) => Ok(Some(Res::Data(fs.getxattr(x.ino, &x.name)?.into()))),
                    Op::Setxattr(x) => {
                        fs.recorded(
                            tag,
                            |fs| {
                                fs.setxattr(
                                    x.ino,
                                    &x.name,
                                    &x.value,
                                    x.flags & libc::XATTR_CREATE != 0,
                                    x.flags & libc::XATTR_REPLACE != 0,
                                )
                            },
                            done,
                        )?;
                        changed.push(x.ino);
                        Ok(None)
                    }
                    Op::Listxattr(i) => Ok(Some(Res::Names(Names {
                        names: fs.listxattr(i.ino)?,
                    }))),
                    Op::Removexattr(x) => {
                        fs.recorded(tag, |fs| fs.removexattr(x.ino, &x.name), done)?;
                        changed.push(x.ino);
                        Ok(None)
                    }
                    Op::Fallocate(f) => {
                        let keep = f.mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                        if f.mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                            return Err(FsError::NotSupported);
                        }
                        changed.push(f.ino);
                        attr(fs.fallocate(f.ino, f.offset, f.length, keep)?)
                    }
                    Op::Readlink(i) => Ok(Some(Res::Data(fs.readlink(i.ino)?.into()))),
                    Op::Open(i) => {
                        let r = attr(fs.getattr(i.ino)?);
                        self.sessions
                            .lock()
                            .expect("sessions")
                            .opened(session, i.ino);
                        drop(fs);
                        r
                    }
                    Op::Release(i) => {
                        drop(fs);
                        if let Some(owner) = i.lock_owner {
                            let owner = Owner { session, owner };
                            let mut locks = self.locks.lock().expect("locks");
                            if i.fh != 0 {
                                locks.release_open(i.ino, owner, i.fh);
                            } else {
                                locks.release_owner(i.ino, owner);
                            }
                            drop(locks);
                            self.lock_changed.notify_waiters();
                        }
                        let last = self
                            .sessions
                            .lock()
                            .expect("sessions")
                            .closed(session, i.ino);
                        if last {
                            orphan = Some(i.ino);
                        }
                        Ok(None)
                    }
                    Op::Getlk(l) => {
                        drop(fs);
                        let want = held(session, l)?;
                        let found = self.locks.lock().expect("locks").test(l.ino, &want);
                        Ok(Some(Res::Lock(match found {
                            Some(h) => Lock {
                                start: h.start,
                                end: h.end,
                                typ: if h.mode == Mode::Write {
                                    libc::F_WRLCK
                                } else {
                                    libc::F_RDLCK
                                },
                                pid: h.pid,
                            },
                            None => Lock {
                                start: l.start,
                                end: l.end,
                                typ: libc::F_UNLCK,
                                pid: 0,
                            },
                        })))
                    }
                    Op::Setlk(l) => {
                        drop(fs);
                        if l.reclaim && !self.in_grace(Instant::now()) {
                            // Someone may have taken and released it since: not granted.
                            return Err(FsError::NoLock);
                        }
                        let owner = Owner {
                            session,
                            owner: l.owner,
                        };
                        if l.typ == libc::F_UNLCK {
                            self.locks
                                .lock()
                                .expect("locks")
                                .unlock(l.ino, owner, l.start, l.end);
                            self.lock_changed.notify_waiters();
                            return Ok(None);
                        }
                        let want = held(session, l)?;
                        let mut locks = self.locks.lock().expect("locks");
                        // Checked under the lock table's lock, which the stop also takes.
                        if self.stopped() {
                            return Err(FsError::NotServing);
                        }
                        match locks.try_lock(l.ino, want) {
                            Ok(()) => Ok(None),
                            Err(_) => Err(FsError::WouldBlock),
                        }
                    }
                }
            };
        if let Some(ino) = orphan {
            self.maybe_destroy(ino, Instant::now());
        }
        out
    }
}

pub(super) fn fail(e: &FsError) -> NsReply {
    NsReply {
        errno: e.errno(),
        detail: e.to_string(),
        ..Default::default()
    }
}

pub(super) fn to_time(t: FsTime) -> Option<shoal_proto::ns::Time> {
    Some(shoal_proto::ns::Time {
        sec: t.sec,
        nsec: t.nsec,
    })
}

pub fn to_attr(i: &Inode) -> Attr {
    Attr {
        ino: i.ino,
        mode: i.mode(),
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        blocks: i.blocks * 8,
        atime: to_time(i.atime),
        mtime: to_time(i.mtime),
        ctime: to_time(i.ctime),
        crtime: to_time(i.crtime),
        rdev: i.rdev,
    }
}

/// The outcome of a change that returns an inode.
pub(super) fn inode(i: &Inode) -> Outcome {
    Outcome::Inode(i.ino)
}

/// The outcome of a change that returns nothing worth recording.
pub(super) fn done<T>(_: &T) -> Outcome {
    Outcome::Done
}

/// Whether `op`, run a second time, could do something the first run did not, or fail
/// where the first succeeded: such a change records its outcome in the volume.
pub(super) fn recorded(op: &Op) -> bool {
    match op {
        Op::Create(_)
        | Op::Link(_)
        | Op::Unlink(_)
        | Op::Rmdir(_)
        | Op::Rename(_)
        | Op::Removexattr(_) => true,
        // Another host may write between the two runs: a second truncate cuts its data.
        Op::Setattr(s) => s.size.is_some(),
        Op::Write(w) => w.append,
        Op::Setxattr(x) => x.flags & libc::XATTR_CREATE != 0,
        _ => false,
    }
}

/// Whether a retried `op` must get its first reply rather than run again.
pub(super) fn mutates(op: &Option<Op>) -> bool {
    !matches!(
        op,
        None | Some(
            Op::Lookup(_)
                | Op::Getattr(_)
                | Op::Readdir(_)
                | Op::Readdirplus(_)
                | Op::Read(_)
                | Op::Statfs(_)
                | Op::Getxattr(_)
                | Op::Listxattr(_)
                | Op::Readlink(_)
        )
    )
}

/// Operations that name their inode by number (the kernel's handle), not by name.
pub(super) fn by_inode(op: &Op) -> bool {
    matches!(
        op,
        Op::Getattr(_)
            | Op::Setattr(_)
            | Op::Open(_)
            | Op::Read(_)
            | Op::Write(_)
            | Op::Readlink(_)
            | Op::Getxattr(_)
            | Op::Setxattr(_)
            | Op::Listxattr(_)
            | Op::Removexattr(_)
            | Op::Fallocate(_)
    )
}
