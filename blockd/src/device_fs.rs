//! The raw device of an attached volume: a tiny FUSE filesystem with one file, `disk`.
//!
//! The file is the volume, byte for byte, the way a block device would be: reads,
//! writes, fsync and hole punching go straight to the coordinator's [`VolumeIo`]. It is
//! opened with direct I/O so the kernel keeps no page cache of it: the node is the one
//! place that decides what the bytes are, and a loop device on top adds its own cache.
//!
//! fuser mounts it and answers the kernel's INIT ([`DeviceFs`]); the requests after that
//! are read by this module's own threads ([`DeviceSession`]), one cloned `/dev/fuse`
//! descriptor each. The reason is the write path: fuser lends a request's bytes only for
//! the length of the call, so a write had to be copied before it could go to the other
//! replicas, and that copy was the last one in user space (5 % of all CPU in a repl-2
//! stream). Here each thread reads into a buffer it owns, and a large write's buffer is
//! handed on whole, as [`Bytes`], to the local replica and to HTTP/2.
//!
//! `flush` (sent on every close) is deliberately not implemented: the kernel then stops
//! sending it, so closing the device never waits for the node.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{Filesystem, KernelConfig, Request};
use tracing::warn;

use crate::volume_io::VolumeIo;

/// Name of the one file in the device filesystem.
pub const DEVICE_FILE: &str = "disk";
const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
/// Attributes never change while mounted (the size is fixed), so cache them long.
const TTL: Duration = Duration::from_secs(3600);
/// Largest single FUSE read or write: big I/O stays big.
pub const MAX_IO: u32 = 1 << 20;
/// A read buffer holds the largest write and its headers.
const BUF_SIZE: usize = MAX_IO as usize + 4096;
/// Writes at least this big keep the buffer they were read into; smaller ones are copied
/// and the buffer is read into again.
const OWNED_WRITE: usize = 64 << 10;

/// Answers the kernel's INIT; fuser calls nothing else on it (see the module doc).
pub struct DeviceFs;

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
}

/// A mounted device filesystem and the threads serving it.
pub struct DeviceSession {
    session: Option<fuser::Session<DeviceFs>>,
    threads: Vec<JoinHandle<()>>,
}

impl DeviceSession {
    /// Mounts the device filesystem of `io` at `dir` and serves it with `threads` threads.
    pub fn mount(
        io: Arc<VolumeIo>,
        dir: &Path,
        config: &fuser::Config,
        threads: usize,
    ) -> io::Result<Self> {
        let session = fuser::Session::new(DeviceFs, dir, config)?;
        let dev = Arc::new(Device {
            io,
            created: SystemTime::now(),
        });
        let mut out = Self {
            session: None,
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads.max(1) {
            let fd = if i == 0 {
                session.as_fd().try_clone_to_owned()?
            } else {
                clone_dev(session.as_fd())?
            };
            let dev = dev.clone();
            out.threads.push(
                std::thread::Builder::new()
                    .name(format!("shoal-dev-{i}"))
                    .spawn(move || serve(&fd, &dev))?,
            );
        }
        out.session = Some(session);
        Ok(out)
    }

    /// Unmounts and waits for the threads. If the unmount fails (the device is busy), the
    /// threads are left to end when the kernel lets the mount go.
    pub fn umount_and_join(mut self) -> io::Result<()> {
        if let Some(mut s) = self.session.take() {
            s.unmount()?;
            drop(s);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(())
    }
}

/// A new `/dev/fuse` descriptor attached to the same connection (`FUSE_DEV_IOC_CLONE`):
/// each thread then has its own queue of requests being processed.
fn clone_dev(session: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    /// `_IOR(229, 0, uint32_t)`
    const FUSE_DEV_IOC_CLONE: u64 = 0x8004_e500;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut src = session.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 from a live local.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &mut src) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.into())
}

