//! Shared volumes: one namespace mounted on several nodes at once, over real node
//! processes, etcd and FUSE. Each check is what an application on one host relies on
//! about what another host did. Locks are in `shared_locks.rs`, coordinator failovers in
//! `shared_failover.rs`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use shoal_tests::shared_vols::*;
use shoal_tests::{require_root, Cluster, Opts};

#[test]
fn one_namespace_on_three_hosts_sees_every_change_at_once() {
    require_root!();
    let (c, m) = mounted_everywhere("web");
    // Exactly one node coordinates; the other mounts talk to it.
    let v = c.json(0, &["volume", "inspect", "web"]);
    assert!(v["attached_node"].as_str().is_some(), "{v}");
    assert_eq!(v["shared"], true);
    // inspect lists every mount: host and mountpoint.
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3, "{v}");
    for (i, p) in m.iter().enumerate() {
        assert!(
            sessions
                .iter()
                .any(|s| s["host"] == c.nodes[i].id() && s["mountpoint"] == p.to_str().unwrap()),
            "{v}"
        );
    }

    // Create on A, see on B and C.
    fs::create_dir_all(m[0].join("uploads/2026")).unwrap();
    fs::write(m[0].join("uploads/2026/a.txt"), b"first").unwrap();
    assert_eq!(fs::read(m[1].join("uploads/2026/a.txt")).unwrap(), b"first");
    assert!(m[2].join("uploads/2026").is_dir());

    // Write on B, read on A right after: size and bytes.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(m[1].join("uploads/blob"), &blob).unwrap();
    assert_eq!(
        fs::metadata(m[0].join("uploads/blob")).unwrap().len(),
        3_000_000
    );
    assert_eq!(fs::read(m[0].join("uploads/blob")).unwrap(), blob);
    // Overwrite in place on C: no stale bytes on A.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m[2].join("uploads/blob"))
        .unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(1_000_000)).unwrap();
    f.write_all(b"CHANGED").unwrap();
    drop(f);
    let back = fs::read(m[0].join("uploads/blob")).unwrap();
    assert_eq!(&back[1_000_000..1_000_007], b"CHANGED");
    assert_eq!(back.len(), 3_000_000);

    // Rename on A over an existing file, unlink on B: everyone agrees.
    fs::write(m[0].join("uploads/b.txt"), b"second").unwrap();
    fs::rename(m[0].join("uploads/2026/a.txt"), m[0].join("uploads/b.txt")).unwrap();
    assert_eq!(fs::read(m[2].join("uploads/b.txt")).unwrap(), b"first");
    assert!(!m[1].join("uploads/2026/a.txt").exists());
    fs::remove_file(m[1].join("uploads/b.txt")).unwrap();
    assert!(!m[0].join("uploads/b.txt").exists());
    let mut names: Vec<String> = fs::read_dir(m[2].join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["2026", "blob"]);

    // Symlinks, hard links, modes and ownership travel too.
    std::os::unix::fs::symlink("blob", m[0].join("uploads/link")).unwrap();
    assert_eq!(
        fs::read_link(m[1].join("uploads/link")).unwrap(),
        Path::new("blob")
    );
    fs::hard_link(m[0].join("uploads/blob"), m[0].join("uploads/hard")).unwrap();
    assert_eq!(fs::metadata(m[2].join("uploads/blob")).unwrap().nlink(), 2);
    std::os::unix::fs::chown(m[1].join("uploads/hard"), Some(1234), Some(99)).unwrap();
    let md = fs::metadata(m[0].join("uploads/blob")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 99));

    // df shows the volume's size.
    let st = nix::sys::statvfs::statvfs(&m[2]).unwrap();
    let total = st.blocks() * st.fragment_size();
    assert!(total > 1900 << 20 && total <= 2 << 30, "df size {total}");

    // Unmount one host; the others go on.
    c.shoal(1, &["volume", "unmount", m[1].to_str().unwrap()])
        .expect_ok("unmount");
    assert!(!is_mounted(&m[1]));
    assert_eq!(
        fs::read(m[2].join("uploads/hard")).unwrap().len(),
        3_000_000
    );
}

