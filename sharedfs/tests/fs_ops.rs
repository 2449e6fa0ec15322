//! The namespace operations on a file-backed volume: what a POSIX application relies
//! on, and that every committed change survives a reopen (journal replay).

use std::sync::Arc;

use shoal_sharedfs::dev::{BlockDev, FileDev};
use shoal_sharedfs::format::inode::{Kind, ROOT_INO};
use shoal_sharedfs::fs::{Cred, Fs, RenameMode, SetAttr, FIRST_COOKIE};
use shoal_sharedfs::FsError;

const ME: Cred = Cred {
    uid: 1000,
    gid: 100,
};
const FILE: u32 = libc::S_IFREG | 0o644;
const DIR: u32 = libc::S_IFDIR | 0o755;

struct Vol {
    dev: Arc<dyn BlockDev>,
    _dir: tempfile::TempDir,
}

fn volume(size: u64) -> Vol {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::create(&dir.path().join("vol"), size).unwrap());
    Fs::format(dev.clone(), [9; 16]).unwrap();
    Vol { dev, _dir: dir }
}

impl Vol {
    fn open(&self) -> Fs {
        Fs::open(self.dev.clone()).unwrap()
    }
}

fn names(fs: &mut Fs, dir: u64) -> Vec<String> {
    let mut out = vec![];
    let mut cookie = 0;
    loop {
        let batch = fs.readdir(dir, cookie, 100).unwrap();
        if batch.is_empty() {
            return out;
        }
        for e in batch {
            out.push(String::from_utf8(e.name).unwrap());
            cookie = e.cookie + 1;
        }
    }
}

#[test]
fn tree_operations_persist_across_reopen() {
    let v = volume(64 << 20);
    {
        let mut fs = v.open();
        let d = fs.create(ROOT_INO, b"dir", DIR, 0, ME, None).unwrap();
        assert_eq!((d.kind, d.nlink, d.uid, d.gid), (Kind::Dir, 2, 1000, 100));
        let f = fs.create(d.ino, b"file", FILE, 0, ME, None).unwrap();
        fs.write(f.ino, 0, b"hello", false).unwrap();
        let l = fs
            .create(ROOT_INO, b"link", 0, 0, ME, Some(b"dir/file"))
            .unwrap();
        assert_eq!(l.kind, Kind::Symlink);
        assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
        assert_eq!(
            fs.create(d.ino, b"file", FILE, 0, ME, None).unwrap_err(),
            FsError::Exists
        );
        // Dropped without a checkpoint: only the journal has it.
    }
    let mut fs = v.open();
    let d = fs.lookup(ROOT_INO, b"dir").unwrap();
    let f = fs.lookup(d.ino, b"file").unwrap();
    assert_eq!(fs.read(f.ino, 0, 100).unwrap(), b"hello");
    let l = fs.lookup(ROOT_INO, b"link").unwrap();
    assert_eq!(fs.readlink(l.ino).unwrap(), b"dir/file");
    assert_eq!(names(&mut fs, ROOT_INO), vec!["dir", "link"]);
    assert_eq!(fs.rmdir(ROOT_INO, b"dir").unwrap_err(), FsError::NotEmpty);
    assert_eq!(fs.unlink(ROOT_INO, b"dir").unwrap_err(), FsError::IsDir);
    assert_eq!(fs.rmdir(d.ino, b"file").unwrap_err(), FsError::NotDir);
    let gone = fs.unlink(d.ino, b"file").unwrap();
    assert_eq!(gone, Some(f.ino), "last link: the caller frees it");
    fs.destroy(f.ino).unwrap();
    fs.rmdir(ROOT_INO, b"dir").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    assert_eq!(fs.lookup(ROOT_INO, b"dir").unwrap_err(), FsError::NotFound);
    assert_eq!(fs.getattr(f.ino).unwrap_err(), FsError::NotFound);
}

