//! Conversions between the namespace API's messages and what fuser takes and gives.

use super::*;

pub(super) fn time(t: &Option<shoal_proto::ns::Time>) -> SystemTime {
    match t {
        Some(t) if t.sec >= 0 => UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec),
        Some(t) => {
            UNIX_EPOCH - Duration::new((-t.sec) as u64, 0) + Duration::from_nanos(t.nsec as u64)
        }
        None => UNIX_EPOCH,
    }
}

pub(super) fn file_type(mode: u32) -> FileType {
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

pub(super) fn kind_type(code: u32) -> FileType {
    match Kind::from_code(code as u8) {
        Ok(k) => file_type(k.mode_bits()),
        Err(_) => FileType::RegularFile,
    }
}

pub(super) fn to_file_attr(a: &Attr) -> FileAttr {
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

pub(super) fn attr_of(r: Option<Res>) -> Result<FileAttr, Errno> {
    match r {
        Some(Res::Attr(a)) => Ok(to_file_attr(&a)),
        _ => Err(Errno::EIO),
    }
}

pub(super) fn entry_of(parent: INodeNo, name: &OsStr) -> Entry {
    Entry {
        parent: parent.0,
        name: name.as_bytes().to_vec(),
    }
}

/// The payload of a data reply, without copying it (reads go straight to the kernel).
pub(super) fn data_of(r: Option<Res>) -> bytes::Bytes {
    match r {
        Some(Res::Data(d)) => d,
        _ => bytes::Bytes::new(),
    }
}

pub(super) fn system_time(t: SystemTime) -> shoal_proto::ns::Time {
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
