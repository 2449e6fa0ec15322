//! Shared volumes: one namespace mounted on several nodes at once, over real node
//! processes, etcd and FUSE. Each check is what an application on one host relies on
//! about what another host did.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shoal_tests::{fcntl_lock, mounts, require_root, Cluster, Opts};

/// A shared volume with repl 2 on three nodes, mounted on every node.
fn mounted_everywhere(name: &str) -> (Cluster, Vec<PathBuf>) {
    let c = Cluster::start(3, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", name, "--size", "2G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create shared");
    let mut paths = vec![];
    for i in 0..3 {
        let p = c.path().join(format!("mnt-{i}"));
        let v = c.json(i, &["volume", "mount", name, p.to_str().unwrap()]);
        assert_eq!(v["mount_path"], p.to_str().unwrap());
        paths.push(p);
    }
    (c, paths)
}

/// Creates a shared volume with its two replicas pinned to nodes 1 and 2 and mounts it on
/// the first `hosts` nodes, node 0 (no replica) first, so node 0 coordinates it.
fn coordinated_by_node_0(c: &Cluster, name: &str, hosts: usize) -> Vec<PathBuf> {
    let pinned = format!("{},{}", c.nodes[1].id(), c.nodes[2].id());
    c.shoal(
        0,
        &[
            "volume", "create", name, "--size", "1G", "--repl", "2", "--shared", "--nodes", &pinned,
        ],
    )
    .expect_ok("create");
    let m: Vec<PathBuf> = (0..hosts)
        .map(|i| {
            let p = c.path().join(format!("mnt-{i}"));
            c.shoal(i, &["volume", "mount", name, p.to_str().unwrap()])
                .expect_ok("mount");
            p
        })
        .collect();
    assert_eq!(
        c.json(1, &["volume", "inspect", name])["attached_node"],
        c.nodes[0].id()
    );
    m
}

/// Kills node 0 (the coordinator of `name`) and waits until another node serves it.
fn kill_node_0_and_wait_for_a_new_coordinator(c: &mut Cluster, name: &str) {
    let dead = c.nodes[0].id();
    c.kill(0);
    shoal_tests::wait_until(
        std::time::Duration::from_secs(60),
        "a new coordinator",
        || {
            let v = c.json(1, &["volume", "inspect", name]);
            !v["attached_node"].is_null() && v["attached_node"] != dead.as_str()
        },
    );
}

fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(_, m)| Path::new(m) == p)
}

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
fn the_namespace_survives_a_coordinator_restart() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "keep", "--size", "1G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    let mnt = c.path().join("mnt");
    c.shoal(0, &["volume", "mount", "keep", mnt.to_str().unwrap()])
        .expect_ok("mount");
    for i in 0..200 {
        fs::write(mnt.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    let f = fs::File::open(mnt.join("f7")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // kill -9 the coordinator's node: no clean shutdown, no checkpoint.
    c.kill(0);
    shoal_tests::cleanup_mounts(&mnt);
    c.restart(0);
    c.wait_all_online();
    let mnt2 = c.path().join("mnt2");
    c.shoal(1, &["volume", "mount", "keep", mnt2.to_str().unwrap()])
        .expect_ok("mount after the restart");
    for i in 0..200 {
        assert_eq!(
            fs::read_to_string(mnt2.join(format!("f{i}"))).unwrap(),
            format!("content {i}"),
            "journal replayed"
        );
    }
}

/// Adds one to the number at the start of `f`.
fn increment(f: &mut fs::File) {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    let n: u64 = s.trim().parse().unwrap_or(0);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(format!("{:<12}", n + 1).as_bytes()).unwrap();
}

fn flock(f: &fs::File, op: i32) {
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op) }, 0, "flock");
}

