//! `shoal volume fsck`: checks the on-volume structures of a namespace and, when asked,
//! repairs them.
//!
//! Checked: every block is owned once (fixed areas, B-tree nodes, file extents) and the
//! free-space bitmap says exactly that; every directory entry points at an inode of the
//! kind it says, with a readdir record to match; link counts (files: their names;
//! directories: 2 + subdirectories); every inode is reachable from the root or listed as
//! an orphan; block counts and directory sizes. Repair rewrites counts and the bitmap,
//! drops entries that point nowhere, and moves unreachable inodes to `/lost+found`.
//!
//! Memory grows with the number of inodes (it keeps one small record per inode): a
//! check of 10 million files needs about a gigabyte.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;

use crate::error::{FsError, Result};
use crate::format::alloc::Alloc;
use crate::format::btree;
use crate::format::inode::*;
use crate::format::layout::{BITMAP_START, BITS_PER_BLOCK};
use crate::fs::{Cred, Fs};

/// What a check found (and, with repair, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub inodes: u64,
    pub directories: u64,
    pub blocks_in_use: u64,
    /// One line per problem.
    pub problems: Vec<String>,
    pub repaired: bool,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Default)]
struct Seen {
    inode: Option<Inode>,
    /// Names pointing at it (D records).
    names: u32,
    subdirs: u32,
    entries: u64,
    extent_blocks: u64,
    reachable: bool,
}

const BATCH: usize = 4096;

