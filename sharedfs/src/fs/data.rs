//! File data of the namespace: extents, reads, writes, holes, truncation and
//! preallocation.

use super::*;

impl Fs {
    // ---- file data ---------------------------------------------------------------

    /// Extents of `ino` overlapping blocks `[b0, b1)`, in order: (first block, physical
    /// block, length).
    pub(super) fn extents(&mut self, ino: u64, b0: u64, b1: u64) -> Result<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        let start_key = match self.bt_floor(&extent_key(ino, b0))? {
            Some((k, v)) if k[0] == b'E' && ino_of(&k) == ino => {
                let (phys, len) = parse_extent(&v)?;
                let l = extent_block(&k);
                if l + len > b0 {
                    out.push((l, phys, len));
                }
                let mut next = k;
                next.push(0);
                next
            }
            _ => extent_key(ino, b0),
        };
        let end = extent_key(ino, b1);
        for (k, v) in self.bt_range(&start_key, Bound::Excluded(&end), usize::MAX)? {
            let (phys, len) = parse_extent(&v)?;
            out.push((extent_block(&k), phys, len));
        }
        Ok(out)
    }

    /// The last extent of `ino`.
    pub(super) fn last_extent(&mut self, ino: u64) -> Result<Option<(u64, u64, u64)>> {
        match self.bt_floor(&extent_key(ino, u64::MAX))? {
            Some((k, v)) if k[0] == b'E' && ino_of(&k) == ino => {
                let (phys, len) = parse_extent(&v)?;
                Ok(Some((extent_block(&k), phys, len)))
            }
            _ => Ok(None),
        }
    }

    pub fn read(&mut self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        let i = self.getattr(ino)?;
        if i.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if offset >= i.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(i.size);
        let (b0, b1) = (offset / BLOCK_U64, end.div_ceil(BLOCK_U64));
        let mut out = vec![0u8; ((b1 - b0) * BLOCK_U64) as usize];
        for (l, phys, n) in self.extents(ino, b0, b1)? {
            let s = l.max(b0);
            let e = (l + n).min(b1);
            if s >= e {
                continue;
            }
            let mut at = s;
            while at < e {
                let run = (e - at).min(IO_CHUNK / BLOCK_U64);
                let data = self
                    .store
                    .dev()
                    .read_at((phys + at - l) * BLOCK_U64, (run * BLOCK_U64) as usize)?;
                let dst = ((at - b0) * BLOCK_U64) as usize;
                out[dst..dst + data.len()].copy_from_slice(&data);
                at += run;
            }
        }
        let skip = (offset - b0 * BLOCK_U64) as usize;
        out.truncate(skip + (end - offset) as usize);
        out.drain(..skip);
        Ok(out)
    }

    /// Writes `data` at `offset` (at the end of the file when `append`); returns the
    /// inode after the write.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8], append: bool) -> Result<Inode> {
        self.run(|fs| fs.write_tx(ino, offset, data, append))
    }

    pub(super) fn write_tx(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> Result<Inode> {
        let mut i = self.getattr(ino)?;
        match i.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("write to a special file".into())),
        }
        let offset = if append { i.size } else { offset };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        if data.is_empty() {
            return Ok(i);
        }
        if offset > i.size {
            // Blocks past the old end must read as zeros: drop any left by an
            // interrupted truncate.
            self.trim_beyond(&mut i)?;
        }
        let (b0, b1) = (offset / BLOCK_U64, end.div_ceil(BLOCK_U64));
        // Runs covering [b0, b1): (first block, physical, length, freshly allocated).
        let mut runs: Vec<(u64, u64, u64, bool)> = Vec::new();
        let mut cursor = b0;
        for (l, phys, n) in self.extents(ino, b0, b1)? {
            let s = l.max(b0);
            let e = (l + n).min(b1);
            if s > cursor {
                self.fill_hole(&mut i, cursor, s, &mut runs)?;
            }
            runs.push((s, phys + (s - l), e - s, false));
            cursor = e;
        }
        if cursor < b1 {
            self.fill_hole(&mut i, cursor, b1, &mut runs)?;
        }
        for (s, phys, n, fresh) in runs {
            // The bytes of this run that the write covers.
            let run_start = s * BLOCK_U64;
            let run_end = (s + n) * BLOCK_U64;
            let w0 = offset.max(run_start);
            let w1 = end.min(run_end);
            let mut at = run_start;
            while at < run_end {
                let chunk_end = (at + IO_CHUNK).min(run_end);
                let c0 = w0.max(at);
                let c1 = w1.min(chunk_end);
                let mut buf;
                if c0 == at && c1 == chunk_end {
                    buf = data[(c0 - offset) as usize..(c1 - offset) as usize].to_vec();
                } else {
                    // Partial blocks at the edges of the write: keep what is there.
                    buf = if fresh {
                        vec![0u8; (chunk_end - at) as usize]
                    } else {
                        self.store.dev().read_at(
                            (phys + (at - run_start) / BLOCK_U64) * BLOCK_U64,
                            (chunk_end - at) as usize,
                        )?
                    };
                    if c0 < c1 {
                        buf[(c0 - at) as usize..(c1 - at) as usize]
                            .copy_from_slice(&data[(c0 - offset) as usize..(c1 - offset) as usize]);
                    }
                }
                self.store
                    .dev()
                    .write_at((phys + (at - run_start) / BLOCK_U64) * BLOCK_U64, &buf)?;
                at = chunk_end;
            }
        }
        let now = Time::now();
        i.size = i.size.max(end);
        i.mtime = now;
        i.ctime = now;
        self.put_inode(&i)?;
        Ok(i)
    }

    /// Allocates blocks `[from, to)` of `i` and records them as extents.
    pub(super) fn fill_hole(
        &mut self,
        i: &mut Inode,
        from: u64,
        to: u64,
        runs: &mut Vec<(u64, u64, u64, bool)>,
    ) -> Result<()> {
        let mut at = from;
        while at < to {
            // Continue right after the previous extent when it ends at `at`.
            let prev = if at > 0 {
                self.extents(i.ino, at - 1, at)?.pop()
            } else {
                None
            };
            let hint = match prev {
                Some((l, p, n)) if l + n == at => p + n,
                _ => self.data_hint,
            };
            let (p, n) = self.alloc.alloc(&mut self.store, to - at, hint)?;
            self.data_hint = p + n;
            match prev {
                Some((l, pp, pn)) if l + pn == at && pp + pn == p && pn + n < u32::MAX as u64 => {
                    self.bt_put(&extent_key(i.ino, l), &extent_value(pp, pn + n))?;
                }
                _ => self.bt_put(&extent_key(i.ino, at), &extent_value(p, n))?,
            }
            i.blocks += n;
            runs.push((at, p, n, true));
            at += n;
        }
        Ok(())
    }

    /// Frees the blocks past `i.size` and zeroes the tail of the last block.
    pub(super) fn truncate(&mut self, i: &mut Inode, size: u64) -> Result<()> {
        if size < i.size && !size.is_multiple_of(BLOCK_U64) {
            // Bytes past the new end in its last block must read as zeros if the file
            // grows again.
            let b = size / BLOCK_U64;
            if let Some((l, phys, _)) = self.extents(i.ino, b, b + 1)?.pop() {
                let at = (phys + b - l) * BLOCK_U64;
                let mut blk = self.store.dev().read_at(at, BLOCK)?;
                blk[(size % BLOCK_U64) as usize..].fill(0);
                self.store.dev().write_at(at, &blk)?;
            }
        }
        i.size = size;
        self.trim_beyond(i)
    }

    /// Frees every extent past `i.size`, in batches of committed transactions. While more
    /// than one batch is needed, a `T` record marks the inode, so that a crash between the
    /// batches is finished at the next open (`finish_trims`): no extent may stay past the
    /// size, or growing the file again would show old data.
    pub(super) fn trim_beyond(&mut self, i: &mut Inode) -> Result<()> {
        let keep = i.size.div_ceil(BLOCK_U64);
        let mut marked = false;
        loop {
            let mut freed = 0;
            while freed < FREE_BATCH {
                let Some((l, phys, n)) = self.last_extent(i.ino)? else {
                    break;
                };
                if l + n <= keep {
                    break;
                }
                if l >= keep {
                    self.bt_del(&extent_key(i.ino, l))?;
                    self.alloc.free_data(&mut self.store, phys, n)?;
                    i.blocks = i.blocks.saturating_sub(n);
                } else {
                    let kept = keep - l;
                    self.bt_put(&extent_key(i.ino, l), &extent_value(phys, kept))?;
                    self.alloc
                        .free_data(&mut self.store, phys + kept, n - kept)?;
                    i.blocks = i.blocks.saturating_sub(n - kept);
                }
                freed += 1;
            }
            if freed < FREE_BATCH {
                if marked {
                    self.bt_del(&trim_key(i.ino))?;
                }
                return Ok(());
            }
            // Keep one transaction within the journal: what is freed so far is
            // consistent on its own (the inode records the blocks it still has).
            if !marked {
                self.bt_put(&trim_key(i.ino), &[])?;
                marked = true;
            }
            self.put_inode(i)?;
            self.commit()?;
        }
    }

    /// Finishes the truncates a crash interrupted (see `trim_beyond`).
    pub(super) fn finish_trims(&mut self) -> Result<()> {
        let pending: Vec<u64> = self
            .bt_range(&trim_key(0), Bound::Excluded(&[b'T' + 1]), usize::MAX)?
            .into_iter()
            .map(|(k, _)| ino_of(&k))
            .collect();
        for ino in pending {
            debug!(ino, "finishing a truncate a crash interrupted");
            self.run(|fs| {
                match fs.getattr(ino) {
                    Ok(mut i) => {
                        fs.trim_beyond(&mut i)?;
                        fs.put_inode(&i)?;
                    }
                    Err(FsError::NotFound) => {}
                    Err(e) => return Err(e),
                }
                fs.bt_del(&trim_key(ino)).map(|_| ())
            })?;
        }
        Ok(())
    }

    /// Allocates (zeroed) blocks for `[offset, offset+len)`; grows the size unless
    /// `keep_size`.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, keep_size: bool) -> Result<Inode> {
        self.run(|fs| {
            let mut i = fs.getattr(ino)?;
            if i.kind != Kind::File {
                return Err(if i.kind == Kind::Dir {
                    FsError::IsDir
                } else {
                    FsError::Invalid("fallocate of a special file".into())
                });
            }
            let end = offset
                .checked_add(len)
                .filter(|e| *e <= MAX_FILE_SIZE)
                .ok_or(FsError::TooBig)?;
            if len == 0 {
                return Err(FsError::Invalid("fallocate of zero bytes".into()));
            }
            if offset > i.size {
                fs.trim_beyond(&mut i)?;
            }
            let (b0, b1) = (offset / BLOCK_U64, end.div_ceil(BLOCK_U64));
            let mut runs = Vec::new();
            let mut cursor = b0;
            for (l, _, n) in fs.extents(ino, b0, b1)? {
                let s = l.max(b0);
                if s > cursor {
                    fs.fill_hole(&mut i, cursor, s, &mut runs)?;
                }
                cursor = (l + n).min(b1);
            }
            if cursor < b1 {
                fs.fill_hole(&mut i, cursor, b1, &mut runs)?;
            }
            let zeros = vec![0u8; IO_CHUNK as usize];
            for (_, phys, n, _) in runs {
                let mut at = 0;
                while at < n {
                    let k = (n - at).min(IO_CHUNK / BLOCK_U64);
                    fs.store
                        .dev()
                        .write_at((phys + at) * BLOCK_U64, &zeros[..(k * BLOCK_U64) as usize])?;
                    at += k;
                }
            }
            let now = Time::now();
            if !keep_size && end > i.size {
                i.size = end;
                i.mtime = now;
            }
            i.ctime = now;
            fs.put_inode(&i)?;
            Ok(i)
        })
    }
}