/// Two hosts each add 1000 to one counter file under a lock: no update may be lost.
fn counter_under(lock: fn(&fs::File), unlock: fn(&fs::File), name: &str) {
    let (_c, m) = mounted_everywhere(name);
    fs::write(m[0].join("counter"), b"0").unwrap();
    let workers: Vec<_> = (0..2)
        .map(|h| {
            let p = m[h].join("counter");
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .unwrap();
                for _ in 0..1000 {
                    lock(&f);
                    increment(&mut f);
                    unlock(&f);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let v = fs::read_to_string(m[2].join("counter")).unwrap();
    assert_eq!(v.trim(), "2000", "lost updates");
}

#[test]
fn fcntl_locks_exclude_across_hosts() {
    require_root!();
    counter_under(
        |f| fcntl_lock(f, libc::F_WRLCK, true).unwrap(),
        |f| fcntl_lock(f, libc::F_UNLCK, false).unwrap(),
        "ctr-fcntl",
    );
}

#[test]
fn flock_excludes_across_hosts() {
    require_root!();
    counter_under(
        |f| flock(f, libc::LOCK_EX),
        |f| flock(f, libc::LOCK_UN),
        "ctr-flock",
    );
}

#[test]
fn a_blocked_lock_wakes_on_unlock_and_a_dead_hosts_lock_expires() {
    require_root!();
    let mut c = Cluster::start(
        3,
        Opts {
            extra_args: vec!["--session-lease".into(), "2".into()],
            ..Default::default()
        },
    );
    c.shoal(0, &["volume", "create", "lk", "--size", "1G", "--shared"])
        .expect_ok("create");
    let m: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = c.path().join(format!("mnt-{i}"));
            c.shoal(i, &["volume", "mount", "lk", p.to_str().unwrap()])
                .expect_ok("mount");
            p
        })
        .collect();
    let coordinator = c.json(0, &["volume", "inspect", "lk"])["attached_node"]
        .as_str()
        .unwrap()
        .to_string();
    let coord = (0..3).find(|&i| c.nodes[i].id() == coordinator).unwrap();
    let (a, b) = ((coord + 1) % 3, (coord + 2) % 3);
    fs::write(m[a].join("f"), b"x").unwrap();

    // A holds a write lock; B's non-blocking attempt fails, its F_GETLK sees A's lock.
    let fa = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[a].join("f"))
        .unwrap();
    fcntl_lock(&fa, libc::F_WRLCK, false).unwrap();
    let fb = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[b].join("f"))
        .unwrap();
    let err = fcntl_lock(&fb, libc::F_WRLCK, false).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "{err}"
    );
    // B blocks; A's unlock wakes it.
    let waiter = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        fcntl_lock(&fb, libc::F_WRLCK, true).unwrap();
        (t.elapsed(), fb)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!waiter.is_finished(), "B got the lock while A held it");
    fcntl_lock(&fa, libc::F_UNLCK, false).unwrap();
    let (_, fb) = waiter.join().unwrap();
    // Now B holds it, and B's host dies without unlocking: after the session lease the
    // coordinator frees the lock; a live host's lock was never broken before that.
    std::mem::forget(fb);
    assert!(fcntl_lock(&fa, libc::F_WRLCK, false).is_err(), "B holds it");
    let v = c.json(a, &["volume", "inspect", "lk"]);
    let b_session = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == c.nodes[b].id())
        .cloned()
        .unwrap();
    assert_eq!(b_session["locks"], 1, "{v}");
    c.kill(b);
    shoal_tests::wait_until(
        std::time::Duration::from_secs(20),
        "the dead host's lock to be released",
        || fcntl_lock(&fa, libc::F_WRLCK, false).is_ok(),
    );
}

