//! The raw device of an attached volume: a tiny FUSE filesystem with one file, `disk`.
//!
//! The file is the volume, byte for byte, the way a block device would be: reads,
//! writes, fsync and hole punching go straight to the coordinator's [`VolumeIo`]. It is
//! opened with direct I/O so the kernel keeps no page cache of it: the node is the one
//! place that decides what the bytes are, and a loop device on top adds its own cache.
//!
//! `flush` (sent on every close) is deliberately not implemented: the kernel then stops
//! sending it, so closing the device never waits for the node.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tracing::warn;

use crate::volume_io::VolumeIo;

/// Name of the one file in the device filesystem.
pub const DEVICE_FILE: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
/// Attributes never change while mounted (the size is fixed), so cache them long.
const TTL: Duration = Duration::from_secs(3600);
/// Largest single FUSE read or write: big I/O stays big.
pub const MAX_IO: u32 = 1 << 20;

/// See the module doc.
pub struct DeviceFs {
    io: Arc<VolumeIo>,
    created: SystemTime,
}

impl DeviceFs {
    pub fn new(io: Arc<VolumeIo>) -> Self {
        Self {
            io,
            created: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == DISK_INO {
            (FileType::RegularFile, 0o600, self.io.size(), 1)
        } else {
            (FileType::Directory, 0o755, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

fn errno(e: &crate::error::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Best effort: the kernel caps these at what it supports.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // The loop device submits direct I/O asynchronously; without this the kernel
        // turns each of its requests into a synchronous one, and a volume has one write
        // in flight at a time.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        // Let the kernel queue as many requests as there are session threads to take them.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DEVICE_FILE {
            reply.entry(&TTL, &self.attr(DISK_INO), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A device has a fixed size. open(O_TRUNC) arrives as a resize to 0 and is
        // ignored, as a block device ignores it; any other resize is refused.
        if size.is_some_and(|s| s != 0 && s != self.io.size()) {
            reply.error(Errno::EINVAL);
            return;
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = self.io.size();
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let len = (size as u64).min(end - offset) as u32;
        match self.io.read(offset, len) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                warn!(offset, len, error = %e, "device read failed");
                reply.error(errno(&e));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let end = self.io.size();
        if offset >= end {
            // Nothing fits past the end; an empty write there is still a no-op.
            if data.is_empty() {
                reply.written(0);
            } else {
                reply.error(Errno::ENOSPC);
            }
            return;
        }
        let len = (data.len() as u64).min(end - offset) as usize;
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.io.write(offset, &data[..len], fua) {
            Ok(()) => reply.written(len as u32),
            Err(e) => {
                warn!(offset, len, error = %e, "device write failed");
                reply.error(errno(&e));
            }
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.io.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                warn!(error = %e, "device fsync failed");
                reply.error(errno(&e));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let end = self.io.size();
        if offset >= end {
            reply.error(Errno::EINVAL);
            return;
        }
        let length = length.min(end - offset);
        let res = if mode == punch {
            self.io.discard(offset, length)
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Space is taken on first write (thin provisioning); nothing to reserve.
            Ok(())
        } else {
            reply.error(Errno::EOPNOTSUPP);
            return;
        };
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DEVICE_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.io.size() / 4096;
        reply.statfs(blocks, 0, 0, 1, 0, 4096, 255, 4096);
    }
}
