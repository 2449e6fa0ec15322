//! The free-space bitmap: one bit per volume block (1 = in use), kept in journaled
//! blocks, plus in-memory free counts per bitmap block to skip full ones.
//!
//! Blocks that held metadata are not handed out again until a checkpoint has passed
//! (`quarantine`): until then the journal may still hold an older image of them, and a
//! replay after a crash would write that image over whatever file data reused the block.

use std::collections::{BTreeSet, HashSet};

use crate::error::{FsError, Result};
use crate::format::layout::{Geometry, BITMAP_START, BITS_PER_BLOCK, BLOCK};
use crate::format::pages::PageStore;

pub struct Alloc {
    geo: Geometry,
    free_per_block: Vec<u32>,
    free: u64,
    /// Freed metadata blocks with the checkpoint count at which they were freed.
    quarantine: Vec<(u64, u64)>,
    quarantined: HashSet<u64>,
    /// This transaction's bitmap blocks and quarantine additions, for abort.
    touched: BTreeSet<u64>,
    tx_quarantine: Vec<u64>,
    /// Where the next search starts.
    pub hint: u64,
}

fn count_free(img: &[u8], bits: u64) -> u32 {
    let full_bytes = (bits / 8) as usize;
    let mut free: u32 = img[..full_bytes].iter().map(|b| b.count_zeros()).sum();
    for bit in (full_bytes as u64 * 8)..bits {
        if img[(bit / 8) as usize] & (1 << (bit % 8)) == 0 {
            free += 1;
        }
    }
    free
}

impl Alloc {
    /// Bits that exist in bitmap block `i`.
    fn bits_in(geo: &Geometry, i: u64) -> u64 {
        (geo.blocks - i * BITS_PER_BLOCK).min(BITS_PER_BLOCK)
    }