#[test]
fn mounts_pause_and_continue_when_the_coordinator_node_dies() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "ha", "--size", "1G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    // The first mount makes its node the coordinator.
    let m0 = c.path().join("mnt-0");
    let m1 = c.path().join("mnt-1");
    c.shoal(0, &["volume", "mount", "ha", m0.to_str().unwrap()])
        .expect_ok("mount on the coordinator");
    c.shoal(1, &["volume", "mount", "ha", m1.to_str().unwrap()])
        .expect_ok("mount elsewhere");
    let v = c.json(1, &["volume", "inspect", "ha"]);
    assert_eq!(v["attached_node"], c.nodes[0].id());
    for i in 0..50 {
        fs::write(m1.join(format!("f{i}")), format!("before {i}")).unwrap();
    }

    c.kill(0);
    // The next operation on the surviving mount waits, then goes on: its node takes
    // the volume over once the cluster declares the old coordinator dead.
    let m1c = m1.clone();
    let t = std::time::Instant::now();
    let reader = std::thread::spawn(move || fs::read_to_string(m1c.join("f49")));
    let got = reader.join().unwrap().expect("no error, only a pause");
    assert_eq!(got, "before 49");
    eprintln!("paused for {:?}", t.elapsed());
    let v = c.json(1, &["volume", "inspect", "ha"]);
    assert_eq!(v["attached_node"], c.nodes[1].id(), "taken over");
    for i in 0..50 {
        assert_eq!(
            fs::read_to_string(m1.join(format!("f{i}"))).unwrap(),
            format!("before {i}")
        );
    }
    fs::write(m1.join("after"), b"still writable").unwrap();
    assert_eq!(fs::read(m1.join("after")).unwrap(), b"still writable");
    shoal_tests::cleanup_mounts(&m0);
}

