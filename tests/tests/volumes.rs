//! Volume records through the CLI: create, list, inspect, delete, and every bad input.

use shoal_tests::{require_root, Cluster, Opts};

#[test]
fn create_list_inspect_delete() {
    require_root!();
    let c = Cluster::start(3, Opts::default());
    let v = c.json(
        0,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "10G",
            "--repl",
            "2",
            "--block-size",
            "64K",
            "--fs",
            "ext4",
            "--label",
            "app=pg",
            "--label",
            "tier=gold",
            "--io-priority",
            "high",
        ],
    );
    assert_eq!(v["name"], "db");
    assert_eq!(v["size_bytes"], 10u64 << 30);
    assert_eq!(v["repl"], 2);
    assert_eq!(v["block_size"], 65536);
    assert_eq!(v["fs"], "ext4");
    assert_eq!(v["io_priority"], "high");
    assert_eq!(v["labels"]["app"], "pg");
    assert_eq!(v["shared"], false);
    assert_eq!(v["state"], "detached");
    assert!(v["attached_node"].is_null());
    let reps = v["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 2);
    assert_ne!(
        reps[0]["node"], reps[1]["node"],
        "replicas on distinct nodes"
    );
    for r in reps {
        assert_eq!(r["state"], "in-sync");
    }

    c.shoal(1, &["volume", "create", "cache", "--size", "512M"])
        .expect_ok("create");
    let list = c.json(2, &["volume", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cache", "db"]);
    let inspected = c.json(2, &["volume", "inspect", "db"]);
    assert_eq!(inspected["id"], v["id"]);

    // The record is in etcd under the cluster id, with a format version.
    let etcd = c.etcd.as_ref().unwrap();
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.url, "get", "--print-value-only"])
        .arg(format!("/shoal/test/volumes/{}", v["id"].as_str().unwrap()))
        .output()
        .unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("volume record is JSON");
    assert_eq!(rec["v"], 1);
    assert_eq!(rec["name"], "db");

    c.shoal(0, &["volume", "delete", "db"]).expect_ok("delete");
    c.shoal(0, &["volume", "inspect", "db"])
        .expect_err("not found");
    let list = c.json(0, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    // The name is free again.
    c.shoal(0, &["volume", "create", "db", "--size", "1G"])
        .expect_ok("re-create");
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    require_root!();
    let c = Cluster::start(2, Opts::default());
    c.shoal(0, &["volume", "create", "taken", "--size", "1G"])
        .expect_ok("create");
    let long = "x".repeat(65);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["volume", "create", "a", "--size", "10X"], "10X"),
        (
            vec!["volume", "create", "a", "--size", "0"],
            "greater than zero",
        ),
        (vec!["volume", "create", "a"], "--size"),
        (
            vec!["volume", "create", "taken", "--size", "1G"],
            "already exists",
        ),
        (
            vec!["volume", "create", "a/b", "--size", "1G"],
            "volume name",
        ),
        (
            vec!["volume", "create", &long, "--size", "1G"],
            "volume name",
        ),
        (
            vec!["volume", "create", "a", "--size", "1G", "--repl", "0"],
            "repl 0",
        ),
        (
            vec!["volume", "create", "a", "--size", "1G", "--repl", "3"],
            "more than the 2 node",
        ),
        (
            vec![
                "volume",
                "create",
                "a",
                "--size",
                "1G",
                "--block-size",
                "3K",
            ],
            "block size",
        ),
        (
            vec!["volume", "create", "a", "--size", "1G", "--fs", "xfs"],
            "xfs",
        ),
        (
            vec![
                "volume", "create", "a", "--size", "1G", "--label", "novalue",
            ],
            "key=value",
        ),
        (
            vec!["volume", "create", "a", "--size", "1G", "--bogus"],
            "--bogus",
        ),
        (
            vec![
                "volume", "create", "a", "--size", "1G", "--shared", "--fs", "ext4",
            ],
            "not ext4",
        ),
        (vec!["volume", "delete", "ghost"], "not found"),
        (vec!["volume", "detach", "ghost"], "not found"),
        (vec!["volume", "attach", "ghost"], "not found"),
        (vec!["volume", "detach", "taken"], "not attached"),
        (
            vec!["volume", "attach", "taken", "--node", "nosuchnode"],
            "not found",
        ),
        (
            vec!["volume", "mount", "taken", "relative/path"],
            "absolute",
        ),
        (
            vec!["volume", "unmount", "/nothing/here"],
            "no Shoal volume is mounted",
        ),
        (vec!["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = c.shoal(0, &args);
        assert!(!out.ok, "{args:?} should fail");
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.starts_with("(see"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: one line expected, got {:?}",
            out.stderr
        );
        assert!(lines[0].starts_with("error:"), "{args:?}: {}", out.stderr);
        assert!(
            lines[0].contains(needle),
            "{args:?}: {needle:?} not in {}",
            out.stderr
        );
    }
    let list = c.json(1, &["volume", "list"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing was created: {list}"
    );
}

#[test]
fn replicas_spread_over_zones_and_can_be_pinned() {
    require_root!();
    let c = Cluster::start(
        3,
        Opts {
            labels: vec![
                ("za".into(), "r1".into()),
                ("za".into(), "r2".into()),
                ("zb".into(), "r1".into()),
            ],
            ..Opts::default()
        },
    );
    let v = c.json(
        0,
        &["volume", "create", "spread", "--size", "1G", "--repl", "2"],
    );
    let nodes: Vec<String> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    assert!(
        nodes.contains(&c.nodes[2].id()),
        "the only zb node holds a replica: {nodes:?}"
    );
    let pin = format!("{},{}", c.nodes[0].id(), c.nodes[1].id());
    let v = c.json(
        0,
        &[
            "volume", "create", "pinned", "--size", "1G", "--repl", "2", "--nodes", &pin,
        ],
    );
    let nodes: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, [c.nodes[0].id(), c.nodes[1].id()]);
}
