//! Absence is not evidence: a node pointed at an empty store, or at another cluster's,
//! refuses to start and leaves its replicas untouched; when a cluster's etcd is really
//! lost, `shoal cluster recover` on every node brings every volume back from the disks.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_tests::{require_root, sha256_file, shoal_bin, wait_until, Cluster, Opts};

/// Every replica file of every node, with its checksum.
fn replica_files(c: &Cluster) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for n in &c.nodes {
        let dir = n.data_dir.join("pool/replicas");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let sum = sha256_file(&f);
            out.push((f, sum));
        }
    }
    out
}

/// Runs `shoal` with `args` as a process that must exit within a minute.
fn run_to_exit(args: &[String]) -> (i32, String) {
    let mut child = Command::new(shoal_bin())
        .args(args)
        .env_remove("SHOAL_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (st.code().unwrap_or(-1), text);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`shoal {}` did not exit", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wipes the cluster's etcd: its data dir is removed and it starts again empty.
fn wipe_etcd(c: &mut Cluster) {
    let dir = c.path().join("etcd");
    let etcd = c.etcd.as_mut().unwrap();
    etcd.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    etcd.restart();
}

fn write_file(c: &Cluster, node: usize, volume: &str, mib: usize) -> String {
    let mnt = c.path().join(format!("mnt-{volume}"));
    c.shoal(node, &["volume", "mount", volume, mnt.to_str().unwrap()])
        .expect_ok("mount");
    let sum = shoal_tests::write_random_file(&mnt.join("data"), mib);
    c.shoal(node, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    sum
}

fn read_file(c: &Cluster, node: usize, volume: &str) -> String {
    let mnt = c.path().join(format!("mnt-{volume}-back"));
    c.shoal(node, &["volume", "mount", volume, mnt.to_str().unwrap()])
        .expect_ok("mount after recovery");
    let sum = sha256_file(&mnt.join("data"));
    c.shoal(node, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    sum
}

#[test]
fn an_empty_or_foreign_store_is_refused_and_recover_rebuilds_the_cluster() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    for (name, repl) in [("db", "2"), ("logs", "3")] {
        c.shoal(
            0,
            &[
                "volume", "create", name, "--size", "256M", "--repl", repl, "--fs", "ext4",
            ],
        )
        .expect_ok("create");
    }
    let db_sum = write_file(&c, 1, "db", 8);
    let logs_sum = write_file(&c, 2, "logs", 4);
    for i in 0..3 {
        c.stop(i);
    }
    let before = replica_files(&c);
    assert_eq!(
        before.len(),
        3 * 5,
        "data, version and activity-log files of 5 replicas"
    );

    // 1. An empty etcd: every node refuses and changes nothing.
    wipe_etcd(&mut c);
    for i in 0..3 {
        let (code, text) = run_to_exit(&c.nodes[i].args.clone());
        assert_ne!(code, 0, "node {i} started against an empty store:\n{text}");
        assert!(
            text.contains("no record of cluster \"test\"")
                && text.contains("shoal cluster recover"),
            "{text}"
        );
    }
    assert_eq!(replica_files(&c), before, "replicas untouched");

    // 2. Another cluster of the same name in that etcd: refused too.
    let mut stranger = c.node_args(3);
    let fresh = c.path().join("stranger");
    let at = stranger.iter().position(|a| a == "--data-dir").unwrap();
    stranger[at + 1] = fresh.display().to_string();
    let mut other = Command::new(shoal_bin())
        .args(&stranger)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the other cluster's node", || {
        fresh.join("cluster-uuid").exists()
    });
    let _ = other.kill();
    let _ = other.wait();
    let (code, text) = run_to_exit(&c.nodes[0].args.clone());
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("another cluster named \"test\""), "{text}");
    assert_eq!(replica_files(&c), before, "replicas untouched");

    // 3. The cluster's etcd is lost for good: recover from the disks, node by node.
    wipe_etcd(&mut c);
    let mut actions = Vec::new();
    for i in 0..3 {
        let mut args: Vec<String> = vec!["--json".into(), "cluster".into(), "recover".into()];
        args.extend(c.nodes[i].args[2..].iter().cloned());
        let (code, text) = run_to_exit(&args);
        assert_eq!(code, 0, "recover on node {i}:\n{text}");
        let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        for r in report.as_array().unwrap() {
            actions.push(r["action"].as_str().unwrap().to_string());
        }
    }
    actions.sort();
    assert_eq!(
        actions,
        ["created", "created", "updated", "updated", "updated"],
        "each volume created by its first holder, completed by the others"
    );
    assert_eq!(replica_files(&c), before, "recovery writes no replica");
    for i in 0..3 {
        c.restart(i);
    }
    c.wait_all_online();
    let list = c.json(0, &["volume", "list"]);
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["db", "logs"]);
    for name in ["db", "logs"] {
        let v = c.json(0, &["volume", "inspect", name]);
        for r in v["replicas"].as_array().unwrap() {
            assert_eq!(r["state"], "in-sync", "{v}");
        }
    }
    assert_eq!(read_file(&c, 2, "db"), db_sum);
    assert_eq!(read_file(&c, 0, "logs"), logs_sum);
}