#[test]
fn file_data_sparse_unaligned_and_truncated() {
    let v = volume(64 << 20);
    let mut fs = v.open();
    let f = fs.create(ROOT_INO, b"f", FILE, 0, ME, None).unwrap();
    let free0 = fs.statfs().free;
    // Unaligned write across block edges.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs.write(f.ino, 1000, &data, false).unwrap();
    let back = fs.read(f.ino, 0, 20_000).unwrap();
    assert_eq!(back.len(), 11_000);
    assert!(back[..1000].iter().all(|b| *b == 0));
    assert_eq!(&back[1000..], &data[..]);
    // Overwrite in the middle keeps the rest.
    fs.write(f.ino, 5000, b"XYZ", false).unwrap();
    let back = fs.read(f.ino, 4999, 5).unwrap();
    assert_eq!(back, vec![data[3999], b'X', b'Y', b'Z', data[4003]]);
    // Sparse far beyond 4 GiB: no space for the hole.
    let at = 6u64 << 30;
    let i = fs.write(f.ino, at, b"far", false).unwrap();
    assert_eq!(i.size, at + 3);
    assert_eq!(fs.read(f.ino, at - 2, 10).unwrap(), b"\0\0far");
    assert_eq!(fs.read(f.ino, 3 << 30, 4).unwrap(), vec![0; 4]);
    assert!(
        free0 - fs.statfs().free <= 8,
        "sparse: {} blocks",
        free0 - fs.statfs().free
    );
    // Truncate down into the middle of a block, then grow: the tail reads zeros.
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(1500),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs.statfs().free, free0 - 1, "only the first block stays");
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(9000),
            ..Default::default()
        },
    )
    .unwrap();
    let back = fs.read(f.ino, 0, 9000).unwrap();
    assert_eq!(&back[1000..1500], &data[..500]);
    assert!(
        back[1500..].iter().all(|b| *b == 0),
        "no old bytes come back"
    );
    // Append goes to the current end whatever the offset says.
    let i = fs.write(f.ino, 0, b"END", true).unwrap();
    assert_eq!(i.size, 9003);
    assert_eq!(fs.read(f.ino, 9000, 3).unwrap(), b"END");
    assert_eq!(
        fs.write(f.ino, (1 << 44) - 1, b"xx", false).unwrap_err(),
        FsError::TooBig
    );
}

#[test]
fn sequential_writes_make_few_extents_and_read_back() {
    let v = volume(256 << 20);
    let mut fs = v.open();
    let f = fs.create(ROOT_INO, b"big", FILE, 0, ME, None).unwrap();
    let chunk: Vec<u8> = (0..(128 << 10)).map(|i| (i * 7 % 256) as u8).collect();
    for k in 0..400u64 {
        fs.write(f.ino, k * chunk.len() as u64, &chunk, false)
            .unwrap();
    }
    let i = fs.getattr(f.ino).unwrap();
    assert_eq!(i.size, 400 * chunk.len() as u64);
    assert_eq!(i.blocks, i.size / 4096);
    let back = fs
        .read(f.ino, 37 * chunk.len() as u64 + 5, 1 << 20)
        .unwrap();
    assert_eq!(back.len(), 1 << 20);
    assert_eq!(back[0], chunk[5]);
    // Freed space comes back when the file goes.
    let before = fs.statfs().free;
    let gone = fs.unlink(ROOT_INO, b"big").unwrap().unwrap();
    fs.destroy(gone).unwrap();
    assert_eq!(fs.statfs().free, before + i.blocks);
}

#[test]
fn rename_replaces_moves_exchanges_and_refuses_loops() {
    let v = volume(64 << 20);
    let mut fs = v.open();
    let a = fs.create(ROOT_INO, b"a", DIR, 0, ME, None).unwrap();
    let b = fs.create(ROOT_INO, b"b", DIR, 0, ME, None).unwrap();
    let x = fs.create(a.ino, b"x", FILE, 0, ME, None).unwrap();
    let y = fs.create(b.ino, b"y", FILE, 0, ME, None).unwrap();
    fs.write(x.ino, 0, b"x-data", false).unwrap();
    // Over an existing file in another directory: the old target loses its last link.
    let orphan = fs
        .rename(a.ino, b"x", b.ino, b"y", RenameMode::Replace)
        .unwrap();
    assert_eq!(orphan, Some(y.ino));
    let moved = fs.lookup(b.ino, b"y").unwrap();
    assert_eq!(moved.ino, x.ino);
    assert_eq!(fs.read(moved.ino, 0, 10).unwrap(), b"x-data");
    assert_eq!(fs.lookup(a.ino, b"x").unwrap_err(), FsError::NotFound);
    // A directory into its own subtree.
    let sub = fs.create(a.ino, b"sub", DIR, 0, ME, None).unwrap();
    assert!(matches!(
        fs.rename(ROOT_INO, b"a", sub.ino, b"a2", RenameMode::Replace),
        Err(FsError::Invalid(_))
    ));
    // A directory across parents moves its ".." link count.
    fs.rename(a.ino, b"sub", b.ino, b"sub", RenameMode::Replace)
        .unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 3);
    assert_eq!(fs.parent_of(sub.ino).unwrap(), b.ino);
    // No-replace and exchange.
    let z = fs.create(a.ino, b"z", FILE, 0, ME, None).unwrap();
    assert_eq!(
        fs.rename(a.ino, b"z", b.ino, b"y", RenameMode::NoReplace)
            .unwrap_err(),
        FsError::Exists
    );
    fs.rename(a.ino, b"z", b.ino, b"sub", RenameMode::Exchange)
        .unwrap();
    assert_eq!(fs.lookup(b.ino, b"sub").unwrap().ino, z.ino);
    assert_eq!(fs.lookup(a.ino, b"z").unwrap().ino, sub.ino);
    assert_eq!(fs.parent_of(sub.ino).unwrap(), a.ino);
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 3);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 2);
    // A directory over a non-empty one, a file over a directory.
    let c = fs.create(ROOT_INO, b"c", DIR, 0, ME, None).unwrap();
    assert_eq!(
        fs.rename(ROOT_INO, b"c", ROOT_INO, b"a", RenameMode::Replace)
            .unwrap_err(),
        FsError::NotEmpty
    );
    assert_eq!(
        fs.rename(b.ino, b"y", ROOT_INO, b"c", RenameMode::Replace)
            .unwrap_err(),
        FsError::IsDir
    );
    let _ = c;
}

