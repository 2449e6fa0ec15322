//! Attach, mount and remote data access with real FUSE devices, loop devices and ext4.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use shoal_tests::{
    mounts, require_root, sha256_file, wait_until, write_random_file, Cluster, Opts,
};

/// Index of the node that holds no replica of `volume`.
fn node_without_replica(c: &Cluster, volume: &str) -> usize {
    let v = c.json(0, &["volume", "inspect", volume]);
    let holders: Vec<String> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    (0..c.nodes.len())
        .find(|&i| !holders.contains(&c.nodes[i].id()))
        .expect("a node without a replica")
}

#[test]
fn ext4_data_moves_between_nodes_including_one_without_a_replica() {
    require_root!();
    let c = Cluster::start(3, Opts::default());
    c.shoal(
        0,
        &["volume", "create", "data", "--size", "1G", "--fs", "ext4"],
    )
    .expect_ok("create");
    let v = c.json(0, &["volume", "inspect", "data"]);
    let holder_id = v["replicas"][0]["node"].as_str().unwrap().to_string();
    let holder = (0..3).find(|&i| c.nodes[i].id() == holder_id).unwrap();
    let a = (holder + 1) % 3; // holds no replica: every write is remote
    let mnt_a = c.path().join("mnt-a");
    let v = c.json(a, &["volume", "mount", "data", mnt_a.to_str().unwrap()]);
    assert_eq!(v["attached_node"], c.nodes[a].id());
    assert_eq!(v["mount_path"], mnt_a.to_str().unwrap());
    assert!(
        mounts()
            .iter()
            .any(|(_, p)| std::path::Path::new(p) == mnt_a),
        "ext4 is mounted"
    );

    let sum = write_random_file(&mnt_a.join("blob"), 200);
    // used grows with the data written, on the replica's node.
    let v = c.json(0, &["volume", "inspect", "data"]);
    assert!(v["used_bytes"].as_u64().unwrap() >= 200 << 20, "{v}");

    c.shoal(a, &["volume", "unmount", mnt_a.to_str().unwrap()])
        .expect_ok("unmount");
    c.shoal(0, &["volume", "detach", "data"])
        .expect_ok("detach (forwarded to the node)");
    assert!(!mounts()
        .iter()
        .any(|(_, p)| std::path::Path::new(p) == mnt_a));

    // Attach on the replica holder and on the third node: the same bytes.
    for b in [holder, (holder + 2) % 3] {
        let mnt_b = c.path().join(format!("mnt-{b}"));
        c.shoal(b, &["volume", "mount", "data", mnt_b.to_str().unwrap()])
            .expect_ok("mount");
        assert_eq!(sha256_file(&mnt_b.join("blob")), sum);
        c.shoal(b, &["volume", "detach", "data"])
            .expect_ok("detach");
    }
}

#[test]
fn raw_volume_is_one_file_that_reads_back_and_is_exclusive() {
    require_root!();
    let c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &["volume", "create", "raw", "--size", "64M", "--repl", "2"],
    )
    .expect_ok("create");
    let v = c.json(1, &["volume", "attach", "raw"]);
    assert_eq!(v["attached_node"], c.nodes[1].id());
    let dev = PathBuf::from(v["device_path"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 64 << 20);
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"hello shoal").unwrap();
        f.sync_all().unwrap();
        // Writing past the end of the device is refused.
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        assert!(f.write_all(b"x").is_err());
    }
    // Both replicas have the bytes on disk after fsync.
    let id = v["id"].as_str().unwrap();
    for n in &c.nodes {
        let img = n.data_dir.join("pool/replicas").join(format!("{id}.img"));
        let mut f = std::fs::File::open(&img).unwrap();
        let mut buf = [0u8; 11];
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello shoal", "replica on {}", n.id());
    }
    // Exclusive: attach elsewhere, attach again, delete while attached are refused.
    c.shoal(0, &["volume", "attach", "raw"])
        .expect_err("attached to node");
    c.shoal(1, &["volume", "attach", "raw"])
        .expect_err("already attached");
    c.shoal(0, &["volume", "delete", "raw"])
        .expect_err("detach it first");
    c.shoal(0, &["volume", "mount", "raw", "/tmp/x"])
        .expect_err("no filesystem");
    // --node attaches on another node through any endpoint.
    c.shoal(0, &["volume", "detach", "raw"]).expect_ok("detach");
    let v = c.json(1, &["volume", "attach", "raw", "--node", &c.nodes[0].id()]);
    assert_eq!(v["attached_node"], c.nodes[0].id());
    let dev0 = PathBuf::from(v["device_path"].as_str().unwrap());
    let mut f = std::fs::File::open(&dev0).unwrap();
    let mut buf = [0u8; 11];
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello shoal");
}

