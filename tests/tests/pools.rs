//! Pools on a file or a block device: formatted once, refused when they hold someone
//! else's filesystem, and reused after a restart.

use std::process::Command;

use shoal_tests::{require_root, shoal_bin, Cluster, Opts};

fn sparse_file(path: &std::path::Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn a_blank_file_becomes_a_pool_and_survives_a_restart() {
    require_root!();
    let dir = tempfile::Builder::new()
        .prefix("shoal-pool-")
        .tempdir()
        .unwrap();
    let img = dir.path().join("pool.img");
    sparse_file(&img, 512 << 20);
    let mut c = Cluster::start(
        1,
        Opts {
            etcd: false,
            capacity: String::new(),
            extra_args: vec!["--pool".into(), img.display().to_string()],
            ..Opts::default()
        },
    );
    let label = Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "shoal-pool");
    let s = c.json(0, &["status"]);
    let cap = s["capacity_bytes"].as_u64().unwrap();
    assert!(
        cap > 400 << 20 && cap <= 512 << 20,
        "capacity from the pool file: {cap}"
    );

    c.shoal(0, &["volume", "create", "v", "--size", "1G"])
        .expect_ok("create");
    let v = c.json(0, &["volume", "attach", "v"]);
    let dev = v["device_path"].as_str().unwrap().to_string();
    std::fs::write(&dev, vec![7u8; 1 << 20]).unwrap();
    assert!(
        c.json(0, &["volume", "inspect", "v"])["used_bytes"]
            .as_u64()
            .unwrap()
            >= 1 << 20
    );

    // kill -9 and restart: the pool mount is reused and the data is there.
    c.kill(0);
    c.restart(0);
    let v = c.json(0, &["volume", "attach", "v"]);
    let data = std::fs::read(v["device_path"].as_str().unwrap()).unwrap();
    assert_eq!(&data[..1 << 20], &vec![7u8; 1 << 20][..]);
    drop(c);
    shoal_tests::cleanup_mounts(dir.path());
}

#[test]
fn a_file_with_another_filesystem_is_refused_untouched() {
    require_root!();
    let dir = tempfile::Builder::new()
        .prefix("shoal-pool-")
        .tempdir()
        .unwrap();
    let img = dir.path().join("theirs.img");
    sparse_file(&img, 64 << 20);
    let ok = Command::new("mkfs.ext4")
        .args(["-F", "-q", "-L", "precious"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(ok.success());
    let before = shoal_tests::sha256_file(&img);
    let out = Command::new(shoal_bin())
        .args(["node", "start", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            "127.0.77.2:9710",
            "--gossip",
            "127.0.77.2:9711",
            "--pool",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Shoal pool"), "{err}");
    assert_eq!(
        shoal_tests::sha256_file(&img),
        before,
        "the file was not changed"
    );
}
