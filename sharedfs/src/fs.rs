//! The POSIX operations on the on-volume namespace: inodes, directories, file data
//! through extents, symlinks, hard links, xattrs, truncate, fallocate, statfs.
//!
//! Every public operation is one transaction: its B-tree, bitmap and fs-block changes are
//! committed to the journal together, or dropped together when it fails. File data goes
//! straight to its blocks, before the transaction that makes it reachable commits.
//! Permission checks are the kernel's (`default_permissions`); this layer enforces the
//! structure: names, types, emptiness, link counts, sizes. File data (extents, reads,
//! writes, truncation, preallocation) is in `fs/data.rs`, extended attributes in
//! `fs/xattr.rs`.
//!
//! An inode whose last name goes away while a client still has it open is kept with an
//! orphan record; [`Fs::destroy`] frees it when the namespace service sees the last
//! close, and [`Fs::open`] frees leftover orphans after a restart.

use std::ops::Bound;
use std::sync::Arc;

use tracing::debug;

use crate::dev::BlockDev;
use crate::error::{FsError, Result};
use crate::format::alloc::Alloc;
use crate::format::btree::{self, NodeStore, MAX_VALUE};
use crate::format::inode::*;
use crate::format::layout::{Checkpoint, FsBlock, Geometry, BLOCK, BLOCK_U64, FS_BLOCK};
use crate::format::pages::{Page, PageStore};

/// Largest file: 2^44 bytes (16 TiB).
mod data;
mod names;
mod xattr;

pub const MAX_FILE_SIZE: u64 = 1 << 44;
pub const NAME_MAX: usize = 255;
pub const MAX_LINKS: u32 = 65_000;
/// Inode numbers reserved on disk at a time.
const INO_BATCH: u64 = 1024;
/// Symlink targets are stored in chunks of this many bytes.
const LINK_CHUNK: usize = 1024;
/// Extents freed per transaction when a big file shrinks or goes away.
const FREE_BATCH: usize = 128;
/// Largest single data write to the volume.
const IO_CHUNK: u64 = 1 << 20;

/// Who asks: the owner of what they create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
    pub ctime: Option<Time>,
}

/// One readdir result. `cookie` is the entry's stable position in its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub cookie: u64,
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// What rename does when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RenameMode {
    #[default]
    Replace,
    NoReplace,
    Exchange,
}

/// In-service states. Stopped cleanly: the next coordinator starts at once.
pub const STOPPED_CLEAN: u64 = 0;
/// Served (or stopped with locks held): mounts may hold locks and files open that the
/// next coordinator must let them reclaim.
pub const SERVING: u64 = 1;
/// Stopped cleanly with no lock held but with files open on mounts: the next
/// coordinator frees no file until they could say which they have open.
pub const STOPPED_WITH_OPEN_FILES: u64 = 2;

/// The first cookie a directory entry gets; 1 and 2 are "." and "..".
pub const FIRST_COOKIE: u64 = 3;

pub struct Fs {
    pub(crate) store: PageStore,
    pub(crate) alloc: Alloc,
    fsb: FsBlock,
    next_ino: u64,
    meta_hint: u64,
    data_hint: u64,
    /// Inside a transaction: a nested `run` joins it instead of committing.
    in_tx: bool,
}

/// The B-tree's view of the block store and allocator.
pub(crate) struct Nodes<'a> {
    store: &'a mut PageStore,
    alloc: &'a mut Alloc,
    hint: &'a mut u64,
}