    /// Writes a bitmap marking the fixed areas in use, into the open transaction.
    pub fn format(store: &mut PageStore) -> Result<()> {
        let geo = store.checkpoint.geometry;
        for i in 0..geo.bitmap_blocks {
            let mut img = vec![0u8; BLOCK];
            let first = i * BITS_PER_BLOCK;
            for bit in 0..BITS_PER_BLOCK {
                let block = first + bit;
                // Fixed areas, and the bits past the volume's end.
                if block < geo.data_start() || block >= geo.blocks {
                    img[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
            store.write(BITMAP_START + i, img)?;
        }
        Ok(())
    }

    pub fn open(store: &mut PageStore) -> Result<Self> {
        let geo = store.checkpoint.geometry;
        let mut free_per_block = Vec::with_capacity(geo.bitmap_blocks as usize);
        for i in 0..geo.bitmap_blocks {
            let bits = Self::bits_in(&geo, i);
            free_per_block.push(store.with(BITMAP_START + i, |img| count_free(img, bits))?);
        }
        let free = free_per_block.iter().map(|f| *f as u64).sum();
        Ok(Self {
            geo,
            free_per_block,
            free,
            quarantine: vec![],
            quarantined: HashSet::new(),
            touched: BTreeSet::new(),
            tx_quarantine: vec![],
            hint: geo.data_start(),
        })
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn total_blocks(&self) -> u64 {
        self.geo.blocks - self.geo.data_start()
    }

    fn release_quarantine(&mut self, checkpoints: u64) {
        if self.quarantine.is_empty() {
            return;
        }
        let q = std::mem::take(&mut self.quarantine);
        for (b, at) in q {
            if checkpoints > at {
                self.quarantined.remove(&b);
            } else {
                self.quarantine.push((b, at));
            }
        }
    }

    /// Takes up to `want` contiguous blocks, searching from `hint`; at least one.
    pub fn alloc(&mut self, store: &mut PageStore, want: u64, hint: u64) -> Result<(u64, u64)> {
        self.release_quarantine(store.checkpoints);
        if self.free <= self.quarantined.len() as u64 {
            return Err(FsError::NoSpace);
        }
        let start_at = if hint >= self.geo.data_start() && hint < self.geo.blocks {
            hint
        } else {
            self.hint
        };
        let nb = self.geo.bitmap_blocks;
        let first_idx = start_at / BITS_PER_BLOCK;
        for step in 0..=nb {
            let idx = (first_idx + step) % nb;
            if self.free_per_block[idx as usize] == 0 {
                continue;
            }
            let from = if step == 0 {
                start_at % BITS_PER_BLOCK
            } else {
                0
            };
            let found = store.with(BITMAP_START + idx, |img| {
                let bits = Self::bits_in(&self.geo, idx);
                (from..bits).find(|&bit| {
                    img[(bit / 8) as usize] & (1 << (bit % 8)) == 0
                        && !self.quarantined.contains(&(idx * BITS_PER_BLOCK + bit))
                })
            })?;
            let Some(bit) = found else { continue };
            let start = idx * BITS_PER_BLOCK + bit;
            let len = self.extend_run(store, start, want)?;
            self.set(store, start, len, true)?;
            self.hint = start + len;
            return Ok((start, len));
        }
        // The first block searched from an offset may have free bits before it.
        if start_at != self.geo.data_start() {
            return self.alloc(store, want, self.geo.data_start());
        }
        Err(FsError::NoSpace)
    }

    /// How many free blocks follow `start` (itself free), up to `want`.
    fn extend_run(&mut self, store: &mut PageStore, start: u64, want: u64) -> Result<u64> {
        let mut len = 1;
        while len < want {
            let b = start + len;
            if b >= self.geo.blocks || self.quarantined.contains(&b) || self.is_used(store, b)? {
                break;
            }
            len += 1;
        }
        Ok(len)
    }

    pub fn is_used(&self, store: &mut PageStore, b: u64) -> Result<bool> {
        let idx = b / BITS_PER_BLOCK;
        let bit = b % BITS_PER_BLOCK;
        store.with(BITMAP_START + idx, |img| {
            img[(bit / 8) as usize] & (1 << (bit % 8)) != 0
        })
    }

    pub(crate) fn set_range(
        &mut self,
        store: &mut PageStore,
        start: u64,
        len: u64,
        used: bool,
    ) -> Result<()> {
        self.set(store, start, len, used)
    }

    fn set(&mut self, store: &mut PageStore, start: u64, len: u64, used: bool) -> Result<()> {
        let mut b = start;
        while b < start + len {
            let idx = b / BITS_PER_BLOCK;
            let img = store.modify(BITMAP_START + idx)?;
            let mut changed = 0u32;
            while b < start + len && b / BITS_PER_BLOCK == idx {
                let bit = b % BITS_PER_BLOCK;
                let byte = &mut img[(bit / 8) as usize];
                let mask = 1u8 << (bit % 8);
                if (*byte & mask != 0) == used {
                    return Err(FsError::Corrupt(format!(
                        "block {b} is already {}",
                        if used { "in use" } else { "free" }
                    )));
                }
                *byte ^= mask;
                changed += 1;
                b += 1;
            }
            self.touched.insert(idx);
            let f = &mut self.free_per_block[idx as usize];
            if used {
                *f -= changed;
                self.free -= changed as u64;
            } else {
                *f += changed;
                self.free += changed as u64;
            }
        }
        Ok(())
    }

    /// Frees file data blocks: reusable at once.
    pub fn free_data(&mut self, store: &mut PageStore, start: u64, len: u64) -> Result<()> {
        self.check_range(start, len)?;
        self.set(store, start, len, false)
    }

    /// Frees a metadata block: reusable after the next checkpoint.
    pub fn free_meta(&mut self, store: &mut PageStore, b: u64) -> Result<()> {
        self.check_range(b, 1)?;
        self.set(store, b, 1, false)?;
        self.tx_quarantine.push(b);
        Ok(())
    }

    fn check_range(&self, start: u64, len: u64) -> Result<()> {
        if start < self.geo.data_start() || start + len > self.geo.blocks || len == 0 {
            return Err(FsError::Corrupt(format!(
                "freeing blocks {start}+{len} outside the data area"
            )));
        }
        Ok(())
    }

    /// The transaction committed.
    pub fn committed(&mut self, checkpoints: u64) {
        self.touched.clear();
        for b in self.tx_quarantine.drain(..) {
            self.quarantined.insert(b);
            self.quarantine.push((b, checkpoints));
        }
    }

    /// The transaction was dropped (after `store.abort()`): recount what it touched.
    pub fn aborted(&mut self, store: &mut PageStore) -> Result<()> {
        self.tx_quarantine.clear();
        for idx in std::mem::take(&mut self.touched) {
            let bits = Self::bits_in(&self.geo, idx);
            let n = store.with(BITMAP_START + idx, |img| count_free(img, bits))?;
            let old = std::mem::replace(&mut self.free_per_block[idx as usize], n);
            self.free = self.free + n as u64 - old as u64;
        }
        Ok(())
    }
}