#[test]
fn appends_from_two_hosts_never_interleave_within_a_write() {
    require_root!();
    let (_c, m) = mounted_everywhere("log");
    let path_a = m[0].join("app.log");
    fs::write(&path_a, b"").unwrap();
    let writers: Vec<_> = (0..2)
        .map(|h| {
            let p = m[h].join("app.log");
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
                for i in 0..300 {
                    // One write() call per record.
                    let rec = format!("host{h}-{i:04}-{}\n", "x".repeat(100 + h * 50));
                    f.write_all(rec.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let text = fs::read_to_string(m[2].join("app.log")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 600, "every record is there, none overwritten");
    for l in &lines {
        let ok = (l.starts_with("host0-") && l.len() == 111)
            || (l.starts_with("host1-") && l.len() == 161);
        assert!(ok, "a torn record: {l:?}");
    }
}

#[test]
fn cached_attributes_are_recalled_before_a_change_returns() {
    require_root!();
    let (_c, m) = mounted_everywhere("attrs");
    let (a, b) = (m[1].join("f"), m[2].join("f"));
    fs::write(&a, b"").unwrap();
    for i in 1..=50u32 {
        // B looks (and may cache the attributes under a lease) ...
        let before = fs::metadata(&b).unwrap();
        assert_eq!(before.len(), (i as u64 - 1) * 100);
        // ... A changes size and mode ...
        let mut f = fs::OpenOptions::new().append(true).open(&a).unwrap();
        f.write_all(&[b'x'; 100]).unwrap();
        drop(f);
        let mode = if i % 2 == 0 { 0o640 } else { 0o604 };
        fs::set_permissions(&a, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        // ... and B's very next look sees both: no stale cached attributes.
        let after = fs::metadata(&b).unwrap();
        assert_eq!(after.len(), i as u64 * 100, "size after write {i}");
        assert_eq!(after.mode() & 0o777, mode, "mode after chmod {i}");
    }
    // A directory's attributes too: a create on A shows in B's view of the directory.
    let dir_b = fs::metadata(&m[2]).unwrap();
    fs::write(m[1].join("new"), b"1").unwrap();
    let dir_b2 = fs::metadata(&m[2]).unwrap();
    assert!(
        dir_b2.mtime_nsec() != dir_b.mtime_nsec() || dir_b2.mtime() != dir_b.mtime(),
        "directory mtime moved on B"
    );
}

#[test]
fn names_cached_on_one_host_follow_changes_made_on_another() {
    require_root!();
    let (_c, m) = mounted_everywhere("names");
    let (a, b, c) = (m[0].join("d"), m[1].join("d"), m[2].join("d"));
    // A makes the directory, so it knows every name in it (a missing name is answered
    // without asking the coordinator); C learns the names it looks up.
    fs::create_dir(&a).unwrap();
    for i in 0..25 {
        let (f, g, sub) = (format!("f{i}"), format!("g{i}"), format!("s{i}"));
        assert!(!a.join(&f).exists() && !c.join(&f).exists());
        // Another host creates it: the very next look on A and C finds it.
        fs::write(b.join(&f), i.to_string()).unwrap();
        assert_eq!(fs::read_to_string(a.join(&f)).unwrap(), i.to_string());
        assert_eq!(fs::read_to_string(c.join(&f)).unwrap(), i.to_string());
        // Renamed elsewhere: the old name is gone and the new one there.
        fs::rename(b.join(&f), b.join(&g)).unwrap();
        assert!(!a.join(&f).exists() && !c.join(&f).exists(), "old name {f}");
        assert_eq!(fs::read_to_string(a.join(&g)).unwrap(), i.to_string());
        assert!(c.join(&g).exists());
        // Unlinked elsewhere: gone.
        fs::remove_file(b.join(&g)).unwrap();
        assert!(!a.join(&g).exists() && !c.join(&g).exists(), "unlinked {g}");
        // A directory made and removed elsewhere.
        fs::create_dir(b.join(&sub)).unwrap();
        assert!(a.join(&sub).is_dir() && c.join(&sub).is_dir());
        fs::write(b.join(&sub).join("x"), b"x").unwrap();
        assert!(a.join(&sub).join("x").exists());
        fs::remove_file(b.join(&sub).join("x")).unwrap();
        fs::remove_dir(b.join(&sub)).unwrap();
        assert!(
            !a.join(&sub).exists() && !c.join(&sub).exists(),
            "rmdir {sub}"
        );
        // And the other way round: what A does in its own cached directory.
        fs::write(a.join(&f), b"mine").unwrap();
        assert_eq!(fs::read(b.join(&f)).unwrap(), b"mine");
        fs::remove_file(a.join(&f)).unwrap();
        assert!(!b.join(&f).exists() && !a.join(&f).exists());
    }
    // A created-then-replaced name: A must see the replacing inode, not its own.
    fs::write(a.join("r"), b"A's").unwrap();
    fs::write(b.join("r.tmp"), b"B's").unwrap();
    fs::rename(b.join("r.tmp"), b.join("r")).unwrap();
    assert_eq!(fs::read(a.join("r")).unwrap(), b"B's");
    let mut names: Vec<String> = fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["r"]);

    // A directory C reads whole (a stat loop over names it did not know makes it list
    // the directory with attributes) still follows changes made elsewhere.
    fs::create_dir(b.join("many")).unwrap();
    for i in 0..40 {
        fs::write(b.join(format!("many/m{i}")), format!("{i}")).unwrap();
    }
    for i in 0..40 {
        assert_eq!(
            fs::metadata(c.join(format!("many/m{i}"))).unwrap().len(),
            format!("{i}").len() as u64
        );
    }
    assert!(!c.join("many/none").exists());
    fs::write(b.join("many/new"), b"n").unwrap();
    assert!(c.join("many/new").exists(), "a name made after the listing");
    fs::remove_file(b.join("many/m7")).unwrap();
    assert!(
        !c.join("many/m7").exists(),
        "a name removed after the listing"
    );
    fs::write(b.join("many/m8"), b"longer").unwrap();
    assert_eq!(fs::metadata(c.join("many/m8")).unwrap().len(), 6);

    // Heartbeats renew the leases: what A and C learnt seconds ago (longer than a lease
    // lasts unrenewed) is still recalled when B changes it.
    fs::write(b.join("old"), b"1").unwrap();
    assert_eq!(fs::metadata(a.join("old")).unwrap().len(), 1);
    assert_eq!(fs::metadata(c.join("old")).unwrap().len(), 1);
    assert!(!a.join("later").exists() && !c.join("later").exists());
    std::thread::sleep(std::time::Duration::from_secs(5));
    fs::write(b.join("old"), b"22").unwrap();
    fs::write(b.join("later"), b"x").unwrap();
    assert_eq!(fs::metadata(a.join("old")).unwrap().len(), 2);
    assert_eq!(fs::metadata(c.join("old")).unwrap().len(), 2);
    assert!(a.join("later").exists() && c.join("later").exists());
}

#[test]
fn a_file_unlinked_on_one_host_stays_readable_where_it_is_open() {
    require_root!();
    let (_c, m) = mounted_everywhere("orphans");
    let data = vec![7u8; 4 << 20];
    fs::write(m[0].join("big"), &data).unwrap();
    let used = || {
        let st = nix::sys::statvfs::statvfs(&m[2]).unwrap();
        (st.blocks() - st.blocks_free()) * st.fragment_size()
    };
    let with_file = used();
    let mut f = fs::File::open(m[1].join("big")).unwrap();
    fs::remove_file(m[0].join("big")).unwrap();
    assert!(!m[2].join("big").exists(), "the name is gone everywhere");
    // Host B still reads the whole file through its open descriptor.
    let mut back = Vec::new();
    use std::io::Read;
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    assert!(used() >= with_file - (64 << 10), "space kept while open");
    drop(f);
    shoal_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the space to come back after the last close",
        || used() + (3 << 20) < with_file,
    );
}

#[test]
fn mount_t_fuse_shoal_and_umount_work_like_any_filesystem() {
    require_root!();
    // Installed as a user would, and left in place: the POSIX test remounts through it
    // at the same time (tests/run.sh removes it at the end).
    let helper = Path::new("/sbin/mount.fuse.shoal");
    if std::os::unix::fs::symlink(shoal_tests::shoal_bin(), helper).is_err()
        && fs::read_link(helper).ok() != Some(shoal_tests::shoal_bin())
    {
        eprintln!("SKIP: cannot install {}", helper.display());
        return;
    }
    let c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &["volume", "create", "fstab", "--size", "1G", "--shared"],
    )
    .expect_ok("create");
    let (a, b) = (c.path().join("a"), c.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    for (dir, node) in [(&a, 0), (&b, 1)] {
        let opts = format!(
            "rw,_netdev,endpoint={},credentials={}",
            c.nodes[node].endpoint(),
            c.credentials(node).display()
        );
        let out = std::process::Command::new("mount")
            .args(["-t", "fuse.shoal", "-o", &opts, "fstab"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t fuse.shoal: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(is_mounted(dir));
    }
    fs::write(a.join("x"), b"via mount(8)").unwrap();
    assert_eq!(fs::read(b.join("x")).unwrap(), b"via mount(8)");
    // A bad volume name is a clear mount error, not a hang.
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "fuse.shoal",
            "-o",
            &format!(
                "endpoint={},credentials={}",
                c.nodes[0].endpoint(),
                c.credentials(0).display()
            ),
            "nosuch",
        ])
        .arg(c.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{out:?}"
    );
    // umount(8), then mounting the same place again through the CLI.
    assert!(std::process::Command::new("umount")
        .arg(&b)
        .status()
        .unwrap()
        .success());
    assert!(!is_mounted(&b));
    c.shoal(1, &["volume", "mount", "fstab", b.to_str().unwrap()])
        .expect_ok("mount again after umount");
    assert_eq!(fs::read(b.join("x")).unwrap(), b"via mount(8)");
}

#[test]
fn renames_and_unlinks_racing_on_two_hosts_have_one_outcome_each() {
    require_root!();
    let (_c, m) = mounted_everywhere("races");
    let (a, b) = (m[0].clone(), m[1].clone());

    // Atomic replace (write a temporary file, rename it over the live one) on A while B
    // keeps reading: B always finds the file, always whole, never an older version
    // than one it saw.
    fs::write(a.join("current"), "v0000\n".repeat(2000)).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (wa, wd) = (a.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        for v in 1..=200 {
            let tmp = wa.join(format!(".tmp-{v}"));
            fs::write(&tmp, format!("v{v:04}\n").repeat(2000)).unwrap();
            fs::rename(&tmp, wa.join("current")).unwrap();
        }
        wd.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (mut last, mut reads) = (0u32, 0);
    while !done.load(std::sync::atomic::Ordering::SeqCst) || reads == 0 {
        let text = fs::read_to_string(b.join("current")).expect("the live file is always there");
        assert_eq!(text.len(), 12_000, "a partial version");
        let first = &text[..6];
        assert!(text.lines().all(|l| l == &first[..5]), "mixed versions");
        let v: u32 = first[1..5].parse().unwrap();
        assert!(v >= last, "went back from version {last} to {v}");
        last = v;
        reads += 1;
    }
    writer.join().unwrap();
    let text = fs::read_to_string(b.join("current")).unwrap();
    assert!(
        text.starts_with("v0200\n"),
        "B sees the last version once A is done"
    );

    // Both hosts unlink the same 100 files: each is removed exactly once.
    fs::create_dir(a.join("u")).unwrap();
    for i in 0..100 {
        fs::write(a.join(format!("u/f{i}")), b"x").unwrap();
    }
    let unlinkers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(h, root)| {
            std::thread::spawn(move || {
                let mut won = vec![];
                for k in 0..100 {
                    let i = if h == 0 { k } else { 99 - k };
                    match fs::remove_file(root.join(format!("u/f{i}"))) {
                        Ok(()) => won.push(i),
                        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
                    }
                }
                won
            })
        })
        .collect();
    let mut won: Vec<i32> = unlinkers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    won.sort();
    assert_eq!(
        won,
        (0..100).collect::<Vec<_>>(),
        "each unlink succeeds once"
    );
    assert_eq!(fs::read_dir(b.join("u")).unwrap().count(), 0);

    // Both hosts rename the same 100 files to names of their own: exactly one wins each.
    fs::create_dir(a.join("r")).unwrap();
    for i in 0..100 {
        fs::write(a.join(format!("r/src{i}")), format!("{i}")).unwrap();
    }
    let renamers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(h, root)| {
            std::thread::spawn(move || {
                let mut n = 0;
                for i in 0..100 {
                    let from = root.join(format!("r/src{i}"));
                    match fs::rename(&from, root.join(format!("r/h{h}-{i}"))) {
                        Ok(()) => n += 1,
                        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
                    }
                }
                n
            })
        })
        .collect();
    let wins: i32 = renamers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(wins, 100);
    for i in 0..100 {
        let h0 = a.join(format!("r/h0-{i}")).exists();
        let h1 = b.join(format!("r/h1-{i}")).exists();
        assert!(h0 ^ h1, "file {i}: renamed by both hosts or by none");
        let p = if h0 {
            format!("r/h0-{i}")
        } else {
            format!("r/h1-{i}")
        };
        assert_eq!(fs::read_to_string(m[2].join(p)).unwrap(), format!("{i}"));
    }
}