impl Fs {
    /// Checks the namespace; with `repair`, fixes what it can in one transaction.
    pub fn fsck(&mut self, repair: bool) -> Result<Report> {
        let mut r = Report::default();
        let geo = self.geometry();
        // Who owns each block: fixed areas, then tree nodes, then extents.
        let mut owner: HashMap<u64, String> = HashMap::new();
        let (mut n, root) = self.nodes();
        let tree_nodes = btree::nodes(&mut n, root)?;
        for b in tree_nodes {
            if b < geo.data_start() || b >= geo.blocks {
                r.problems
                    .push(format!("B-tree node {b} lies outside the data area"));
            } else if let Some(prev) = owner.insert(b, "the B-tree".into()) {
                r.problems
                    .push(format!("block {b} is used twice ({prev} and the B-tree)"));
            }
        }
        let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();
        let mut dirents: Vec<(u64, Vec<u8>, u64, Kind, u64)> = Vec::new();
        let mut cookies: HashSet<(u64, u64)> = HashSet::new();
        let mut orphans: HashSet<u64> = HashSet::new();
        let mut from: Vec<u8> = vec![];
        loop {
            let rows = self.bt_range(&from, Bound::Unbounded, BATCH)?;
            let Some((last, _)) = rows.last() else { break };
            from = last.clone();
            from.push(0);
            for (k, v) in rows {
                if k.len() < 9 {
                    r.problems.push(format!("a record with a short key {k:?}"));
                    continue;
                }
                let ino = ino_of(&k);
                match k[0] {
                    b'I' => match Inode::decode(ino, &v) {
                        Ok(i) => seen.entry(ino).or_default().inode = Some(i),
                        Err(e) => r.problems.push(format!("inode {ino}: {e}")),
                    },
                    b'D' => match parse_dirent(&v) {
                        Ok((child, kind, cookie)) => {
                            dirents.push((ino, k[9..].to_vec(), child, kind, cookie))
                        }
                        Err(e) => r.problems.push(format!("entry in {ino}: {e}")),
                    },
                    b'C' if k.len() == 17 => {
                        cookies.insert((ino, u64::from_be_bytes(k[9..17].try_into().unwrap())));
                    }
                    b'E' if k.len() == 17 => {
                        let (phys, len) = parse_extent(&v)?;
                        seen.entry(ino).or_default().extent_blocks += len;
                        for b in phys..phys + len {
                            if b < geo.data_start() || b >= geo.blocks {
                                r.problems.push(format!(
                                    "file {ino} has block {b} outside the data area"
                                ));
                                break;
                            }
                            if let Some(prev) = owner.insert(b, format!("file {ino}")) {
                                r.problems.push(format!(
                                    "block {b} is used twice ({prev} and file {ino})"
                                ));
                            }
                        }
                    }
                    b'O' => {
                        orphans.insert(ino);
                    }
                    _ => {}
                }
            }
        }
        // Entries.
        let mut bad_entries = vec![];
        for (dir, name, child, kind, cookie) in &dirents {
            let target_kind = seen
                .get(child)
                .and_then(|s| s.inode.as_ref())
                .map(|i| i.kind);
            match target_kind {
                None => {
                    r.problems.push(format!(
                        "entry {:?} in directory {dir} points at missing inode {child}",
                        String::from_utf8_lossy(name)
                    ));
                    bad_entries.push((*dir, name.clone(), *cookie));
                    continue;
                }
                Some(k) if k != *kind => r.problems.push(format!(
                    "entry {:?} in directory {dir} says {kind:?}, inode {child} is {k:?}",
                    String::from_utf8_lossy(name)
                )),
                _ => {}
            }
            if !cookies.contains(&(*dir, *cookie)) {
                r.problems.push(format!(
                    "entry {:?} in directory {dir} has no readdir record",
                    String::from_utf8_lossy(name)
                ));
            }
            let s = seen.entry(*child).or_default();
            s.names += 1;
            let d = seen.entry(*dir).or_default();
            d.entries += 1;
            if *kind == Kind::Dir {
                d.subdirs += 1;
            }
        }
        // Reachability from the root.
        let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
        for (dir, _, child, _, _) in &dirents {
            children.entry(*dir).or_default().push(*child);
        }
        let mut stack = vec![ROOT_INO];
        while let Some(d) = stack.pop() {
            let s = seen.entry(d).or_default();
            if s.reachable {
                continue;
            }
            s.reachable = true;
            if let Some(c) = children.get(&d) {
                stack.extend(c.iter().copied());
            }
        }
        // Per inode.
        let mut fixes: Vec<Inode> = vec![];
        let mut lost: Vec<u64> = vec![];
        for (ino, s) in &seen {
            let Some(i) = &s.inode else { continue };
            r.inodes += 1;
            let mut fixed = i.clone();
            let want_links = if i.kind == Kind::Dir {
                r.directories += 1;
                2 + s.subdirs
            } else {
                s.names
            };
            if !s.reachable && !orphans.contains(ino) {
                r.problems
                    .push(format!("inode {ino} is not reachable from the root"));
                lost.push(*ino);
            }
            if i.nlink != want_links && !(orphans.contains(ino) && s.names == 0) {
                r.problems.push(format!(
                    "inode {ino} has link count {}, names say {want_links}",
                    i.nlink
                ));
                fixed.nlink = want_links.max(1);
            }
            if i.blocks != s.extent_blocks {
                r.problems.push(format!(
                    "inode {ino} counts {} blocks, its extents hold {}",
                    i.blocks, s.extent_blocks
                ));
                fixed.blocks = s.extent_blocks;
            }
            if i.kind == Kind::Dir && i.size != s.entries {
                r.problems.push(format!(
                    "directory {ino} says {} entries, holds {}",
                    i.size, s.entries
                ));
                fixed.size = s.entries;
            }
            if fixed != *i {
                fixes.push(fixed);
            }
        }
        // The bitmap against the owners.
        let mut wrong_bits: Vec<(u64, bool)> = vec![];
        for idx in 0..geo.bitmap_blocks {
            let img = self.store.read(BITMAP_START + idx)?;
            let first = idx * BITS_PER_BLOCK;
            for bit in 0..BITS_PER_BLOCK {
                let b = first + bit;
                let used = img[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
                let should = b < geo.data_start() || b >= geo.blocks || owner.contains_key(&b);
                if used != should {
                    wrong_bits.push((b, should));
                }
            }
        }
        r.blocks_in_use = owner.len() as u64;
        for (b, should) in wrong_bits.iter().take(20) {
            r.problems.push(if *should {
                format!("block {b} is in use but free in the bitmap")
            } else {
                format!("block {b} is marked used but nothing owns it (leaked)")
            });
        }
        if wrong_bits.len() > 20 {
            r.problems
                .push(format!("... {} bitmap mismatches in all", wrong_bits.len()));
        }
        if !repair || r.problems.is_empty() {
            return Ok(r);
        }
        self.run(|fs| {
            for (b, should) in &wrong_bits {
                fs.alloc.set_bit(&mut fs.store, *b, *should)?;
            }
            for (dir, name, cookie) in &bad_entries {
                fs.bt_del(&dirent_key(*dir, name))?;
                fs.bt_del(&cookie_key(*dir, *cookie))?;
            }
            for i in &fixes {
                fs.put_inode(i)?;
            }
            Ok(())
        })?;
        if !lost.is_empty() {
            let lf = match self.lookup(ROOT_INO, b"lost+found") {
                Ok(i) => i.ino,
                Err(FsError::NotFound) => {
                    self.create(
                        ROOT_INO,
                        b"lost+found",
                        libc::S_IFDIR | 0o700,
                        0,
                        Cred { uid: 0, gid: 0 },
                        None,
                    )?
                    .ino
                }
                Err(e) => return Err(e),
            };
            for ino in lost {
                self.adopt(lf, ino)?;
            }
        }
        r.repaired = true;
        Ok(r)
    }

    /// Links an unreachable inode into `dir` as `#<ino>`.
    fn adopt(&mut self, dir: u64, ino: u64) -> Result<()> {
        self.run(|fs| {
            let name = format!("#{ino}");
            let mut d = fs.getattr(dir)?;
            let mut i = fs.getattr(ino)?;
            let cookie = d.next_cookie.max(crate::fs::FIRST_COOKIE);
            d.next_cookie = cookie + 1;
            fs.bt_put(
                &dirent_key(dir, name.as_bytes()),
                &dirent_value(ino, i.kind, cookie),
            )?;
            fs.bt_put(
                &cookie_key(dir, cookie),
                &cookie_value(ino, i.kind, name.as_bytes()),
            )?;
            d.size += 1;
            if i.kind == Kind::Dir {
                d.nlink += 1;
                fs.bt_put(&parent_key(ino), &dir.to_le_bytes())?;
            } else {
                i.nlink = i.nlink.max(1);
            }
            fs.put_inode(&d)?;
            fs.put_inode(&i)
        })
    }
}

impl Alloc {
    /// Sets one block's bit (fsck repair), keeping the free counts right.
    pub(crate) fn set_bit(
        &mut self,
        store: &mut crate::format::pages::PageStore,
        b: u64,
        used: bool,
    ) -> Result<()> {
        self.set_range(store, b, 1, used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{BlockDev, FileDev};
    use crate::fs::{RenameMode, SetAttr};
    use std::sync::Arc;

    const ME: Cred = Cred { uid: 1, gid: 1 };
    const FILE: u32 = libc::S_IFREG | 0o644;
    const DIR: u32 = libc::S_IFDIR | 0o755;

    struct Vol {
        dev: Arc<dyn BlockDev>,
        _dir: tempfile::TempDir,
    }

    impl Vol {
        fn open(&self) -> Fs {
            Fs::open(self.dev.clone()).unwrap()
        }
    }

    fn volume(size: u64) -> Vol {
        let dir = tempfile::tempdir().unwrap();
        let dev: Arc<dyn BlockDev> =
            Arc::new(FileDev::create(&dir.path().join("vol"), size).unwrap());
        Fs::format(dev.clone(), [1; 16]).unwrap();
        Vol { dev, _dir: dir }
    }

    #[test]
    fn fsck_is_clean_after_work_and_finds_and_repairs_damage() {
        let v = volume(64 << 20);
        let mut fs = v.open();
        let d = fs.create(ROOT_INO, b"d", DIR, 0, ME, None).unwrap();
        for i in 0..300 {
            let f = fs
                .create(d.ino, format!("f{i}").as_bytes(), FILE, 0, ME, None)
                .unwrap();
            fs.write(f.ino, 0, &vec![i as u8; 5000], false).unwrap();
        }
        let f1 = fs.lookup(d.ino, b"f1").unwrap().ino;
        fs.link(f1, ROOT_INO, b"hard").unwrap();
        for i in (0..300).step_by(3) {
            if let Some(o) = fs.unlink(d.ino, format!("f{i}").as_bytes()).unwrap() {
                fs.destroy(o).unwrap();
            }
        }
        fs.rename(d.ino, b"f1", ROOT_INO, b"moved", RenameMode::Replace)
            .unwrap();
        let r = fs.fsck(false).unwrap();
        assert!(r.clean(), "{:?}", r.problems);
        assert_eq!(r.inodes, 2 + 200);

        // Damage: a wrong link count, a leaked block, a lost directory.
        let f = fs.lookup(d.ino, b"f2").unwrap();
        fs.setattr(
            f.ino,
            &SetAttr {
                ..Default::default()
            },
        )
        .unwrap();
        let lost = fs.create(d.ino, b"lost", DIR, 0, ME, None).unwrap();
        // Edit records behind the operations' back.
        fs.run(|fs| {
            let mut i = fs.getattr(f.ino)?;
            i.nlink = 7;
            fs.put_inode(&i)?;
            let (_, _, cookie) = parse_dirent(&fs.bt_get(&dirent_key(d.ino, b"lost"))?.unwrap())?;
            fs.bt_del(&dirent_key(d.ino, b"lost"))?;
            fs.bt_del(&cookie_key(d.ino, cookie))?;
            let (b, _) = fs.alloc.alloc(&mut fs.store, 1, 0)?;
            assert!(b > 0);
            Ok(())
        })
        .unwrap();
        drop(fs);
        let mut fs = v.open();
        let r = fs.fsck(false).unwrap();
        assert!(!r.clean());
        let all = r.problems.join("\n");
        assert!(all.contains("link count 7"), "{all}");
        assert!(
            all.contains(&format!("inode {} is not reachable", lost.ino)),
            "{all}"
        );
        assert!(all.contains("leaked"), "{all}");
        let r = fs.fsck(true).unwrap();
        assert!(r.repaired);
        let r = fs.fsck(false).unwrap();
        assert!(r.clean(), "after repair: {:?}", r.problems);
        let lf = fs.lookup(ROOT_INO, b"lost+found").unwrap();
        assert_eq!(
            fs.lookup(lf.ino, format!("#{}", lost.ino).as_bytes())
                .unwrap()
                .ino,
            lost.ino
        );
        assert_eq!(fs.getattr(f.ino).unwrap().nlink, 1);
    }
}
