//! The FUSE adapter of a mount: every kernel request decoded, sent through the mount's
//! [`Client`] and answered.

use super::*;

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
        let lk = Lk {
            ino: ino.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
            wait: false,
            fh: fh.0,
            reclaim: false,
        };
        match self.get_lock(req, lk) {
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
        match self.set_lock(req, lk) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let now = std::time::Instant::now();
        let known = self.cached_entry(parent.0, name.as_bytes(), now);
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
                self.cached_entry(parent.0, name.as_bytes(), std::time::Instant::now())
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
