//! Metadata blocks with transactions: a cache of block images over the volume, the
//! changes of the open transaction, and the journal that makes a commit atomic.
//!
//! A block changed in a transaction lives in `dirty` until [`PageStore::commit`] writes
//! all of them to the journal in one go; from then on it is `pending` (committed, its
//! home location not yet rewritten). A checkpoint writes pending blocks home, flushes,
//! and moves the journal's replay start past them. [`PageStore::abort`] drops the open
//! transaction, so an operation that fails half-way leaves nothing behind.
//!
//! Durability: a commit is written to every in-sync replica before it returns (it
//! survives the coordinator process dying), and is flushed to their disks by
//! [`PageStore::sync`] (fsync).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use tracing::debug;

use crate::dev::BlockDev;
use crate::error::{FsError, Result};
use crate::format::journal::{self, MAX_PER_RECORD};
use crate::format::layout::{Checkpoint, BLOCK, BLOCK_U64, CHECKPOINT_BLOCK};

/// Clean blocks kept in memory.
const CACHE_BLOCKS: usize = 16 << 10;

pub type Page = Arc<Vec<u8>>;

pub struct PageStore {
    dev: Arc<dyn BlockDev>,
    pub checkpoint: Checkpoint,
    cache: LruCache<u64, Page>,
    dirty: BTreeMap<u64, Vec<u8>>,
    pending: HashMap<u64, Page>,
    jpos: u64,
    jseq: u64,
    /// Journal blocks in use since the last checkpoint (including any skipped at a wrap).
    jused: u64,
    /// Checkpoints taken since open: blocks freed before one may be reused after it.
    pub checkpoints: u64,
    /// Transactions committed since open.
    pub commits: u64,
}

impl PageStore {
    /// Writes an empty journal's checkpoint block: the volume holds a (still empty)
    /// namespace from here on.
    pub fn format(dev: &dyn BlockDev, checkpoint: &Checkpoint) -> Result<()> {
        dev.write_at(CHECKPOINT_BLOCK * BLOCK_U64, &checkpoint.encode())?;
        dev.flush()
    }

    /// Opens the namespace on `dev`, replaying the journal.
    pub fn open(dev: Arc<dyn BlockDev>) -> Result<Self> {
        let checkpoint = Checkpoint::decode(&dev.read_at(CHECKPOINT_BLOCK * BLOCK_U64, BLOCK)?)?;
        let g = checkpoint.geometry;
        if g.blocks * BLOCK_U64 > dev.size() {
            return Err(FsError::Corrupt(format!(
                "the namespace spans {} blocks, the volume only {}",
                g.blocks,
                dev.size() / BLOCK_U64
            )));
        }
        let scan = journal::scan(
            dev.as_ref(),
            g.journal_start,
            g.journal_blocks,
            checkpoint.journal_pos,
            checkpoint.journal_seq,
            &checkpoint.uuid,
        )?;
        let mut store = Self {
            dev,
            jpos: checkpoint.journal_pos,
            jseq: checkpoint.journal_seq,
            checkpoint,
            cache: LruCache::new(NonZeroUsize::new(CACHE_BLOCKS).unwrap()),
            dirty: BTreeMap::new(),
            pending: HashMap::new(),
            jused: 0,
            checkpoints: 0,
            commits: 0,
        };
        if !scan.transactions.is_empty() {
            let n = scan.transactions.len();
            for (no, img) in scan.transactions.into_iter().flatten() {
                store.check_block(no)?;
                store.pending.insert(no, Arc::new(img));
            }
            store.jpos = scan.end_pos;
            store.jseq = scan.next_seq;
            store.checkpoint()?;
            debug!(transactions = n, "journal replayed");
        }
        Ok(store)
    }

    pub fn dev(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }

    fn check_block(&self, no: u64) -> Result<()> {
        let g = self.checkpoint.geometry;
        if no == CHECKPOINT_BLOCK
            || no >= g.blocks
            || (no >= g.journal_start && no < g.data_start())
        {
            return Err(FsError::Corrupt(format!(
                "metadata block number {no} is outside the metadata areas"
            )));
        }
        Ok(())
    }

    /// The current image of block `no` (with this transaction's changes).
    pub fn read(&mut self, no: u64) -> Result<Page> {
        if let Some(d) = self.dirty.get(&no) {
            return Ok(Arc::new(d.clone()));
        }
        self.read_committed(no)
    }

    /// Like [`Self::read`] but borrows an uncommitted image instead of copying it.
    pub fn with<T>(&mut self, no: u64, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        if let Some(d) = self.dirty.get(&no) {
            return Ok(f(d));
        }
        let p = self.read_committed(no)?;
        Ok(f(&p))
    }