#[test]
fn kill_9_of_the_coordinator_mid_workload_leaves_a_clean_namespace() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "crash", "--size", "1G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    let m0 = c.path().join("mnt-0");
    c.shoal(0, &["volume", "mount", "crash", m0.to_str().unwrap()])
        .expect_ok("mount");
    // A metadata-heavy writer: directories, files, renames, unlinks; some files are
    // fsynced, and those are remembered with their content.
    let synced = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(PathBuf, Vec<u8>)>::new()));
    let (s2, root) = (synced.clone(), m0.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for d in 0.. {
            let dir = root.join(format!("src/d{d:03}"));
            fs::create_dir_all(&dir)?;
            for f in 0..20 {
                let p = dir.join(format!("file{f}.rs"));
                let body = format!("// {d}/{f}\n{}", "fn main() {}\n".repeat(f * 7)).into_bytes();
                fs::write(&p, &body)?;
                if f % 5 == 0 {
                    fs::File::open(&p)?.sync_all()?;
                    s2.lock()
                        .unwrap()
                        .push((p.strip_prefix(&root).unwrap().to_path_buf(), body));
                }
            }
            fs::rename(dir.join("file1.rs"), dir.join("renamed.rs"))?;
            fs::remove_file(dir.join("file2.rs"))?;
        }
        Ok(())
    });
    std::thread::sleep(std::time::Duration::from_millis(2500));
    c.kill(0);
    let ended = writer.join().unwrap();
    assert!(ended.is_err(), "the writer stops when its node dies");
    shoal_tests::cleanup_mounts(&m0);
    let synced = synced.lock().unwrap().clone();
    assert!(
        synced.len() > 10,
        "the workload ran ({} fsynced files)",
        synced.len()
    );

    // The other node takes the volume over: the journal is replayed, fsck is clean, and
    // every fsynced file is intact.
    let m1 = c.path().join("mnt-1");
    shoal_tests::wait_until(
        std::time::Duration::from_secs(30),
        "node 1 to take the volume over",
        || {
            c.shoal(1, &["volume", "mount", "crash", m1.to_str().unwrap()])
                .ok
        },
    );
    let r = c.json(1, &["volume", "fsck", "crash"]);
    assert_eq!(r["clean"], true, "{r}");
    assert!(r["inodes"].as_u64().unwrap() > 20, "{r}");
    for (p, body) in &synced {
        assert_eq!(&fs::read(m1.join(p)).unwrap(), body, "{}", p.display());
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

/// Runs an SQL script with the sqlite3 shell on `root/app.db`; its output, trimmed.
/// Panics on any error message.
fn sql(root: &Path, script: &str) -> String {
    let mut child = std::process::Command::new("sqlite3")
        .arg(root.join("app.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "sqlite3 on {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// SQLite with its default rollback journal (no WAL) from two hosts at once: its
/// `fcntl` locks and its re-reads of the file header must see the other host's commits.
#[test]
fn sqlite_used_from_two_hosts_at_once_stays_consistent() {
    require_root!();
    if std::process::Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: needs sqlite3 (apt-get install sqlite3)");
        return;
    }
    let (_c, m) = mounted_everywhere("sqlite");
    sql(
        &m[0],
        "PRAGMA journal_mode=DELETE;\
         CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER);\
         INSERT INTO counter VALUES (1, 0);\
         CREATE TABLE log(host INTEGER, i INTEGER, n INTEGER);",
    );
    let hosts: Vec<_> = (0..2)
        .map(|h| {
            let root = m[h].clone();
            std::thread::spawn(move || {
                // One sqlite3 process per host, 150 write transactions that read the
                // counter and write it back: a lost or torn commit shows in the totals.
                let mut script = String::from(".timeout 30000\n");
                for i in 0..150 {
                    script.push_str(&format!(
                        "BEGIN IMMEDIATE;\
                         INSERT INTO log SELECT {h}, {i}, n FROM counter WHERE id = 1;\
                         UPDATE counter SET n = n + 1 WHERE id = 1;\
                         COMMIT;\n"
                    ));
                }
                sql(&root, &script);
            })
        })
        .collect();
    for h in hosts {
        h.join().unwrap();
    }
    for root in [&m[0], &m[1], &m[2]] {
        assert_eq!(sql(root, "PRAGMA integrity_check;"), "ok");
        assert_eq!(sql(root, "SELECT n FROM counter;"), "300");
        // Every transaction saw the previous one's counter: the values read are 0..299,
        // each once.
        assert_eq!(
            sql(
                root,
                "SELECT count(DISTINCT n), min(n), max(n), count(*) FROM log;"
            ),
            "300|0|299|300"
        );
    }
}

/// A process that exits (or closes the file) holding an `fcntl` lock loses it, as on a
/// local filesystem: the kernel keeps no record of a FUSE mount's locks and sends no
/// unlock, only the close (FLUSH), which must release them at the coordinator.
#[test]
fn a_process_that_exits_holding_a_posix_lock_releases_it_for_other_hosts() {
    require_root!();
    let (_c, m) = mounted_everywhere("exitlock");
    fs::write(m[0].join("db"), b"").unwrap();
    // A child on host A locks and exits without unlocking.
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os,fcntl; fd=os.open('{}',os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); os._exit(0)",
            m[0].join("db").display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[1].join("db"))
        .unwrap();
    fcntl_lock(&f, libc::F_WRLCK, false).expect("the exited process's lock was released");
    fcntl_lock(&f, libc::F_UNLCK, false).unwrap();
    // Closing any descriptor of the file drops the process's locks too (POSIX).
    let a1 = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m[0].join("db"))
        .unwrap();
    let a2 = fs::File::open(m[0].join("db")).unwrap();
    fcntl_lock(&a1, libc::F_WRLCK, false).unwrap();
    drop(a2);
    fcntl_lock(&f, libc::F_WRLCK, false).expect("released by the close of another descriptor");
    drop(a1);
}

#[test]
fn a_live_hosts_lock_survives_a_coordinator_failover() {
    require_root!();
    // The session lease (default 15 s) is also the new coordinator's grace period for
    // reclaims, and it must outlast the failover: a mount silent for longer than the
    // lease gives its locks up rather than reclaim them.
    let mut c = Cluster::start(3, Opts::default());
    let n1 = c.nodes[1].id();
    // Node 0 (no replica) coordinates; hosts 1 and 2 mount too.
    let m = coordinated_by_node_0(&c, "rl", 3);
    fs::write(m[1].join("f"), b"x").unwrap();
    let open = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    let fa = open(&m[1].join("f"));
    fcntl_lock(&fa, libc::F_WRLCK, false).unwrap();
    let fb = open(&m[2].join("f"));
    assert!(
        fcntl_lock(&fb, libc::F_WRLCK, false).is_err(),
        "host 1 holds it"
    );

    // The coordinator dies; host 1 stays alive and idle, holding its lock.
    kill_node_0_and_wait_for_a_new_coordinator(&mut c, "rl");
    // Host 2 asks: it waits out the grace period (host 1 reclaims in it) and is refused.
    let t = std::time::Instant::now();
    let err = fcntl_lock(&fb, libc::F_WRLCK, false).expect_err("a live host's lock was broken");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
        "{err}"
    );
    eprintln!("host 2's attempt answered after {:?}", t.elapsed());
    let v = c.json(1, &["volume", "inspect", "rl"]);
    let holder = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == n1.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("host 1 has a session at the new coordinator: {v}"));
    assert_eq!(holder["locks"], 1, "reclaimed at the new coordinator: {v}");
    // Host 1 lets go; now host 2 gets it.
    fcntl_lock(&fa, libc::F_UNLCK, false).unwrap();
    fcntl_lock(&fb, libc::F_WRLCK, false).expect("free once its holder unlocked");
    fcntl_lock(&fb, libc::F_UNLCK, false).unwrap();
    drop((fa, fb));
    shoal_tests::cleanup_mounts(&m[0]);
}

