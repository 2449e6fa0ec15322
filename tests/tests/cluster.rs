//! Membership and node life cycle: three real nodes on etcd, gossip liveness, restarts,
//! clean shutdown, and nodes that must be refused.

use std::time::Duration;

use shoal_tests::{require_root, wait_until, Cluster, Opts};

#[test]
fn status_lists_every_node_with_the_scripting_fields() {
    require_root!();
    let c = Cluster::start(
        3,
        Opts {
            labels: vec![
                ("z1".into(), "r1".into()),
                ("z1".into(), "r2".into()),
                ("z2".into(), "r1".into()),
            ],
            ..Opts::default()
        },
    );
    let s = c.json(1, &["status"]);
    assert_eq!(s["cluster_id"], "test");
    assert_eq!(s["local_node_id"], c.nodes[1].id());
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let mut cap_sum = 0;
    for (i, n) in c.nodes.iter().enumerate() {
        let row = nodes
            .iter()
            .find(|r| r["id"] == n.id())
            .expect("node listed");
        assert_eq!(row["address"], n.endpoint());
        assert_eq!(row["state"], "online");
        assert_eq!(row["zone"], c.opts.labels[i].0);
        assert_eq!(row["rack"], c.opts.labels[i].1);
        assert_eq!(row["capacity_bytes"], 4u64 << 30);
        assert_eq!(row["used_bytes"], 0);
        cap_sum += row["capacity_bytes"].as_u64().unwrap();
    }
    assert_eq!(s["capacity_bytes"].as_u64().unwrap(), cap_sum);
    assert_eq!(s["used_bytes"], 0);
    // The table for people names every node too.
    let text = c.shoal(0, &["status"]).expect_ok("status").stdout;
    for n in &c.nodes {
        assert!(text.contains(&n.id()), "{text}");
    }
}

#[test]
fn killed_node_goes_offline_and_comes_back_with_the_same_id() {
    require_root!();
    let mut c = Cluster::start(3, Opts::default());
    let victim = c.nodes[2].id();
    c.kill(2);
    let took = wait_until(Duration::from_secs(10), "killed node shown offline", || {
        c.states(0)
            .iter()
            .any(|(id, s)| *id == victim && s == "offline")
    });
    eprintln!("offline after {took:?}");
    // Gossip agrees, not only a failed usage call: the other survivor sees it too.
    assert!(c
        .states(1)
        .iter()
        .any(|(id, s)| *id == victim && s == "offline"));
    c.restart(2);
    assert_eq!(c.nodes[2].id(), victim, "a restart is the same node");
    wait_until(Duration::from_secs(10), "restarted node online", || {
        c.states(0).iter().all(|(_, s)| s == "online")
    });
    assert_eq!(
        c.states(0).len(),
        3,
        "no duplicate registration after restart"
    );
}

#[test]
fn sigterm_shuts_a_node_down_cleanly() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    let id = c.nodes[1].id();
    assert_eq!(c.stop(1), Some(0), "SIGTERM exit status:\n{}", c.log(1));
    wait_until(Duration::from_secs(10), "stopped node offline", || {
        c.states(0).iter().any(|(n, s)| *n == id && s == "offline")
    });
}

/// Starts node `i` with `flag` set to `value`; it must refuse to start. Returns stderr.
fn refused_start(c: &Cluster, i: usize, flag: &str, value: &str) -> String {
    let mut args = c.node_args(i);
    let pos = args.iter().position(|a| a == flag).unwrap();
    args[pos + 1] = value.into();
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "node started with {flag} {value}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn wrong_secret_and_wrong_cluster_are_refused() {
    require_root!();
    let mut c = Cluster::start(1, Opts::default());
    // A node with the wrong secret.
    let wrong = c.path().join("wrong-secret");
    shoal_tests::write_secret_file(&wrong, "not-the-secret");
    let err = refused_start(&c, 1, "--secret-file", wrong.to_str().unwrap());
    assert!(err.contains("wrong secret"), "{err}");
    // A secret others can read, a secret on the command line, and none at all on etcd.
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = refused_start(&c, 1, "--secret-file", wrong.to_str().unwrap());
    assert!(err.contains("chmod 600"), "{err}");
    let mut args = c.node_args(1);
    let at = args.iter().position(|a| a == "--secret-file").unwrap();
    args[at] = "--secret".into();
    args[at + 1] = "test-secret".into();
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(&args)
        .env_remove("SHOAL_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--secret is not accepted"), "{err}");
    args.drain(at..at + 2);
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(&args)
        .env_remove("SHOAL_SECRET")
        .env_remove("SHOAL_SECRET_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cluster secret"), "{err}");
    // An existing data dir started with another cluster id.
    c.stop(0);
    let err = refused_start(&c, 0, "--cluster-id", "another");
    assert!(err.contains("belongs to cluster \"test\""), "{err}");
    // The refused nodes changed nothing: the original restarts and is alone.
    c.restart(0);
    assert_eq!(c.states(0).len(), 1);
}

