//! Shared volumes across a coordinator's restart, death or `kill -9`: mounts pause and
//! go on, the namespace stays clean, a retried create does not run twice, and a file
//! unlinked while open survives.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use shoal_tests::shared_vols::*;
use shoal_tests::{require_root, Cluster, Opts};

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
