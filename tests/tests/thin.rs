//! Thin provisioning: space is taken on write, given back on discard, and a full pool
//! says ENOSPC.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use shoal_tests::{require_root, Cluster, Opts};

const MIB: u64 = 1 << 20;

fn used(c: &Cluster, vol: &str) -> u64 {
    c.json(0, &["volume", "inspect", vol])["used_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_huge_volume_on_a_small_pool_costs_only_what_is_written() {
    require_root!();
    let c = Cluster::start(
        1,
        Opts {
            capacity: "64M".into(),
            ..Opts::default()
        },
    );
    c.shoal(0, &["volume", "create", "huge", "--size", "1T"])
        .expect_ok("create");
    let s = c.json(0, &["status"]);
    assert_eq!(s["used_bytes"], 0);
    assert!(s["provisioned_bytes"].as_u64().unwrap() >= 1 << 40);
    assert!(s["overcommit"].as_f64().unwrap() > 1000.0, "{s}");
    assert_eq!(used(&c, "huge"), 0);

    let v = c.json(0, &["volume", "attach", "huge"]);
    let dev = PathBuf::from(v["device_path"].as_str().unwrap());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 40);
    // 8 MiB far into the volume.
    f.seek(SeekFrom::Start(500 << 30)).unwrap();
    f.write_all(&vec![0xabu8; 8 * MIB as usize]).unwrap();
    f.sync_all().unwrap();
    let u = used(&c, "huge");
    assert!((8 * MIB..10 * MIB).contains(&u), "used {u}");
    assert_eq!(c.json(0, &["status"])["used_bytes"].as_u64().unwrap(), u);

    // Discard (hole punch) gives the space back.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (500i64) << 30,
            8 * MIB as i64,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    assert_eq!(used(&c, "huge"), 0);

    // Fill the pool: the write that does not fit fails with ENOSPC.
    f.seek(SeekFrom::Start(0)).unwrap();
    let block = vec![1u8; MIB as usize];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&block) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
        assert!(written <= 64 * MIB, "pool capacity not enforced");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        written >= 60 * MIB,
        "only {written} bytes fit in a 64M pool"
    );
    // What was written before the pool filled is intact.
    use std::io::Read;
    let mut buf = vec![0u8; MIB as usize];
    f.seek(SeekFrom::Start(written - MIB)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
}
