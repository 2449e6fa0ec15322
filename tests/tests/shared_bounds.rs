//! What a shared volume's coordinator keeps per mount is bounded, not proportional to the
//! files the mount looked at: real nodes, etcd and FUSE mounts.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use shoal_tests::{require_root, Cluster, Opts};

/// Leases of one mount at the coordinator, from `volume inspect`.
fn leases_of(c: &Cluster, host: &str) -> u64 {
    let v = c.json(0, &["volume", "inspect", "bounded"]);
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == host)
        .unwrap_or_else(|| panic!("a session of {host}: {v}"))["leases"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_mount_holds_at_most_the_lease_limit_and_evicted_files_stay_coherent() {
    require_root!();
    const LIMIT: usize = 40;
    const FILES: usize = 300;
    let c = Cluster::start(
        2,
        Opts {
            extra_args: vec!["--lease-limit".into(), LIMIT.to_string()],
            ..Opts::default()
        },
    );
    c.shoal(
        0,
        &[
            "volume", "create", "bounded", "--size", "1G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    let m: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = c.path().join(format!("mnt-{i}"));
            c.shoal(i, &["volume", "mount", "bounded", p.to_str().unwrap()])
                .expect_ok("mount");
            p
        })
        .collect();
    for i in 0..FILES {
        fs::write(m[0].join(format!("f{i}")), b"0").unwrap();
    }
    // Host 1 looks at every file (a `find` or `ls -l`): each look is leased.
    for i in 0..FILES {
        assert_eq!(fs::metadata(m[1].join(format!("f{i}"))).unwrap().len(), 1);
    }
    let held = leases_of(&c, &c.nodes[1].id());
    assert!(
        held <= LIMIT as u64,
        "host 1 holds {held} leases, over the limit {LIMIT}"
    );
    assert!(held > 0, "host 1 holds leases");
    // A file whose lease was evicted long ago and one still leased: host 0 changes both,
    // and host 1's next look sees each change.
    for i in [0, FILES - 1] {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m[0].join(format!("f{i}")))
            .unwrap();
        f.write_all(b"more").unwrap();
        drop(f);
        assert_eq!(
            fs::metadata(m[1].join(format!("f{i}"))).unwrap().len(),
            5,
            "host 1 sees the change to f{i}"
        );
    }
}