/// The flags for a secured etcd are checked before anything starts, with messages that
/// name what is missing (the TLS handshake and the user are tested against a real etcd in
/// blockd/tests/meta_conformance.rs).
#[test]
fn etcd_tls_and_user_flags_are_checked_at_start() {
    require_root!();
    let c = Cluster::start(1, Opts::default());
    let err = refused_start(&c, 1, "--kvdb", "https://127.0.0.1:2379");
    assert!(err.contains("--kvdb-ca"), "{err}");
    let start_with = |extra: &[&str]| {
        let mut args = c.node_args(1);
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = std::process::Command::new(shoal_tests::shoal_bin())
            .args(&args)
            .env_remove("SHOAL_KVDB_PASSWORD")
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = start_with(&["--kvdb-user", "shoal"]);
    assert!(err.contains("needs a password"), "{err}");
    let key = c.path().join("etcd-client.key");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cert = c.path().join("etcd-client.crt");
    std::fs::write(&cert, "not a cert").unwrap();
    let err = start_with(&[
        "--kvdb-cert",
        cert.to_str().unwrap(),
        "--kvdb-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--kvdb-key") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn single_node_runs_on_the_embedded_store() {
    require_root!();
    let mut c = Cluster::start(
        1,
        Opts {
            etcd: false,
            ..Opts::default()
        },
    );
    c.shoal(0, &["volume", "create", "solo", "--size", "1G"])
        .expect_ok("create");
    c.restart(0);
    // Metadata survived the restart in the data dir.
    let v = c.json(0, &["volume", "inspect", "solo"]);
    assert_eq!(v["size_bytes"], 1u64 << 30);
    assert!(c.nodes[0].data_dir.join("meta.json").exists());
}

#[test]
fn a_single_host_node_makes_its_own_secret_and_keeps_it() {
    require_root!();
    // A second single-host node beside the harness's own (its own data dir and store).
    let c = Cluster::start(
        1,
        Opts {
            etcd: false,
            ..Opts::default()
        },
    );
    let mut args = c.node_args(1);
    let at = args.iter().position(|a| a == "--secret-file").unwrap();
    args.drain(at..at + 2);
    let secret = c.path().join("node1/secret");
    let mut sums = Vec::new();
    for _ in 0..2 {
        let mut node = std::process::Command::new(shoal_tests::shoal_bin())
            .args(&args)
            .env_remove("SHOAL_SECRET")
            .env_remove("SHOAL_SECRET_FILE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ep = args[args.iter().position(|a| a == "--listen").unwrap() + 1].clone();
        wait_until(Duration::from_secs(20), "the node to serve", || {
            std::net::TcpStream::connect(&ep).is_ok()
        });
        let _ = node.kill();
        let _ = node.wait();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&secret).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        sums.push(std::fs::read(&secret).unwrap());
    }
    assert!(sums[0].len() >= 32, "a random secret");
    assert_eq!(sums[0], sums[1], "made once, then kept");
}

#[test]
fn etcd_down_is_reported_not_hung() {
    require_root!();
    let mut c = Cluster::start(1, Opts::default());
    c.etcd.as_mut().unwrap().stop();
    let start = std::time::Instant::now();
    c.shoal(0, &["volume", "list"])
        .expect_err("metadata store unavailable");
    assert!(start.elapsed() < Duration::from_secs(60));
    c.etcd.as_mut().unwrap().restart();
    wait_until(
        Duration::from_secs(30),
        "node serves again after etcd returns",
        || c.shoal(0, &["volume", "list"]).ok,
    );
}

#[test]
fn cli_without_a_node_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("admin.pem");
    shoal_tests::tls::foreign_credential(shoal_blockd::auth::Role::Admin)
        .write(&creds)
        .unwrap();
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["status", "--endpoint", "127.0.0.1:1"])
        .env("SHOAL_CREDENTIALS", &creds)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot reach a Shoal node at 127.0.0.1:1"),
        "{err}"
    );
}

/// A new node joins with a one-time token instead of the secret: it fetches the secret,
/// keeps it (0600) and serves; the token cannot be used twice, nor after it expired.
#[test]
fn a_new_node_joins_with_a_one_time_token() {
    require_root!();
    let mut c = Cluster::start(1, Opts::default());
    let token = |ttl: &str| {
        let out = c.shoal(0, &["cluster", "join-token", "--ttl", ttl]);
        out.stdout.trim().to_string()
    };
    let t = token("10m");
    assert!(t.starts_with("shoal-join-"), "{t}");
    let without_secret = |c: &Cluster, i: usize| {
        let mut args = c.node_args(i);
        let at = args.iter().position(|a| a == "--secret-file").unwrap();
        args.drain(at..at + 2);
        args
    };
    let expired = token("1s");
    let args = without_secret(&c, 1);
    let joined = c.add_node_with(args, vec![("SHOAL_JOIN_TOKEN".into(), t.clone())]);
    c.wait_all_online();
    let kept = c.nodes[joined].data_dir.join("secret");
    let mode = std::fs::metadata(&kept).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), c.opts.secret);
    // It restarts from the kept secret (the token is spent).
    c.restart(joined);
    c.wait_all_online();
    c.shoal(joined, &["volume", "create", "joined", "--size", "4M"])
        .expect_ok("create on the joined node");

    // The same token again, and an expired one, are refused with the reason.
    std::thread::sleep(Duration::from_millis(1500));
    for (tok, why) in [(&t, "used already"), (&expired, "expired")] {
        let args = without_secret(&c, 2);
        let out = std::process::Command::new(shoal_tests::shoal_bin())
            .args(&args)
            .env("SHOAL_JOIN_TOKEN", tok)
            .env_remove("SHOAL_SECRET")
            .env_remove("SHOAL_SECRET_FILE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{why}: {err}");
        assert!(!c.path().join("node2/secret").exists());
    }
}
