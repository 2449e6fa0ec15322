//! Directories and names of the namespace: entries, lookup, create, links, unlink,
//! rmdir, rename (with its cycle check) and readdir.

use super::*;

impl Fs {
    pub(super) fn entry(&mut self, dir: u64, name: &[u8]) -> Result<Option<(u64, Kind, u64)>> {
        match self.bt_get(&dirent_key(dir, name))? {
            Some(v) => Ok(Some(parse_dirent(&v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn add_entry(
        &mut self,
        dir: &mut Inode,
        name: &[u8],
        child: u64,
        kind: Kind,
    ) -> Result<()> {
        let cookie = dir.next_cookie.max(FIRST_COOKIE);
        dir.next_cookie = cookie + 1;
        self.bt_put(
            &dirent_key(dir.ino, name),
            &dirent_value(child, kind, cookie),
        )?;
        self.bt_put(
            &cookie_key(dir.ino, cookie),
            &cookie_value(child, kind, name),
        )?;
        dir.size += 1;
        Ok(())
    }

    pub(super) fn remove_entry(&mut self, dir: &mut Inode, name: &[u8]) -> Result<()> {
        let (_, _, cookie) = self.entry(dir.ino, name)?.ok_or(FsError::NotFound)?;
        self.bt_del(&dirent_key(dir.ino, name))?;
        self.bt_del(&cookie_key(dir.ino, cookie))?;
        dir.size = dir.size.saturating_sub(1);
        Ok(())
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Inode> {
        self.dir(parent)?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let (child, _, _) = self.entry(parent, name)?.ok_or(FsError::NotFound)?;
        self.getattr(child)
    }

    /// Creates a file, directory, device, fifo or socket (`mode` carries the type bits),
    /// or a symlink to `target`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        cred: Cred,
        target: Option<&[u8]>,
    ) -> Result<Inode> {
        self.run(|fs| fs.create_tx(parent, name, mode, rdev, cred, target))
    }

    pub(super) fn create_tx(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        cred: Cred,
        target: Option<&[u8]>,
    ) -> Result<Inode> {
        check_name(name)?;
        let mut dir = self.dir(parent)?;
        if self.entry(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let kind = if target.is_some() {
            Kind::Symlink
        } else {
            Kind::from_mode(mode)?
        };
        let mut perm = if kind == Kind::Symlink {
            0o777
        } else {
            mode & 0o7777
        };
        // BSD group semantics under a setgid directory, as ext4 does.
        let gid = if dir.perm & libc::S_ISGID != 0 {
            if kind == Kind::Dir {
                perm |= libc::S_ISGID;
            }
            dir.gid
        } else {
            cred.gid
        };
        if kind == Kind::Dir && dir.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        let now = Time::now();
        let mut inode = Inode {
            ino: self.new_ino()?,
            kind,
            perm,
            uid: cred.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: if matches!(kind, Kind::CharDev | Kind::BlockDev) {
                rdev
            } else {
                0
            },
            next_cookie: FIRST_COOKIE,
        };
        if let Some(t) = target {
            if t.is_empty() || t.len() >= libc::PATH_MAX as usize {
                return Err(if t.is_empty() {
                    FsError::NotFound
                } else {
                    FsError::NameTooLong
                });
            }
            for (i, chunk) in t.chunks(LINK_CHUNK).enumerate() {
                self.bt_put(&link_key(inode.ino, i as u32), chunk)?;
            }
            inode.size = t.len() as u64;
        }
        self.put_inode(&inode)?;
        self.add_entry(&mut dir, name, inode.ino, kind)?;
        if kind == Kind::Dir {
            dir.nlink += 1;
            self.bt_put(&parent_key(inode.ino), &parent.to_le_bytes())?;
        }
        dir.mtime = now;
        dir.ctime = now;
        self.put_inode(&dir)?;
        Ok(inode)
    }

    pub fn readlink(&mut self, ino: u64) -> Result<Vec<u8>> {
        let i = self.getattr(ino)?;
        if i.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symbolic link".into()));
        }
        let chunks = self.bt_range(
            &link_key(ino, 0),
            Bound::Excluded(&after(b'L', ino)),
            usize::MAX,
        )?;
        Ok(chunks.into_iter().flat_map(|(_, v)| v).collect())
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &[u8]) -> Result<Inode> {
        self.run(|fs| {
            check_name(name)?;
            let mut inode = fs.getattr(ino)?;
            if inode.kind == Kind::Dir {
                return Err(FsError::Perm);
            }
            if inode.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            let mut dir = fs.dir(parent)?;
            if fs.entry(parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            let now = Time::now();
            fs.add_entry(&mut dir, name, ino, inode.kind)?;
            dir.mtime = now;
            dir.ctime = now;
            fs.put_inode(&dir)?;
            if inode.nlink == 0 {
                // Linked back from an open, unlinked state (linkat with AT_EMPTY_PATH).
                fs.bt_del(&orphan_key(ino))?;
            }
            inode.nlink += 1;
            inode.ctime = now;
            fs.put_inode(&inode)?;
            Ok(inode)
        })
    }

    /// Drops one link of `inode`; at zero it becomes an orphan. Returns the inode
    /// number when it did.
    pub(super) fn drop_link(&mut self, inode: &mut Inode, now: Time) -> Result<Option<u64>> {
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = now;
        self.put_inode(inode)?;
        if inode.nlink == 0 {
            self.bt_put(&orphan_key(inode.ino), &[])?;
            return Ok(Some(inode.ino));
        }
        Ok(None)
    }

    /// Removes a non-directory name. Returns the inode number if that was its last
    /// link: the caller frees it with [`Fs::destroy`] once nobody has it open.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        self.run(|fs| {
            let mut dir = fs.dir(parent)?;
            let (child, kind, _) = fs.entry(parent, name)?.ok_or(FsError::NotFound)?;
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let now = Time::now();
            fs.remove_entry(&mut dir, name)?;
            dir.mtime = now;
            dir.ctime = now;
            fs.put_inode(&dir)?;
            let mut inode = fs.getattr(child)?;
            fs.drop_link(&mut inode, now)
        })
    }

    pub(super) fn is_empty_dir(&mut self, ino: u64) -> Result<bool> {
        Ok(self
            .bt_range(&dirent_key(ino, &[]), Bound::Excluded(&after(b'D', ino)), 1)?
            .is_empty())
    }

    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> Result<()> {
        self.run(|fs| {
            if name == b"." {
                return Err(FsError::Invalid("rmdir of \".\"".into()));
            }
            if name == b".." {
                return Err(FsError::NotEmpty);
            }
            let mut dir = fs.dir(parent)?;
            let (child, kind, _) = fs.entry(parent, name)?.ok_or(FsError::NotFound)?;
            if kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if !fs.is_empty_dir(child)? {
                return Err(FsError::NotEmpty);
            }
            let now = Time::now();
            fs.remove_entry(&mut dir, name)?;
            dir.nlink = dir.nlink.saturating_sub(1);
            dir.mtime = now;
            dir.ctime = now;
            fs.put_inode(&dir)?;
            fs.free_inode_records(child)?;
            Ok(())
        })
    }

    /// Renames; returns the inode number of a replaced target that lost its last link.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<Option<u64>> {
        self.run(|fs| fs.rename_tx(parent, name, new_parent, new_name, mode))
    }

    pub(super) fn rename_tx(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<Option<u64>> {
        check_name(name)?;
        check_name(new_name)?;
        self.dir(parent)?;
        self.dir(new_parent)?;
        let (src, src_kind, _) = self.entry(parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.entry(new_parent, new_name)?;
        if src_kind == Kind::Dir && self.is_ancestor(src, new_parent)? {
            return Err(FsError::Invalid(
                "cannot move a directory into itself".into(),
            ));
        }
        let now = Time::now();
        if mode == RenameMode::Exchange {
            let (dst_ino, dst_kind, _) = dst.ok_or(FsError::NotFound)?;
            if dst_kind == Kind::Dir && self.is_ancestor(dst_ino, parent)? {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            // Point each name at the other inode, keeping the names' cookies.
            self.repoint(parent, name, dst_ino, dst_kind)?;
            self.repoint(new_parent, new_name, src, src_kind)?;
            if dst_kind == Kind::Dir {
                self.bt_put(&parent_key(dst_ino), &parent.to_le_bytes())?;
            }
            if src_kind == Kind::Dir {
                self.bt_put(&parent_key(src), &new_parent.to_le_bytes())?;
            }
            if parent != new_parent && (src_kind == Kind::Dir) != (dst_kind == Kind::Dir) {
                let (from, to) = if src_kind == Kind::Dir {
                    (parent, new_parent)
                } else {
                    (new_parent, parent)
                };
                let mut f = self.getattr(from)?;
                f.nlink -= 1;
                self.put_inode(&f)?;
                let mut t = self.getattr(to)?;
                t.nlink += 1;
                self.put_inode(&t)?;
            }
            for ino in [parent, new_parent, src, dst_ino] {
                let mut i = self.getattr(ino)?;
                i.ctime = now;
                if ino == parent || ino == new_parent {
                    i.mtime = now;
                }
                self.put_inode(&i)?;
            }
            return Ok(None);
        }
        let mut orphan = None;
        if let Some((dst_ino, dst_kind, _)) = dst {
            if dst_ino == src {
                // Two names of one inode: POSIX says do nothing.
                return Ok(None);
            }
            if mode == RenameMode::NoReplace {
                return Err(FsError::Exists);
            }
            match (src_kind == Kind::Dir, dst_kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    if !self.is_empty_dir(dst_ino)? {
                        return Err(FsError::NotEmpty);
                    }
                    let mut np = self.getattr(new_parent)?;
                    self.remove_entry(&mut np, new_name)?;
                    np.nlink -= 1;
                    self.put_inode(&np)?;
                    self.free_inode_records(dst_ino)?;
                }
                (false, false) => {
                    let mut np = self.getattr(new_parent)?;
                    self.remove_entry(&mut np, new_name)?;
                    self.put_inode(&np)?;
                    let mut d = self.getattr(dst_ino)?;
                    orphan = self.drop_link(&mut d, now)?;
                }
            }
        }
        let mut p = self.getattr(parent)?;
        self.remove_entry(&mut p, name)?;
        if src_kind == Kind::Dir && parent != new_parent {
            p.nlink -= 1;
        }
        p.mtime = now;
        p.ctime = now;
        self.put_inode(&p)?;
        let mut np = self.getattr(new_parent)?;
        self.add_entry(&mut np, new_name, src, src_kind)?;
        if src_kind == Kind::Dir && parent != new_parent {
            np.nlink += 1;
        }
        np.mtime = now;
        np.ctime = now;
        self.put_inode(&np)?;
        if src_kind == Kind::Dir {
            self.bt_put(&parent_key(src), &new_parent.to_le_bytes())?;
        }
        let mut s = self.getattr(src)?;
        s.ctime = now;
        self.put_inode(&s)?;
        Ok(orphan)
    }

    pub(super) fn repoint(&mut self, dir: u64, name: &[u8], child: u64, kind: Kind) -> Result<()> {
        let (_, _, cookie) = self.entry(dir, name)?.ok_or(FsError::NotFound)?;
        self.bt_put(&dirent_key(dir, name), &dirent_value(child, kind, cookie))?;
        self.bt_put(&cookie_key(dir, cookie), &cookie_value(child, kind, name))
    }

    /// Whether `b` is directory `a` or lies inside it: walks up from `b` through the
    /// parent records, so it costs the depth of `b`, not the size of `a`.
    pub(super) fn is_ancestor(&mut self, a: u64, b: u64) -> Result<bool> {
        let mut at = b;
        for _ in 0..100_000 {
            if at == a {
                return Ok(true);
            }
            if at == ROOT_INO {
                return Ok(false);
            }
            at = match self.bt_get(&parent_key(at))? {
                Some(v) if v.len() == 8 => u64::from_le_bytes(v[..8].try_into().unwrap()),
                _ => {
                    return Err(FsError::Corrupt(format!(
                        "directory {at} has no parent record"
                    )))
                }
            };
        }
        Err(FsError::Corrupt("directory parent chain loops".into()))
    }

    /// The parent of directory `dir`.
    pub fn parent_of(&mut self, dir: u64) -> Result<u64> {
        if dir == ROOT_INO {
            return Ok(ROOT_INO);
        }
        match self.bt_get(&parent_key(dir))? {
            Some(v) if v.len() == 8 => Ok(u64::from_le_bytes(v[..8].try_into().unwrap())),
            _ => Err(FsError::NotFound),
        }
    }

    /// Entries of `dir` from position `cookie` on, at most `limit`.
    pub fn readdir(&mut self, dir: u64, cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        self.dir(dir)?;
        let rows = self.bt_range(
            &cookie_key(dir, cookie.max(FIRST_COOKIE)),
            Bound::Excluded(&after(b'C', dir)),
            limit,
        )?;
        rows.into_iter()
            .map(|(k, v)| {
                let (ino, kind, name) = parse_cookie_value(&v)?;
                Ok(DirEntry {
                    cookie: u64::from_be_bytes(k[9..17].try_into().unwrap()),
                    ino,
                    kind,
                    name,
                })
            })
            .collect()
    }

    // ---- attributes --------------------------------------------------------------
}