#[test]
fn volume_of_a_dead_node_can_be_attached_elsewhere() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    c.shoal(
        0,
        &["volume", "create", "v", "--size", "32M", "--repl", "2"],
    )
    .expect_ok("create");
    let spare = node_without_replica(&c, "v");
    let other = (spare + 1) % 3;
    c.shoal(spare, &["volume", "attach", "v"])
        .expect_ok("attach");
    c.shoal(other, &["volume", "attach", "v"])
        .expect_err("detach it first");
    c.kill(spare);
    let id = c.nodes[spare].id();
    wait_until(Duration::from_secs(10), "dead node offline", || {
        c.states(other)
            .iter()
            .any(|(n, s)| *n == id && s == "offline")
    });
    let v = c.json(other, &["volume", "attach", "v"]);
    assert_eq!(v["attached_node"], c.nodes[other].id());
    assert!(
        v["epoch"].as_u64().unwrap() >= 2,
        "a takeover bumps the epoch: {v}"
    );
    // The dead node comes back and releases its stale attachment: no mount left for it.
    c.restart(spare);
    let stale = c.nodes[spare].data_dir.join("attach");
    wait_until(Duration::from_secs(10), "stale FUSE mount released", || {
        !mounts()
            .iter()
            .any(|(_, p)| PathBuf::from(p).starts_with(&stale))
    });
    let v = c.json(spare, &["volume", "inspect", "v"]);
    assert_eq!(
        v["attached_node"],
        c.nodes[other].id(),
        "the live attachment stays"
    );
}

#[test]
fn repeat_reads_over_the_network_come_from_the_write_through_cache() {
    require_root!();
    let c = Cluster::start(
        2,
        Opts {
            extra_args: vec!["--replica-timeout".into(), "2".into()],
            ..Opts::default()
        },
    );
    let holder = c.nodes[0].id();
    c.shoal(
        0,
        &[
            "volume", "create", "rc", "--size", "64M", "--nodes", &holder,
        ],
    )
    .expect_ok("create");
    // Attached on node 1, which holds no replica: reads cross the network.
    let v = c.json(1, &["volume", "attach", "rc"]);
    let dev = PathBuf::from(v["device_path"].as_str().unwrap());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&vec![5u8; 256 << 10]).unwrap();
    f.sync_all().unwrap();
    let mut first = vec![0u8; 128 << 10];
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.read_exact(&mut first).unwrap(); // never written: zeros, read over the network
                                       // The replica's node hangs: what was written or read before is still served.
    c.pause(0);
    let mut buf = vec![0u8; 256 << 10];
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 5),
        "written pages served from the cache"
    );
    let mut again = vec![1u8; 128 << 10];
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.read_exact(&mut again).unwrap();
    assert_eq!(again, first, "read pages served from the cache");
    // A range never seen needs the replica, which does not answer: an error, not data.
    let mut cold = vec![0u8; 4096];
    f.seek(SeekFrom::Start(40 << 20)).unwrap();
    assert!(f.read_exact(&mut cold).is_err());
    c.resume(0);
    drop(f);
}