#[test]
fn a_deleted_volumes_replica_is_freed_by_its_tombstone_and_an_unknown_one_is_kept() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "gone", "--size", "64M", "--repl", "2", "--fs", "ext4",
        ],
    )
    .expect_ok("create");
    write_file(&c, 0, "gone", 1);
    let id = c.json(0, &["volume", "inspect", "gone"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A replica file no record knows of (copied in by hand, say): never deleted.
    let stray = c.nodes[1]
        .data_dir
        .join("pool/replicas/0000feedbeef0000.img");
    std::fs::write(&stray, b"precious").unwrap();
    std::fs::write(stray.with_extension("ver"), b"").unwrap();
    c.shoal(0, &["volume", "detach", "gone"])
        .expect_ok("detach");
    c.kill(1);
    c.shoal(0, &["volume", "delete", "gone"])
        .expect_ok("delete");
    let replica = c.nodes[1].data_dir.join(format!("pool/replicas/{id}.img"));
    assert!(replica.exists());
    // Back: its garbage collector frees the deleted volume's replica (the tombstone says
    // so) and keeps the one nothing says anything about.
    c.restart(1);
    wait_until(Duration::from_secs(40), "the deleted replica freed", || {
        !replica.exists()
    });
    assert_eq!(std::fs::read(&stray).unwrap(), b"precious");
    assert!(c.log(1).contains("no volume record and no tombstone: kept"));
}

#[test]
fn a_replica_whose_files_were_lost_is_rebuilt_in_full_never_made_empty_in_sync() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "db", "--size", "64M", "--repl", "2", "--fs", "ext4",
        ],
    )
    .expect_ok("create");
    let sum = write_file(&c, 0, "db", 8);
    c.shoal(0, &["volume", "detach", "db"]).expect_ok("detach");
    let id = c.json(0, &["volume", "inspect", "db"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Node 1 loses its replica's files (a disk replaced, a directory wiped).
    c.stop(1);
    let dir = c.nodes[1].data_dir.join("pool/replicas");
    std::fs::remove_file(dir.join(format!("{id}.img"))).unwrap();
    std::fs::remove_file(dir.join(format!("{id}.ver"))).unwrap();
    c.restart(1);
    c.wait_all_online();
    // The next attach opens it and finds it missing: it leaves the in-sync set and is
    // copied in full (never made empty and counted in sync).
    let mnt = c.path().join("mnt-again");
    c.shoal(0, &["volume", "mount", "db", mnt.to_str().unwrap()])
        .expect_ok("mount");
    wait_until(Duration::from_secs(60), "the lost replica rebuilt", || {
        let v = c.json(0, &["volume", "inspect", "db"]);
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "in-sync")
            && dir.join(format!("{id}.img")).exists()
            && c.log(0).contains("rebuilt by a full resync")
    });
    c.shoal(0, &["volume", "unmount", mnt.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(0, &["volume", "detach", "db"]).expect_ok("detach");
    // Node 1 serves the volume from its own replica: the data is all there.
    assert_eq!(read_file(&c, 1, "db"), sum);
}