#[test]
fn a_create_whose_reply_was_lost_in_a_failover_is_not_run_twice() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    // Node 0 coordinates, holds no replica, and dies right after it commits the create
    // of "only-once", before its reply goes out.
    c.nodes[0].env.push((
        "SHOAL_FAILPOINTS".into(),
        "crash-after-commit=only-once".into(),
    ));
    c.restart(0);
    c.wait_all_online();
    let m = coordinated_by_node_0(&c, "once", 2);
    let (m0, m1) = (m[0].clone(), m[1].clone());
    let dead = c.nodes[0].id();
    fs::write(m1.join("before"), b"x").unwrap();

    // O_EXCL: run twice, the second run would fail with EEXIST.
    let t = std::time::Instant::now();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m1.join("only-once"))
        .expect("the create succeeded once; its retry must not fail");
    eprintln!("create answered after {:?}", t.elapsed());
    f.write_all(b"mine").unwrap();
    drop(f);
    assert!(!c.nodes[0].running(), "the failpoint fired");
    let v = c.json(1, &["volume", "inspect", "once"]);
    assert!(
        !v["attached_node"].is_null() && v["attached_node"] != dead.as_str(),
        "taken over: {v}"
    );
    assert!(
        c.log(1).contains("recorded outcome") || c.log(2).contains("recorded outcome"),
        "answered from the record"
    );
    assert_eq!(fs::read(m1.join("only-once")).unwrap(), b"mine");
    let names: Vec<String> = fs::read_dir(&m1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| *n == "only-once").count(),
        1,
        "{names:?}"
    );
    // It really exists: a new exclusive create fails.
    let again = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m1.join("only-once"));
    assert_eq!(
        again.expect_err("exists").raw_os_error(),
        Some(libc::EEXIST)
    );
    shoal_tests::cleanup_mounts(&m0);
}

/// Free blocks of the filesystem at `p` (statvfs).
fn free_blocks(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p).unwrap().blocks_free() as u64
}

#[test]
fn a_file_unlinked_while_open_survives_a_coordinator_failover() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    let m = coordinated_by_node_0(&c, "uo", 3);
    let body: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    fs::write(m[1].join("scratch"), &body).unwrap();
    let before = free_blocks(&m[1]);
    // Host 1 keeps it open; host 2 unlinks it (the scratch-file pattern).
    let mut f = fs::File::open(m[1].join("scratch")).unwrap();
    fs::remove_file(m[2].join("scratch")).unwrap();
    assert!(!m[1].join("scratch").exists());

    kill_node_0_and_wait_for_a_new_coordinator(&mut c, "uo");
    // Past the new coordinator's grace period (one session lease, 15 s): by then it has
    // freed every unlinked file no mount said it had open.
    std::thread::sleep(std::time::Duration::from_secs(17));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut got).expect("the open file still reads");
    assert!(got == body, "the open file's bytes after the failover");
    // Its last close frees it.
    drop(f);
    shoal_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the file's blocks to be freed at its last close",
        || free_blocks(&m[1]) >= before + 1000,
    );
    let r = c.json(1, &["volume", "fsck", "uo"]);
    assert_eq!(r["clean"], true, "{r}");
    shoal_tests::cleanup_mounts(&m[0]);
}
