//! Inode records and the B-tree keys of every namespace record.
//!
//! Keys start with a one-byte kind and the inode number big-endian, so that all records
//! of one inode sit together and in order:
//!
//! ```text
//! I ino                 -> inode
//! D dir name            -> child ino u64, kind u8, cookie u64     (lookup by name)
//! C dir cookie          -> child ino u64, kind u8, name           (readdir order)
//! E ino first-block     -> physical block u64, length u32         (file extents)
//! X ino name            -> value                                  (xattrs)
//! L ino chunk           -> symlink target bytes (1 KiB chunks)
//! O ino                 -> (empty)                                (unlinked, still open)
//! P ino                 -> parent ino u64                         (directories only)
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{FsError, Result};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return Err(FsError::Corrupt(format!("inode kind {c}"))),
        })
    }

    /// The S_IFMT bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    pub fn from_mode(mode: u32) -> Result<Self> {
        Ok(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            other => return Err(FsError::Invalid(format!("file type bits {other:o}"))),
        })
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (no file type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Bytes for files and symlinks; entries for directories.
    pub size: u64,
    /// 4 KiB blocks allocated to the file.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub rdev: u32,
    /// Directories: the cookie the next entry gets.
    pub next_cookie: u64,
}

const INODE_LEN: usize = 1 + 4 * 5 + 8 * 3 + 12 * 4;

impl Inode {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INODE_LEN);
        b.push(self.kind.code());
        for v in [self.perm, self.uid, self.gid, self.nlink, self.rdev] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.size, self.blocks, self.next_cookie] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            b.extend_from_slice(&t.sec.to_le_bytes());
            b.extend_from_slice(&t.nsec.to_le_bytes());
        }
        b
    }

    pub fn decode(ino: u64, b: &[u8]) -> Result<Self> {
        if b.len() < INODE_LEN {
            return Err(FsError::Corrupt(format!("inode {ino} record too short")));
        }
        let u32_ = |i: usize| u32::from_le_bytes(b[1 + i * 4..5 + i * 4].try_into().unwrap());
        let u64_ = |i: usize| u64::from_le_bytes(b[21 + i * 8..29 + i * 8].try_into().unwrap());
        let t = |i: usize| {
            let at = 45 + i * 12;
            Time {
                sec: i64::from_le_bytes(b[at..at + 8].try_into().unwrap()),
                nsec: u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()),
            }
        };
        Ok(Self {
            ino,
            kind: Kind::from_code(b[0])?,
            perm: u32_(0),
            uid: u32_(1),
            gid: u32_(2),
            nlink: u32_(3),
            rdev: u32_(4),
            size: u64_(0),
            blocks: u64_(1),
            next_cookie: u64_(2),
            atime: t(0),
            mtime: t(1),
            ctime: t(2),
            crtime: t(3),
        })
    }

    /// st_mode.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | self.perm
    }
}

fn key(tag: u8, ino: u64, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + rest.len());
    k.push(tag);
    k.extend_from_slice(&ino.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

pub fn inode_key(ino: u64) -> Vec<u8> {
    key(b'I', ino, &[])
}

pub fn dirent_key(dir: u64, name: &[u8]) -> Vec<u8> {
    key(b'D', dir, name)
}

pub fn cookie_key(dir: u64, cookie: u64) -> Vec<u8> {
    key(b'C', dir, &cookie.to_be_bytes())
}

pub fn extent_key(ino: u64, block: u64) -> Vec<u8> {
    key(b'E', ino, &block.to_be_bytes())
}

pub fn xattr_key(ino: u64, name: &[u8]) -> Vec<u8> {
    key(b'X', ino, name)
}

pub fn link_key(ino: u64, chunk: u32) -> Vec<u8> {
    key(b'L', ino, &chunk.to_be_bytes())
}

pub fn parent_key(dir: u64) -> Vec<u8> {
    key(b'P', dir, &[])
}

pub fn orphan_key(ino: u64) -> Vec<u8> {
    key(b'O', ino, &[])
}

pub fn trim_key(ino: u64) -> Vec<u8> {
    key(b'T', ino, &[])
}

/// The first key after every key starting with `tag ino`.
pub fn after(tag: u8, ino: u64) -> Vec<u8> {
    match ino.checked_add(1) {
        Some(n) => key(tag, n, &[]),
        None => vec![tag + 1],
    }
}

/// The block number at the end of an extent key.
pub fn extent_block(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[9..17].try_into().unwrap())
}

pub fn ino_of(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[1..9].try_into().unwrap())
}

/// A directory entry's value in the D index: (child, kind, cookie).
pub fn dirent_value(child: u64, kind: Kind, cookie: u64) -> Vec<u8> {
    let mut v = child.to_le_bytes().to_vec();
    v.push(kind.code());
    v.extend_from_slice(&cookie.to_le_bytes());
    v
}

pub fn parse_dirent(v: &[u8]) -> Result<(u64, Kind, u64)> {
    if v.len() < 17 {
        return Err(FsError::Corrupt("directory entry too short".into()));
    }
    Ok((
        u64::from_le_bytes(v[..8].try_into().unwrap()),
        Kind::from_code(v[8])?,
        u64::from_le_bytes(v[9..17].try_into().unwrap()),
    ))
}

/// A readdir record's value in the C index: (child, kind, name).
pub fn cookie_value(child: u64, kind: Kind, name: &[u8]) -> Vec<u8> {
    let mut v = child.to_le_bytes().to_vec();
    v.push(kind.code());
    v.extend_from_slice(name);
    v
}

pub fn parse_cookie_value(v: &[u8]) -> Result<(u64, Kind, Vec<u8>)> {
    if v.len() < 9 {
        return Err(FsError::Corrupt("readdir record too short".into()));
    }
    Ok((
        u64::from_le_bytes(v[..8].try_into().unwrap()),
        Kind::from_code(v[8])?,
        v[9..].to_vec(),
    ))
}

pub fn extent_value(phys: u64, len: u64) -> Vec<u8> {
    let mut v = phys.to_le_bytes().to_vec();
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v
}

pub fn parse_extent(v: &[u8]) -> Result<(u64, u64)> {
    if v.len() < 12 {
        return Err(FsError::Corrupt("extent record too short".into()));
    }
    Ok((
        u64::from_le_bytes(v[..8].try_into().unwrap()),
        u32::from_le_bytes(v[8..12].try_into().unwrap()) as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_round_trips() {
        let i = Inode {
            ino: 42,
            kind: Kind::Symlink,
            perm: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 3,
            size: 1 << 40,
            blocks: 77,
            atime: Time {
                sec: -5,
                nsec: 999_999_999,
            },
            mtime: Time::now(),
            ctime: Time { sec: 1, nsec: 2 },
            crtime: Time { sec: 3, nsec: 4 },
            rdev: 0x0801,
            next_cookie: 9,
        };
        assert_eq!(Inode::decode(42, &i.encode()).unwrap(), i);
        assert_eq!(i.mode(), libc::S_IFLNK | 0o4755);
    }

    #[test]
    fn keys_of_one_inode_sort_together_and_extents_by_offset() {
        assert!(extent_key(5, 2) < extent_key(5, 10));
        assert!(extent_key(5, u64::MAX) < after(b'E', 5));
        assert!(extent_key(6, 0) >= after(b'E', 5));
        assert_eq!(extent_block(&extent_key(5, 1234)), 1234);
        assert_eq!(ino_of(&dirent_key(77, b"x")), 77);
    }
}