    fn read_committed(&mut self, no: u64) -> Result<Page> {
        if let Some(p) = self.pending.get(&no) {
            return Ok(p.clone());
        }
        if let Some(p) = self.cache.get(&no) {
            return Ok(p.clone());
        }
        self.check_block(no)?;
        let p = Arc::new(self.dev.read_at(no * BLOCK_U64, BLOCK)?);
        self.cache.put(no, p.clone());
        Ok(p)
    }

    /// Replaces block `no` in the open transaction.
    pub fn write(&mut self, no: u64, image: Vec<u8>) -> Result<()> {
        debug_assert_eq!(image.len(), BLOCK);
        self.check_block(no)?;
        self.dirty.insert(no, image);
        Ok(())
    }

    /// Block `no`'s image to change in place, in the open transaction.
    pub fn modify(&mut self, no: u64) -> Result<&mut Vec<u8>> {
        if !self.dirty.contains_key(&no) {
            let p = self.read_committed(no)?;
            self.dirty.insert(no, p.as_ref().clone());
        }
        Ok(self.dirty.get_mut(&no).expect("just inserted"))
    }

    /// Drops the open transaction.
    pub fn abort(&mut self) {
        self.dirty.clear();
    }

    /// Writes the open transaction to the journal (on every in-sync replica).
    pub fn commit(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let g = self.checkpoint.geometry;
        let n = self.dirty.len();
        let records = n.div_ceil(MAX_PER_RECORD) as u64;
        let needed = n as u64 + records;
        // Worst case a wrap skips a record's length at the end.
        if needed * 2 >= g.journal_blocks {
            self.abort();
            return Err(FsError::Io(format!(
                "one change touches {n} metadata blocks, more than the journal holds"
            )));
        }
        if self.jused + needed * 2 >= g.journal_blocks {
            self.checkpoint()?;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let saved = (self.jpos, self.jseq, self.jused);
        let list: Vec<(u64, &[u8])> = dirty.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let chunks: Vec<&[(u64, &[u8])]> = list.chunks(MAX_PER_RECORD).collect();
        let mut buf = Vec::new();
        let mut buf_pos = self.jpos;
        for (i, chunk) in chunks.iter().enumerate() {
            let rec = journal::encode_record(
                &self.checkpoint.uuid,
                self.jseq,
                i + 1 == chunks.len(),
                chunk,
            );
            let len = (rec.len() / BLOCK) as u64;
            if self.jpos + len > g.journal_blocks {
                // Does not fit before the ring's end: write what we have, wrap to 0.
                if let Err(e) = self.write_journal(buf_pos, &buf) {
                    (self.jpos, self.jseq, self.jused) = saved;
                    return Err(e);
                }
                buf.clear();
                self.jused += g.journal_blocks - self.jpos;
                self.jpos = 0;
                buf_pos = 0;
            }
            buf.extend_from_slice(&rec);
            self.jpos += len;
            self.jused += len;
            self.jseq += 1;
        }
        if let Err(e) = self.write_journal(buf_pos, &buf) {
            // The journal may hold part of it: the next transaction goes to the same
            // place with the same sequence number, so replay never skips past a gap.
            // The in-memory changes are dropped with the transaction.
            (self.jpos, self.jseq, self.jused) = saved;
            return Err(e);
        }
        for (no, img) in dirty {
            let page = Arc::new(img);
            self.cache.pop(&no);
            self.pending.insert(no, page);
        }
        self.commits += 1;
        // Keep the pinned set (and replay time) bounded.
        if self.jused * 2 >= g.journal_blocks {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn write_journal(&self, pos: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let g = self.checkpoint.geometry;
        self.dev.write_at((g.journal_start + pos) * BLOCK_U64, buf)
    }

    /// Writes committed blocks home and moves the journal's replay start past them.
    pub fn checkpoint(&mut self) -> Result<()> {
        let mut blocks: Vec<(u64, Page)> =
            self.pending.iter().map(|(k, v)| (*k, v.clone())).collect();
        blocks.sort_by_key(|(k, _)| *k);
        // Contiguous blocks go out in one write.
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 && j - i < 256 {
                j += 1;
            }
            let mut buf = Vec::with_capacity((j - i) * BLOCK);
            for (_, p) in &blocks[i..j] {
                buf.extend_from_slice(p);
            }
            self.dev.write_at(blocks[i].0 * BLOCK_U64, &buf)?;
            i = j;
        }
        self.dev.flush()?;
        self.checkpoint.journal_pos = self.jpos;
        self.checkpoint.journal_seq = self.jseq;
        self.dev
            .write_at(CHECKPOINT_BLOCK * BLOCK_U64, &self.checkpoint.encode())?;
        self.dev.flush()?;
        for (no, p) in self.pending.drain() {
            self.cache.put(no, p);
        }
        self.jused = 0;
        self.checkpoints += 1;
        Ok(())
    }

    /// Makes everything committed durable on the volume's disks.
    pub fn sync(&mut self) -> Result<()> {
        self.dev.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::FileDev;
    use crate::format::layout::Geometry;

    fn fresh(dir: &tempfile::TempDir) -> Arc<dyn BlockDev> {
        fresh_sized(dir, 16 << 20)
    }

    fn fresh_sized(dir: &tempfile::TempDir, size: u64) -> Arc<dyn BlockDev> {
        let dev = FileDev::create(&dir.path().join("dev"), size).unwrap();
        let cp = Checkpoint {
            geometry: Geometry::for_size(size).unwrap(),
            uuid: [1; 16],
            journal_pos: 0,
            journal_seq: 1,
        };
        PageStore::format(&dev, &cp).unwrap();
        Arc::new(dev)
    }

    fn img(b: u8) -> Vec<u8> {
        vec![b; BLOCK]
    }

    #[test]
    fn committed_changes_survive_reopen_and_aborted_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let dev = fresh(&d);
        let data = dev_data_block(&dev);
        {
            let mut s = PageStore::open(dev.clone()).unwrap();
            s.write(data, img(5)).unwrap();
            s.write(1, img(6)).unwrap();
            s.commit().unwrap();
            s.write(data, img(7)).unwrap();
            assert_eq!(
                s.read(data).unwrap()[0],
                7,
                "a transaction sees its own change"
            );
            s.abort();
            assert_eq!(s.read(data).unwrap()[0], 5);
            // Dropped without a checkpoint: the home blocks are still zero.
        }
        assert_eq!(dev.read_at(data * BLOCK_U64, 1).unwrap()[0], 0);
        let mut s = PageStore::open(dev.clone()).unwrap();
        assert_eq!(s.read(data).unwrap()[0], 5, "replayed");
        assert_eq!(s.read(1).unwrap()[0], 6);
        assert_eq!(
            dev.read_at(data * BLOCK_U64, 1).unwrap()[0],
            5,
            "written home"
        );
    }

    fn dev_data_block(dev: &Arc<dyn BlockDev>) -> u64 {
        let cp = Checkpoint::decode(&dev.read_at(0, BLOCK).unwrap()).unwrap();
        cp.geometry.data_start() + 3
    }

    #[test]
    fn many_commits_wrap_the_journal_and_every_last_image_wins() {
        let d = tempfile::tempdir().unwrap();
        let dev = fresh(&d);
        let base = dev_data_block(&dev);
        {
            let mut s = PageStore::open(dev.clone()).unwrap();
            for round in 0..400u64 {
                for k in 0..5 {
                    s.write(base + k, img((round % 250) as u8 + k as u8))
                        .unwrap();
                }
                s.commit().unwrap();
            }
            assert!(s.checkpoints > 0, "the journal filled and was checkpointed");
        }
        let mut s = PageStore::open(dev).unwrap();
        for k in 0..5 {
            assert_eq!(s.read(base + k).unwrap()[0], (399 % 250) as u8 + k as u8);
        }
    }

    #[test]
    fn a_transaction_over_one_record_is_atomic() {
        let d = tempfile::tempdir().unwrap();
        let dev = fresh_sized(&d, 128 << 20);
        let base = dev_data_block(&dev);
        {
            let mut s = PageStore::open(dev.clone()).unwrap();
            for k in 0..(MAX_PER_RECORD as u64 + 20) {
                s.write(base + k, img(9)).unwrap();
            }
            s.commit().unwrap();
        }
        let mut s = PageStore::open(dev).unwrap();
        assert_eq!(s.read(base + MAX_PER_RECORD as u64 + 19).unwrap()[0], 9);
    }

    #[test]
    fn blocks_outside_the_metadata_areas_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dev = fresh(&d);
        let mut s = PageStore::open(dev).unwrap();
        assert!(
            s.write(0, img(1)).is_err(),
            "the checkpoint block is not journaled"
        );
        let j = s.checkpoint.geometry.journal_start;
        assert!(s.write(j, img(1)).is_err());
        assert!(s.read(1 << 40).is_err());
    }
}