impl NodeStore for Nodes<'_> {
    fn node(&mut self, no: u64) -> Result<Page> {
        self.store.read(no)
    }
    fn put_node(&mut self, no: u64, image: Vec<u8>) -> Result<()> {
        self.store.write(no, image)
    }
    fn new_node(&mut self) -> Result<u64> {
        let (b, _) = self.alloc.alloc(self.store, 1, *self.hint)?;
        *self.hint = b + 1;
        Ok(b)
    }
    fn free_node(&mut self, no: u64) -> Result<()> {
        self.alloc.free_meta(self.store, no)
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid(format!(
            "file name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Fs {
    /// Writes an empty namespace (a root directory owned by root, mode 0755) to `dev`.
    pub fn format(dev: Arc<dyn BlockDev>, uuid: [u8; 16]) -> Result<()> {
        let geometry = Geometry::for_size(dev.size())?;
        PageStore::format(
            dev.as_ref(),
            &Checkpoint {
                geometry,
                uuid,
                journal_pos: 0,
                journal_seq: 1,
            },
        )?;
        let mut store = PageStore::open(dev)?;
        Alloc::format(&mut store)?;
        let mut alloc = Alloc::open(&mut store)?;
        let mut hint = geometry.data_start();
        let root = btree::create(&mut Nodes {
            store: &mut store,
            alloc: &mut alloc,
            hint: &mut hint,
        })?;
        let fsb = FsBlock {
            btree_root: root,
            next_ino: ROOT_INO + 1,
            in_service: 0,
            generation: 1,
        };
        store.write(FS_BLOCK, fsb.encode())?;
        let mut fs = Fs {
            store,
            alloc,
            fsb,
            next_ino: ROOT_INO + 1,
            in_tx: false,
            meta_hint: hint,
            data_hint: geometry.data_start(),
        };
        let now = Time::now();
        let root_inode = Inode {
            ino: ROOT_INO,
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            next_cookie: FIRST_COOKIE,
        };
        fs.put_inode(&root_inode)?;
        fs.commit()?;
        fs.store.checkpoint()?;
        fs.store.sync()
    }

    /// Opens the namespace on `dev`: replays the journal, frees leftover orphans.
    pub fn open(dev: Arc<dyn BlockDev>) -> Result<Self> {
        let mut fs = Self::open_keeping_orphans(dev)?;
        for ino in fs.orphans()? {
            debug!(ino, "freeing an orphan left by an earlier run");
            fs.destroy(ino)?;
        }
        Ok(fs)
    }

    /// Opens the namespace on `dev` and replays the journal, leaving the files that were
    /// unlinked while open (`orphans`) alone: a coordinator taking over frees them only
    /// once the mounts that still have them open could say so.
    pub fn open_keeping_orphans(dev: Arc<dyn BlockDev>) -> Result<Self> {
        let mut store = PageStore::open(dev)?;
        let alloc = Alloc::open(&mut store)?;
        let fsb = store.with(FS_BLOCK, FsBlock::decode)??;
        let g = store.checkpoint.geometry;
        let mut fs = Fs {
            store,
            alloc,
            next_ino: fsb.next_ino,
            in_tx: false,
            fsb,
            meta_hint: g.data_start(),
            data_hint: g.data_start() + (g.blocks - g.data_start()) / 64,
        };
        fs.finish_trims()?;
        Ok(fs)
    }

    pub fn geometry(&self) -> Geometry {
        self.store.checkpoint.geometry
    }

    // ---- transactions ------------------------------------------------------------

    fn commit(&mut self) -> Result<()> {
        match self.store.commit() {
            Ok(()) => {
                self.alloc.committed(self.store.checkpoints);
                Ok(())
            }
            Err(e) => {
                self.rollback()?;
                Err(e)
            }
        }
    }

    fn rollback(&mut self) -> Result<()> {
        self.store.abort();
        self.alloc.aborted(&mut self.store)?;
        self.fsb = self.store.with(FS_BLOCK, FsBlock::decode)??;
        Ok(())
    }

    /// Runs `f` as one transaction. Nested in another, it is part of that one (an error
    /// must reach the outer `run`, which rolls everything back).
    pub(crate) fn run<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.in_tx {
            return f(self);
        }
        self.in_tx = true;
        let r = f(self);
        self.in_tx = false;
        match r {
            Ok(v) => {
                self.commit()?;
                Ok(v)
            }
            Err(e) => {
                self.rollback()?;
                Err(e)
            }
        }
    }

    /// Records what a successor must wait for before it frees or grants anything (see
    /// `FsBlock::in_service`: [`STOPPED_CLEAN`], [`SERVING`], [`STOPPED_WITH_OPEN_FILES`]);
    /// returns what was recorded before.
    pub fn set_in_service(&mut self, state: u64) -> Result<u64> {
        self.run(|fs| {
            let was = fs.fsb.in_service;
            if was != state {
                fs.fsb.in_service = state;
                fs.write_fsb()?;
            }
            Ok(was)
        })
    }

    /// Makes every committed change durable on every in-sync replica (fsync).
    pub fn sync(&mut self) -> Result<()> {
        self.store.sync()
    }

    // ---- the B-tree --------------------------------------------------------------

    pub(crate) fn nodes(&mut self) -> (Nodes<'_>, u64) {
        (
            Nodes {
                store: &mut self.store,
                alloc: &mut self.alloc,
                hint: &mut self.meta_hint,
            },
            self.fsb.btree_root,
        )
    }

    fn set_root(&mut self, root: u64) -> Result<()> {
        if root != self.fsb.btree_root {
            self.fsb.btree_root = root;
            self.write_fsb()?;
        }
        Ok(())
    }

    fn write_fsb(&mut self) -> Result<()> {
        self.fsb.generation += 1;
        self.store.write(FS_BLOCK, self.fsb.encode())
    }

    pub(crate) fn bt_get(&mut self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        let (mut n, root) = self.nodes();
        btree::get(&mut n, root, k)
    }

    pub(crate) fn bt_put(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        let (mut n, mut root) = self.nodes();
        btree::put(&mut n, &mut root, k, v)?;
        self.set_root(root)
    }

    pub(crate) fn bt_del(&mut self, k: &[u8]) -> Result<bool> {
        let (mut n, mut root) = self.nodes();
        let found = btree::delete(&mut n, &mut root, k)?;
        self.set_root(root)?;
        Ok(found)
    }

    pub(crate) fn bt_range(
        &mut self,
        from: &[u8],
        to: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (mut n, root) = self.nodes();
        btree::range(&mut n, root, from, to, limit)
    }

    fn bt_floor(&mut self, k: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let (mut n, root) = self.nodes();
        btree::floor(&mut n, root, k)
    }

    // ---- inodes ------------------------------------------------------------------

    pub fn getattr(&mut self, ino: u64) -> Result<Inode> {
        let v = self.bt_get(&inode_key(ino))?.ok_or(FsError::NotFound)?;
        Inode::decode(ino, &v)
    }

    pub(crate) fn put_inode(&mut self, i: &Inode) -> Result<()> {
        self.bt_put(&inode_key(i.ino), &i.encode())
    }

    fn dir(&mut self, ino: u64) -> Result<Inode> {
        let d = self.getattr(ino)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(d)
    }

    fn new_ino(&mut self) -> Result<u64> {
        if self.next_ino >= self.fsb.next_ino {
            self.fsb.next_ino = self.next_ino + INO_BATCH;
            self.write_fsb()?;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        Ok(i)
    }

    pub fn setattr(&mut self, ino: u64, set: &SetAttr) -> Result<Inode> {
        self.run(|fs| {
            let mut i = fs.getattr(ino)?;
            let now = Time::now();
            if let Some(size) = set.size {
                if i.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                if i.kind != Kind::File {
                    return Err(FsError::Invalid("truncate of a special file".into()));
                }
                if size > MAX_FILE_SIZE {
                    return Err(FsError::TooBig);
                }
                fs.truncate(&mut i, size)?;
                i.mtime = now;
            }
            if let Some(p) = set.perm {
                i.perm = p & 0o7777;
            }
            if let Some(u) = set.uid {
                i.uid = u;
            }
            if let Some(g) = set.gid {
                i.gid = g;
            }
            if let Some(t) = set.atime {
                i.atime = t;
            }
            if let Some(t) = set.mtime {
                i.mtime = t;
            }
            i.ctime = set.ctime.unwrap_or(now);
            fs.put_inode(&i)?;
            Ok(i)
        })
    }

    // ---- space and lifetime ------------------------------------------------------

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: self.alloc.total_blocks(),
            free: self.alloc.free_blocks(),
            block_size: BLOCK as u32,
            name_max: NAME_MAX as u32,
        }
    }

    /// Inodes unlinked while open, waiting for their last close.
    pub fn orphans(&mut self) -> Result<Vec<u64>> {
        Ok(self
            .bt_range(&orphan_key(0), Bound::Excluded(&[b'O' + 1]), usize::MAX)?
            .into_iter()
            .map(|(k, _)| ino_of(&k))
            .collect())
    }

    /// Frees several orphans in one transaction (one journal write instead of one each:
    /// an `rm -rf` frees thousands). Inodes that still have links are left alone.
    pub fn destroy_many(&mut self, inos: &[u64]) -> Result<()> {
        let mut gone: Vec<(u64, Option<Inode>)> = Vec::with_capacity(inos.len());
        for ino in inos {
            match self.getattr(*ino) {
                Ok(i) if i.nlink == 0 => gone.push((*ino, Some(i))),
                Ok(_) => {}
                Err(FsError::NotFound) => gone.push((*ino, None)),
                Err(e) => return Err(e),
            }
        }
        let r = self.run(|fs| {
            for (ino, i) in &gone {
                if let Some(i) = i {
                    let mut i = i.clone();
                    i.size = 0;
                    fs.trim_beyond(&mut i)?;
                    fs.free_inode_records(*ino)?;
                }
                fs.bt_del(&orphan_key(*ino))?;
            }
            Ok(())
        });
        if r.is_err() && gone.len() > 1 {
            // Too much for one transaction (the journal's limit): one at a time.
            for (ino, _) in &gone {
                self.destroy(*ino)?;
            }
            return Ok(());
        }
        r
    }

    /// Frees an orphan: its data, xattrs and inode.
    pub fn destroy(&mut self, ino: u64) -> Result<()> {
        let mut i = match self.getattr(ino) {
            Ok(i) => i,
            Err(FsError::NotFound) => {
                return self.run(|fs| fs.bt_del(&orphan_key(ino)).map(|_| ()));
            }
            Err(e) => return Err(e),
        };
        if i.nlink > 0 {
            return Err(FsError::Invalid(format!("inode {ino} still has links")));
        }
        self.run(|fs| {
            i.size = 0;
            fs.trim_beyond(&mut i)?;
            fs.free_inode_records(ino)?;
            fs.bt_del(&orphan_key(ino))?;
            Ok(())
        })
    }

    /// Deletes an inode's records (its data must be freed already, or it has none).
    fn free_inode_records(&mut self, ino: u64) -> Result<()> {
        self.bt_del(&parent_key(ino))?;
        for tag in [b'X', b'L', b'E'] {
            loop {
                let rows = self.bt_range(
                    &[&[tag][..], &ino.to_be_bytes()].concat(),
                    Bound::Excluded(&after(tag, ino)),
                    FREE_BATCH,
                )?;
                if rows.is_empty() {
                    break;
                }
                for (k, v) in rows {
                    if tag == b'E' {
                        let (phys, n) = parse_extent(&v)?;
                        self.alloc.free_data(&mut self.store, phys, n)?;
                    }
                    self.bt_del(&k)?;
                }
            }
        }
        self.bt_del(&inode_key(ino))?;
        Ok(())
    }
}