#[test]
fn hard_links_count_and_orphans_are_freed_at_reopen() {
    let v = volume(64 << 20);
    let free_before;
    {
        let mut fs = v.open();
        free_before = fs.statfs().free;
        let f = fs.create(ROOT_INO, b"f", FILE, 0, ME, None).unwrap();
        fs.write(f.ino, 0, &vec![1u8; 1 << 20], false).unwrap();
        let l = fs.link(f.ino, ROOT_INO, b"g").unwrap();
        assert_eq!(l.nlink, 2);
        assert_eq!(fs.unlink(ROOT_INO, b"f").unwrap(), None);
        assert_eq!(fs.getattr(f.ino).unwrap().nlink, 1);
        // Last name gone while "open": an orphan that still reads.
        assert_eq!(fs.unlink(ROOT_INO, b"g").unwrap(), Some(f.ino));
        assert_eq!(fs.read(f.ino, 0, 4).unwrap(), vec![1u8; 4]);
        assert_eq!(fs.orphans().unwrap(), vec![f.ino]);
        assert!(fs.statfs().free < free_before);
        // The node stops before the last close.
    }
    let mut fs = v.open();
    assert!(fs.orphans().unwrap().is_empty());
    assert_eq!(fs.statfs().free, free_before, "orphan freed at open");
}

#[test]
fn many_orphans_are_freed_in_one_go_and_linked_inodes_are_left_alone() {
    let v = volume(64 << 20);
    let mut fs = v.open();
    let free_before = fs.statfs().free;
    let mut gone = vec![];
    for i in 0..100u32 {
        let name = format!("f{i}");
        let f = fs
            .create(ROOT_INO, name.as_bytes(), FILE, 0, ME, None)
            .unwrap();
        fs.write(f.ino, 0, &vec![2u8; 20_000], false).unwrap();
        gone.push(fs.unlink(ROOT_INO, name.as_bytes()).unwrap().unwrap());
    }
    let kept = fs.create(ROOT_INO, b"kept", FILE, 0, ME, None).unwrap();
    fs.write(kept.ino, 0, b"still here", false).unwrap();
    gone.push(kept.ino);
    gone.push(999_999); // already gone: only its orphan record (none) is dropped
    fs.destroy_many(&gone).unwrap();
    assert!(fs.orphans().unwrap().is_empty());
    assert_eq!(fs.read(kept.ino, 0, 10).unwrap(), b"still here");
    assert_eq!(fs.getattr(gone[0]).unwrap_err(), FsError::NotFound);
    let lost = free_before - fs.statfs().free;
    assert!(lost < 20, "the data came back ({lost} blocks still used)");
    drop(fs);
    let mut fs = v.open();
    assert_eq!(names(&mut fs, ROOT_INO), vec!["kept"]);
}

#[test]
fn a_large_directory_pages_stably() {
    let v = volume(256 << 20);
    let mut fs = v.open();
    let d = fs.create(ROOT_INO, b"d", DIR, 0, ME, None).unwrap();
    let n: u32 = std::env::var("DIR_ENTRIES")
        .map(|v| v.parse().unwrap())
        .unwrap_or(100_000);
    for i in 0..n {
        fs.create(d.ino, format!("file-{i:06}").as_bytes(), FILE, 0, ME, None)
            .unwrap();
    }
    assert_eq!(fs.getattr(d.ino).unwrap().size, n as u64);
    // Page through while entries are removed and added: every entry that existed
    // throughout is returned exactly once.
    let mut seen = std::collections::HashSet::new();
    let mut cookie = 0;
    let mut round = 0u32;
    loop {
        let batch = fs.readdir(d.ino, cookie, 1000).unwrap();
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            assert!(seen.insert(e.name.clone()), "duplicate {:?}", e.name);
            cookie = e.cookie + 1;
        }
        // Churn: delete an entry already returned, add a new one (which may or may
        // not show up later in this pass).
        if round < 50 {
            fs.unlink(d.ino, &batch[0].name).unwrap();
            fs.create(d.ino, format!("new-{round}").as_bytes(), FILE, 0, ME, None)
                .unwrap();
            round += 1;
        }
    }
    for i in 0..n {
        assert!(seen.contains(format!("file-{i:06}").as_bytes()));
    }
    assert!(cookie > FIRST_COOKIE);
    fs.lookup(d.ino, format!("file-{:06}", n - 1).as_bytes())
        .unwrap();
    assert_eq!(fs.readdir(d.ino, (n / 2) as u64, 10).unwrap().len(), 10);
}

