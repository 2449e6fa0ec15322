//! Where things are on the volume, and the two fixed blocks that say so.
//!
//! ```text
//! block 0              checkpoint block: magic, format version, geometry, where journal
//!                      replay starts (written only by a checkpoint, never journaled)
//! block 1              fs block: B-tree root, inode counter, free-block count (journaled)
//! blocks 2..2+B        free-space bitmap, one bit per block (journaled)
//! next J blocks        journal (a ring of transaction records)
//! the rest             B-tree nodes and file data, handed out by the bitmap
//! ```
//! Integers are little-endian. `docs/format.md` describes the same layout for people.

use crate::error::{FsError, Result};

pub const BLOCK: usize = 4096;
pub const BLOCK_U64: u64 = BLOCK as u64;
pub const MAGIC: [u8; 8] = *b"SHOALFS\0";
pub const FORMAT_VERSION: u32 = 1;
pub const CHECKPOINT_BLOCK: u64 = 0;
pub const FS_BLOCK: u64 = 1;
pub const BITMAP_START: u64 = 2;
/// Bits in one bitmap block.
pub const BITS_PER_BLOCK: u64 = BLOCK_U64 * 8;
/// The smallest volume that holds a namespace.
pub const MIN_VOLUME: u64 = 8 << 20;
const MAX_JOURNAL_BLOCKS: u64 = (64 << 20) / BLOCK_U64;
const MIN_JOURNAL_BLOCKS: u64 = 256;

/// Fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u64,
    pub bitmap_blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
}

impl Geometry {
    pub fn for_size(bytes: u64) -> Result<Self> {
        if bytes < MIN_VOLUME {
            return Err(FsError::Invalid(format!(
                "a shared volume needs at least {} MiB, this one has {bytes} bytes",
                MIN_VOLUME >> 20
            )));
        }
        let blocks = bytes / BLOCK_U64;
        let bitmap_blocks = blocks.div_ceil(BITS_PER_BLOCK);
        let journal_blocks = (blocks / 16).clamp(MIN_JOURNAL_BLOCKS, MAX_JOURNAL_BLOCKS);
        Ok(Self {
            blocks,
            bitmap_blocks,
            journal_start: BITMAP_START + bitmap_blocks,
            journal_blocks,
        })
    }

    /// First block the allocator may hand out.
    pub fn data_start(&self) -> u64 {
        self.journal_start + self.journal_blocks
    }
}

/// Block 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub geometry: Geometry,
    pub uuid: [u8; 16],
    /// Journal position (block index inside the ring) and sequence number of the first
    /// record replay must consider.
    pub journal_pos: u64,
    pub journal_seq: u64,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        for v in [
            self.geometry.blocks,
            self.geometry.bitmap_blocks,
            self.geometry.journal_start,
            self.geometry.journal_blocks,
            self.journal_pos,
            self.journal_seq,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.uuid);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(BLOCK, 0);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 88 || b[..8] != MAGIC {
            return Err(FsError::Corrupt(
                "no Shoal filesystem on this volume (bad magic)".into(),
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(FsError::Corrupt(format!(
                "format version {version}; this build reads version {FORMAT_VERSION}"
            )));
        }
        let block = u32::from_le_bytes(b[12..16].try_into().unwrap());
        if block as usize != BLOCK {
            return Err(FsError::Corrupt(format!("block size {block}")));
        }
        let crc = u32::from_le_bytes(b[80..84].try_into().unwrap());
        if crc32fast::hash(&b[..80]) != crc {
            return Err(FsError::Corrupt("checkpoint block checksum".into()));
        }
        let u = |i: usize| u64::from_le_bytes(b[16 + i * 8..24 + i * 8].try_into().unwrap());
        Ok(Self {
            geometry: Geometry {
                blocks: u(0),
                bitmap_blocks: u(1),
                journal_start: u(2),
                journal_blocks: u(3),
            },
            journal_pos: u(4),
            journal_seq: u(5),
            uuid: b[64..80].try_into().unwrap(),
        })
    }
}

/// Block 1: the fields every transaction may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsBlock {
    pub btree_root: u64,
    /// Inode numbers below this were handed out (possibly to inodes lost in a crash).
    pub next_ino: u64,
    /// 1 while a coordinator serves the namespace and may have granted locks; 0 after a
    /// clean stop with no lock held (and in volumes formatted before this field had a
    /// use). A coordinator that finds 1 at open gives mounts a grace period to reclaim
    /// their locks.
    pub in_service: u64,
    /// Bumped by every transaction that touches this block; informational.
    pub generation: u64,
}

impl FsBlock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK);
        b.extend_from_slice(b"SHOALFSB");
        for v in [
            self.btree_root,
            self.next_ino,
            self.in_service,
            self.generation,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.resize(BLOCK, 0);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if &b[..8] != b"SHOALFSB" {
            return Err(FsError::Corrupt("fs block magic".into()));
        }
        let u = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap());
        Ok(Self {
            btree_root: u(0),
            next_ino: u(1),
            in_service: u(2),
            generation: u(3),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_leaves_room_and_round_trips() {
        let g = Geometry::for_size(20 << 30).unwrap();
        assert_eq!(g.blocks, 5 << 20);
        assert_eq!(g.journal_blocks, MAX_JOURNAL_BLOCKS);
        assert!(g.data_start() < g.blocks / 10);
        let c = Checkpoint {
            geometry: g,
            uuid: [7; 16],
            journal_pos: 5,
            journal_seq: 9,
        };
        assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
        assert!(Geometry::for_size(1 << 20).is_err());
    }

    #[test]
    fn damaged_checkpoint_is_refused() {
        let g = Geometry::for_size(64 << 20).unwrap();
        let mut b = Checkpoint {
            geometry: g,
            uuid: [0; 16],
            journal_pos: 0,
            journal_seq: 1,
        }
        .encode();
        b[20] ^= 1;
        assert!(matches!(Checkpoint::decode(&b), Err(FsError::Corrupt(_))));
        assert!(Checkpoint::decode(&[0u8; BLOCK]).is_err());
    }
}