/// One thread's loop: read a request, answer it, until the connection ends.
fn serve(fd: &OwnedFd, dev: &Device) {
    let mut buf: Vec<u8> = Vec::with_capacity(BUF_SIZE);
    loop {
        buf.clear();
        // SAFETY: the kernel writes at most `capacity` bytes into the spare capacity,
        // and exactly `n` of them are then marked initialised.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.capacity()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Interrupted before it was read, or a signal: read again.
                Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
                // Unmounted.
                Some(libc::ENODEV) => return,
                e => {
                    warn!(errno = ?e, "device read failed; thread ends");
                    return;
                }
            }
        }
        // SAFETY: see above.
        unsafe { buf.set_len(n as usize) };
        let Some(h) = Header::parse(&buf) else {
            warn!(len = n, "short FUSE request; thread ends");
            return;
        };
        let out = Out {
            fd,
            unique: h.unique,
        };
        match h.opcode {
            op::WRITE if buf.len() >= ARGS + 40 + OWNED_WRITE => {
                let owned = std::mem::replace(&mut buf, Vec::with_capacity(BUF_SIZE));
                dev.write(&out, Payload::Owned(Bytes::from(owned)));
            }
            op::WRITE => dev.write(&out, Payload::Borrowed(&buf)),
            op::DESTROY => {
                out.ok(&[]);
                return;
            }
            _ => dev.dispatch(&out, &h, &buf),
        }
    }
}

/// Size of `fuse_in_header`; the operation's arguments follow it.
const ARGS: usize = 40;

/// FUSE opcodes this filesystem knows.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// The fields of `fuse_in_header` we use.
struct Header {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= ARGS).then(|| Self {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// Where a request's answer goes.
struct Out<'a> {
    fd: &'a OwnedFd,
    unique: u64,
}

impl Out<'_> {
    fn send(&self, error: i32, parts: &[&[u8]]) {
        let len = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&(len as u32).to_le_bytes());
        head[4..8].copy_from_slice(&(-error).to_le_bytes());
        head[8..].copy_from_slice(&self.unique.to_le_bytes());
        let mut iov = vec![io::IoSlice::new(&head)];
        iov.extend(parts.iter().map(|p| io::IoSlice::new(p)));
        // ENOENT: the request was interrupted and is gone; nothing to do.
        if let Err(e) = nix::sys::uio::writev(self.fd, &iov) {
            if e != nix::errno::Errno::ENOENT {
                warn!(error = %e, "FUSE reply failed");
            }
        }
    }

    fn ok(&self, parts: &[&[u8]]) {
        self.send(0, parts)
    }

    fn error(&self, errno: i32) {
        self.send(errno, &[])
    }
}

/// A write's bytes: the whole request buffer (headers included), owned or lent.
enum Payload<'a> {
    Owned(Bytes),
    Borrowed(&'a [u8]),
}

/// Little-endian field writer for the kernel's reply structs.
#[derive(Default)]
struct Le(Vec<u8>);

impl Le {
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// What the serving threads share.
struct Device {
    io: Arc<VolumeIo>,
    created: SystemTime,
}

impl Device {
    /// `fuse_attr` of the root directory or the disk file.
    fn attr(&self, ino: u64) -> Le {
        let t = self.created.duration_since(UNIX_EPOCH).unwrap_or_default();
        attr(ino, self.io.size(), t)
    }

    /// `fuse_attr_out`.
    fn attr_out(&self, out: &Out<'_>, ino: u64) {
        let a = Le::default().u64(TTL.as_secs()).u32(0).u32(0).0;
        out.ok(&[&a, &self.attr(ino).0]);
    }