#[test]
fn a_full_volume_refuses_cleanly_and_recovers() {
    let v = volume(16 << 20);
    let mut fs = v.open();
    let f = fs.create(ROOT_INO, b"fill", FILE, 0, ME, None).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match fs.write(f.ino, written, &chunk, false) {
            Ok(_) => written += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err, FsError::NoSpace);
    // The failed write changed nothing: size and content are what was acknowledged.
    assert_eq!(fs.getattr(f.ino).unwrap().size, written);
    assert_eq!(fs.read(f.ino, written - 4, 4).unwrap(), vec![7u8; 4]);
    // Metadata changes fail cleanly too, or succeed; freeing makes room again.
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    fs.write(f.ino, 0, &chunk, false).unwrap();
    drop(fs);
    let mut fs = v.open();
    assert_eq!(fs.read(f.ino, 0, 4).unwrap(), vec![7u8; 4]);
}

#[test]
fn xattrs_modes_times_and_special_files() {
    let v = volume(64 << 20);
    let mut fs = v.open();
    let f = fs.create(ROOT_INO, b"f", FILE, 0, ME, None).unwrap();
    fs.setxattr(f.ino, b"user.a", b"1", false, false).unwrap();
    assert_eq!(
        fs.setxattr(f.ino, b"user.a", b"2", true, false)
            .unwrap_err(),
        FsError::Exists
    );
    assert_eq!(
        fs.setxattr(f.ino, b"user.b", b"2", false, true)
            .unwrap_err(),
        FsError::NoAttr
    );
    fs.setxattr(f.ino, b"user.b", &[0u8; 1000], false, false)
        .unwrap();
    assert_eq!(
        fs.listxattr(f.ino).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    assert_eq!(fs.getxattr(f.ino, b"user.a").unwrap(), b"1");
    fs.removexattr(f.ino, b"user.a").unwrap();
    assert_eq!(fs.getxattr(f.ino, b"user.a").unwrap_err(), FsError::NoAttr);
    let t = shoal_sharedfs::format::inode::Time {
        sec: 1_234_567_890,
        nsec: 123_456_789,
    };
    let i = fs
        .setattr(
            f.ino,
            &SetAttr {
                perm: Some(0o4711),
                uid: Some(5),
                gid: Some(6),
                mtime: Some(t),
                atime: Some(t),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        (i.mode(), i.uid, i.gid, i.mtime, i.atime),
        (libc::S_IFREG | 0o4711, 5, 6, t, t)
    );
    let fifo = fs
        .create(ROOT_INO, b"p", libc::S_IFIFO | 0o600, 0, ME, None)
        .unwrap();
    assert_eq!(fifo.kind, Kind::Fifo);
    let dev = fs
        .create(ROOT_INO, b"c", libc::S_IFCHR | 0o600, 0x0103, ME, None)
        .unwrap();
    assert_eq!((dev.kind, dev.rdev), (Kind::CharDev, 0x0103));
    // A setgid directory hands its group down, and the bit to subdirectories.
    let sg = fs
        .create(
            ROOT_INO,
            b"sg",
            libc::S_IFDIR | 0o2775,
            0,
            Cred { uid: 1, gid: 50 },
            None,
        )
        .unwrap();
    let sub = fs.create(sg.ino, b"sub", DIR, 0, ME, None).unwrap();
    assert_eq!(sub.gid, 50);
    assert_ne!(sub.perm & libc::S_ISGID, 0);
    let long = vec![b'n'; 256];
    assert_eq!(
        fs.create(ROOT_INO, &long, FILE, 0, ME, None).unwrap_err(),
        FsError::NameTooLong
    );
    let target = vec![b't'; 3000];
    let s = fs.create(ROOT_INO, b"s", 0, 0, ME, Some(&target)).unwrap();
    assert_eq!(fs.readlink(s.ino).unwrap(), target);
}