    fn dispatch(&self, out: &Out<'_>, h: &Header, b: &[u8]) {
        let known = h.nodeid == ROOT_INO || h.nodeid == DISK_INO;
        match h.opcode {
            // No answer is expected to these.
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT | op::NOTIFY_REPLY => {}
            op::LOOKUP => {
                let name = b[ARGS..].split(|&c| c == 0).next().unwrap_or_default();
                if h.nodeid == ROOT_INO && name == DEVICE_FILE.as_bytes() {
                    // fuse_entry_out: nodeid, generation, entry and attr validity.
                    let e = Le::default()
                        .u64(DISK_INO)
                        .u64(0)
                        .u64(TTL.as_secs())
                        .u64(TTL.as_secs())
                        .u32(0)
                        .u32(0)
                        .0;
                    out.ok(&[&e, &self.attr(DISK_INO).0]);
                } else {
                    out.error(libc::ENOENT);
                }
            }
            op::GETATTR if known => self.attr_out(out, h.nodeid),
            op::SETATTR if known => {
                // A device has a fixed size. open(O_TRUNC) arrives as a resize to 0 and
                // is ignored, as a block device ignores it; any other resize is refused.
                const FATTR_SIZE: u32 = 1 << 3;
                let size = u64_at(b, ARGS + 16);
                if u32_at(b, ARGS) & FATTR_SIZE != 0 && size != 0 && size != self.io.size() {
                    out.error(libc::EINVAL);
                } else {
                    self.attr_out(out, h.nodeid);
                }
            }
            op::OPEN if h.nodeid == DISK_INO => {
                const FOPEN_DIRECT_IO: u32 = 1;
                out.ok(&[&Le::default().u64(0).u32(FOPEN_DIRECT_IO).u32(0).0]);
            }
            op::OPEN => out.error(libc::EISDIR),
            op::OPENDIR if h.nodeid == ROOT_INO => out.ok(&[&Le::default().u64(0).u64(0).0]),
            op::OPENDIR => out.error(libc::ENOTDIR),
            op::RELEASE | op::RELEASEDIR => out.ok(&[]),
            op::READ if h.nodeid == DISK_INO => self.read(out, b),
            op::READDIR if h.nodeid == ROOT_INO => readdir(out, b),
            op::FSYNC => match self.io.flush() {
                Ok(()) => out.ok(&[]),
                Err(e) => {
                    warn!(error = %e, "device fsync failed");
                    out.error(e.errno());
                }
            },
            op::FALLOCATE if h.nodeid == DISK_INO => self.fallocate(out, b),
            op::STATFS => {
                // fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen,
                // frsize, padding, spare[6].
                let mut s = Le::default()
                    .u64(self.io.size() / 4096)
                    .u64(0)
                    .u64(0)
                    .u64(1)
                    .u64(0)
                    .u32(4096)
                    .u32(255)
                    .u32(4096)
                    .u32(0);
                for _ in 0..6 {
                    s = s.u32(0);
                }
                out.ok(&[&s.0]);
            }
            op::GETATTR | op::SETATTR | op::READ | op::READDIR | op::FALLOCATE => {
                out.error(libc::ENOENT)
            }
            _ => out.error(libc::ENOSYS),
        }
    }

    fn read(&self, out: &Out<'_>, b: &[u8]) {
        // fuse_read_in: fh, offset, size, ...
        let (offset, size) = (u64_at(b, ARGS + 8), u32_at(b, ARGS + 16));
        let end = self.io.size();
        if offset >= end {
            out.ok(&[]);
            return;
        }
        let len = (size as u64).min(end - offset) as u32;
        match self.io.read(offset, len) {
            Ok(data) => out.ok(&[&data]),
            Err(e) => {
                warn!(offset, len, error = %e, "device read failed");
                out.error(e.errno());
            }
        }
    }

    fn write(&self, out: &Out<'_>, p: Payload<'_>) {
        let b: &[u8] = match &p {
            Payload::Owned(b) => b,
            Payload::Borrowed(b) => b,
        };
        // fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding.
        let (offset, size, flags) = (
            u64_at(b, ARGS + 8),
            u32_at(b, ARGS + 16),
            u32_at(b, ARGS + 32),
        );
        let start = ARGS + 40;
        if b.len() < start + size as usize {
            out.error(libc::EINVAL);
            return;
        }
        let end = self.io.size();
        if offset >= end && size > 0 {
            out.error(libc::ENOSPC);
            return;
        }
        let len = (size as u64).min(end - offset) as usize;
        let fua = flags as i32 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let res = match p {
            Payload::Owned(b) => self
                .io
                .write_owned(offset, b.slice(start..start + len), fua),
            Payload::Borrowed(b) => self.io.write(offset, &b[start..start + len], fua),
        };
        match res {
            Ok(()) => out.ok(&[&Le::default().u32(len as u32).u32(0).0]),
            Err(e) => {
                warn!(offset, len, error = %e, "device write failed");
                out.error(e.errno());
            }
        }
    }

    fn fallocate(&self, out: &Out<'_>, b: &[u8]) {
        // fuse_fallocate_in: fh, offset, length, mode.
        let (offset, length, mode) = (
            u64_at(b, ARGS + 8),
            u64_at(b, ARGS + 16),
            u32_at(b, ARGS + 24),
        );
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let end = self.io.size();
        if offset >= end {
            out.error(libc::EINVAL);
            return;
        }
        let length = length.min(end - offset);
        let res = match mode as i32 {
            m if m == punch => self.io.discard(offset, length),
            // Space is taken on first write (thin provisioning); nothing to reserve.
            0 | libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => {
                out.error(libc::EOPNOTSUPP);
                return;
            }
        };
        match res {
            Ok(()) => out.ok(&[]),
            Err(e) => out.error(e.errno()),
        }
    }
}

/// `fuse_attr` of the root directory or of the disk file of `size` bytes; every time
/// is `t` (since the epoch).
fn attr(ino: u64, size: u64, t: Duration) -> Le {
    let (mode, size, nlink) = if ino == DISK_INO {
        (libc::S_IFREG | 0o600, size, 1)
    } else {
        (libc::S_IFDIR | 0o755, 0, 2)
    };
    let mut a = Le::default().u64(ino).u64(size).u64(size.div_ceil(512));
    for _ in 0..3 {
        a = a.u64(t.as_secs());
    }
    for _ in 0..3 {
        a = a.u32(t.subsec_nanos());
    }
    // mode, nlink, uid, gid, rdev, blksize, flags
    a.u32(mode).u32(nlink).u32(0).u32(0).u32(0).u32(4096).u32(0)
}

fn readdir(out: &Out<'_>, b: &[u8]) {
    let (offset, size) = (u64_at(b, ARGS + 8), u32_at(b, ARGS + 16) as usize);
    out.ok(&[&dirents(offset, size)]);
}

/// The root directory's entries from `offset` on, as many as fit in `size` bytes.
fn dirents(offset: u64, size: usize) -> Vec<u8> {
    const DT_DIR: u32 = 4;
    const DT_REG: u32 = 8;
    let entries = [
        (ROOT_INO, DT_DIR, "."),
        (ROOT_INO, DT_DIR, ".."),
        (DISK_INO, DT_REG, DEVICE_FILE),
    ];
    let mut buf = Vec::new();
    for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
        // fuse_dirent: ino, off (of the next entry), namelen, type, name padded to 8.
        let mut d = Le::default()
            .u64(*ino)
            .u64((i + 1) as u64)
            .u32(name.len() as u32)
            .u32(*kind)
            .0;
        d.extend_from_slice(name.as_bytes());
        d.resize(d.len().next_multiple_of(8), 0);
        if buf.len() + d.len() > size {
            break;
        }
        buf.extend_from_slice(&d);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_have_the_kernel_layout() {
        let t = Duration::new(1_700_000_000, 5);
        let disk = attr(DISK_INO, 8 << 30, t).0;
        // fuse_attr is 88 bytes: ino, size, blocks, three times, three nanoseconds, mode...
        assert_eq!(disk.len(), 88);
        assert_eq!(u64_at(&disk, 0), DISK_INO);
        assert_eq!(u64_at(&disk, 8), 8 << 30);
        assert_eq!(u64_at(&disk, 16), (8 << 30) / 512);
        assert_eq!(u64_at(&disk, 24), 1_700_000_000);
        assert_eq!(u32_at(&disk, 48), 5);
        assert_eq!(u32_at(&disk, 60), libc::S_IFREG | 0o600);
        assert_eq!(u32_at(&disk, 80), 4096);
        let root = attr(ROOT_INO, 8 << 30, t).0;
        assert_eq!(u32_at(&root, 60), libc::S_IFDIR | 0o755);
        assert_eq!(u64_at(&root, 8), 0, "a directory has no size");
    }

    #[test]
    fn directory_listing_resumes_at_its_offset_and_fits_the_buffer() {
        let all = dirents(0, 4096);
        // Three 8-byte aligned entries: ".", ".." and "disk", 24-byte header each.
        assert_eq!(all.len(), 3 * 32);
        assert_eq!(u32_at(&all, 64 + 16), DEVICE_FILE.len() as u32);
        assert_eq!(&all[64 + 24..64 + 28], DEVICE_FILE.as_bytes());
        assert_eq!(
            u64_at(&all, 64 + 8),
            3,
            "offset of the entry after the last"
        );
        // From offset 2 only "disk"; a buffer for two entries gets two.
        assert_eq!(dirents(2, 4096), all[64..].to_vec());
        assert_eq!(dirents(0, 70).len(), 64);
        assert!(dirents(3, 4096).is_empty());
    }

    #[test]
    fn header_fields_are_read_little_endian_and_short_input_is_refused() {
        let mut b = vec![0u8; ARGS];
        b[4..8].copy_from_slice(&op::WRITE.to_le_bytes());
        b[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        b[16..24].copy_from_slice(&DISK_INO.to_le_bytes());
        let h = Header::parse(&b).expect("a whole header");
        assert_eq!(
            (h.opcode, h.unique, h.nodeid),
            (op::WRITE, 0x0102_0304_0506_0708, DISK_INO)
        );
        assert!(Header::parse(&b[..ARGS - 1]).is_none());
        // Fields past the end read as 0 rather than panicking.
        assert_eq!(u64_at(&b, ARGS + 8), 0);
        assert_eq!(u32_at(&b, ARGS - 2), 0);
    }
}
