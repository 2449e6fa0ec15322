//! The Docker volume plugin against a real Docker engine (dockerd from Debian's
//! docker.io, started per test) and real node processes: what a Docker user does with
//! `docker volume create -d shoal` and `docker run -v`. A registry shared by two hosts is
//! in `docker_registry.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use shoal_tests::docker::{cluster, plugin_socket, run, Dockerd, IMAGE};
use shoal_tests::{mounts, require_docker, wait_until, Cluster};

fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(_, m)| Path::new(m) == p)
}

/// Where node `i`'s plugin mounts a volume.
fn plugin_mount(c: &Cluster, i: usize, volume: &str) -> PathBuf {
    c.nodes[i].data_dir.join("docker").join(volume)
}

#[test]
fn docker_creates_shoal_volumes_from_options_and_inline_specs() {
    require_docker!();
    // This node serves the default socket: Docker finds driver "shoal" with no set-up.
    let mut c = cluster(2, &["default"]);
    let d = Dockerd::start();
    let drv = "shoal";

    d.ok(&[
        "volume",
        "create",
        "-d",
        drv,
        "--opt",
        "size=64M",
        "--opt",
        "repl=2",
        "--opt",
        "shared=true",
        "web",
    ]);
    let v = c.json(0, &["volume", "inspect", "web"]);
    assert_eq!(v["size_bytes"], 64 << 20, "{v}");
    assert_eq!(v["repl"], 2);
    assert_eq!(v["shared"], true);

    // The inline form: the options ride in the name.
    d.ok(&[
        "volume",
        "create",
        "-d",
        drv,
        "--name",
        "size=32M,repl=2,shared=true,name=inl",
    ]);
    let v = c.json(1, &["volume", "inspect", "inl"]);
    assert_eq!(
        (v["size_bytes"].as_u64(), v["repl"].as_u64()),
        (Some(32 << 20), Some(2))
    );
    assert_eq!(v["shared"], true);

    // Every option of `shoal volume create`, by name.
    let node1 = c.nodes[1].id();
    let pin = format!("nodes={node1}");
    d.ok(&[
        "volume",
        "create",
        "-d",
        drv,
        "-o",
        "size=16M",
        "-o",
        "fs=ext4",
        "-o",
        "block_size=8K",
        "-o",
        "io_priority=high",
        "-o",
        "label=app=wp",
        "-o",
        &pin,
        "full",
    ]);
    let v = c.json(0, &["volume", "inspect", "full"]);
    assert_eq!(v["fs"], "ext4", "{v}");
    assert_eq!(v["block_size"], 8192);
    assert_eq!(v["io_priority"], "high");
    assert_eq!(v["labels"]["app"], "wp");
    assert_eq!(v["replicas"][0]["node"], node1.as_str());
    // Create is idempotent.
    d.ok(&["volume", "create", "-d", drv, "-o", "size=16M", "full"]);

    // Bad options are refused, and the reason reaches the docker command's output.
    for (opt, needle) in [
        ("colour=red", "unknown option \"colour\""),
        ("size=lots", "size \"lots\""),
        ("repl=9", "repl=\"9\""),
        ("fs=none", "fs=none"),
        ("shared=perhaps", "shared=\"perhaps\""),
        ("io_priority=urgent", "io_priority=\"urgent\""),
    ] {
        d.err(&["volume", "create", "-d", drv, "-o", opt, "bad"], needle);
    }
    d.err(
        &["volume", "create", "-d", drv, "--name", "size=1G,repl=2"],
        "has no name=",
    );
    let names: Vec<String> = c
        .json(0, &["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.iter().any(|n| n == "bad"), "{names:?}");

    // Global scope, and the Shoal view under Status.
    let i: Value = serde_json::from_str(&d.ok(&["volume", "inspect", "web"])).unwrap();
    assert_eq!(i[0]["Scope"], "global", "{i}");
    assert_eq!(i[0]["Driver"], drv);
    assert_eq!(i[0]["Status"]["repl"], 2);

    // `docker run` with the driver on a volume that does not exist creates it.
    let out = d.ok(&run(&[
        "--rm",
        "--volume-driver",
        drv,
        "-v",
        "auto:/data",
        IMAGE,
        "sh",
        "-c",
        "echo hi > /data/f && cat /data/f",
    ]));
    assert_eq!(out.trim(), "hi");
    let v = c.json(0, &["volume", "inspect", "auto"]);
    assert_eq!(v["size_bytes"], 10u64 << 30, "{v}");
    assert_eq!(
        (v["fs"].as_str(), v["repl"].as_u64()),
        (Some("ext4"), Some(1))
    );

    // A volume made with the CLI on another node is found by name, no driver given.
    c.shoal(
        1,
        &["volume", "create", "cli-made", "--size", "64M", "--shared"],
    )
    .expect_ok("cli create");
    d.ok(&run(&[
        "--rm",
        "-v",
        "cli-made:/data",
        IMAGE,
        "sh",
        "-c",
        "echo x > /data/x",
    ]));
    assert!(d.ok(&["volume", "ls"]).contains("cli-made"));

    // After a node restart the socket is back and Docker uses it again.
    c.stop(0);
    c.restart(0);
    c.wait_all_online();
    let out = d.ok(&run(&[
        "--rm",
        "-v",
        "cli-made:/data",
        IMAGE,
        "cat",
        "/data/x",
    ]));
    assert_eq!(out.trim(), "x");

    d.ok(&["volume", "rm", "inl"]);
    let left = c.json(0, &["volume", "list"]).to_string();
    assert!(!left.contains("\"inl\""), "{left}");
}

#[test]
fn two_containers_and_docker_cp_share_one_mount() {
    require_docker!();
    let (sock, drv) = plugin_socket("count");
    let c = cluster(2, &[&sock]);
    let d = Dockerd::start();
    d.ok(&[
        "volume",
        "create",
        "-d",
        &drv,
        "-o",
        "size=64M",
        "-o",
        "shared=true",
        "web",
    ]);
    let mnt = plugin_mount(&c, 0, "web");

    d.ok(&run(&[
        "-d",
        "--name",
        "c1",
        "-v",
        "web:/data",
        IMAGE,
        "sleep",
        "600",
    ]));
    assert!(is_mounted(&mnt));
    // A second container comes and goes: the first keeps its volume.
    d.ok(&run(&[
        "--rm",
        "--name",
        "c2",
        "-v",
        "web:/data",
        IMAGE,
        "sh",
        "-c",
        "echo from-c2 > /data/c2.txt",
    ]));
    assert!(is_mounted(&mnt), "c2 leaving unmounted c1's volume");
    assert_eq!(
        d.ok(&["exec", "c1", "cat", "/data/c2.txt"]).trim(),
        "from-c2"
    );
    d.ok(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "echo still-writable > /data/c1.txt",
    ]);

    // docker cp into a stopped container mounts the volume under one more ID.
    d.ok(&[
        "create",
        "--network",
        "none",
        "--name",
        "c3",
        "-v",
        "web:/data",
        IMAGE,
        "true",
    ]);
    let local = d.path().join("copied.txt");
    std::fs::write(&local, b"copied in").unwrap();
    d.ok(&["cp", local.to_str().unwrap(), "c3:/data/copied.txt"]);
    assert!(is_mounted(&mnt), "docker cp unmounted c1's volume");
    assert_eq!(
        d.ok(&["exec", "c1", "cat", "/data/copied.txt"]).trim(),
        "copied in"
    );

    // In use by c1: Docker refuses to remove it.
    d.err(&["volume", "rm", "web"], "in use");

    // Mounted on another host: the plugin refuses to remove it.
    let other = c.path().join("node1-web");
    c.shoal(1, &["volume", "mount", "web", other.to_str().unwrap()])
        .expect_ok("mount on node 1");
    assert_eq!(
        std::fs::read_to_string(other.join("c1.txt"))
            .unwrap()
            .trim(),
        "still-writable"
    );
    d.ok(&["rm", "-f", "c1", "c3"]);
    assert!(
        !is_mounted(&mnt),
        "the last container left, the mount stays"
    );
    let err = d.err(&["volume", "rm", "web"], "is in use: mounted at");
    assert!(err.contains(other.to_str().unwrap()), "{err}");
    c.shoal(1, &["volume", "unmount", other.to_str().unwrap()])
        .expect_ok("unmount on node 1");
    d.ok(&["volume", "rm", "web"]);
    c.shoal(0, &["volume", "inspect", "web"])
        .expect_err("not found");
}

/// The counter loop a container runs: 50 increments, each under `flock`.
const COUNT_IN_CONTAINER: &str = "i=0; while [ $i -lt 50 ]; do \
     flock /data/lock sh -c 'n=$(cat /data/counter); echo $((n+1)) > /data/counter'; \
     i=$((i+1)); done; hostname > /data/done-$(hostname)";

#[test]
fn containers_and_another_host_share_files_and_locks() {
    require_docker!();
    let (sock, drv) = plugin_socket("share");
    let c = cluster(2, &[&sock]);
    let d = Dockerd::start();
    d.ok(&[
        "volume",
        "create",
        "-d",
        &drv,
        "-o",
        "size=128M",
        "-o",
        "repl=2",
        "-o",
        "shared=true",
        "site",
    ]);
    let host = c.path().join("site-node1");
    c.shoal(1, &["volume", "mount", "site", host.to_str().unwrap()])
        .expect_ok("mount on node 1");
    std::fs::write(host.join("counter"), b"0").unwrap();

    let mut ids = vec![];
    for name in ["w1", "w2"] {
        ids.push(d.ok(&run(&[
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "-v",
            "site:/data",
            IMAGE,
            "sh",
            "-c",
            COUNT_IN_CONTAINER,
        ])));
    }
    // Meanwhile the other host adds 50 too, under flock(2) on its own mount.
    use std::os::fd::AsRawFd;
    for _ in 0..50 {
        let lock = std::fs::File::create(host.join("lock")).unwrap();
        // SAFETY: flock(2) on an open descriptor.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let n: u64 = std::fs::read_to_string(host.join("counter"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::write(host.join("counter"), format!("{}\n", n + 1)).unwrap();
        drop(lock);
    }
    for name in ["w1", "w2"] {
        let code = d.ok(&["wait", name]);
        assert_eq!(code.trim(), "0", "{name} failed: {}", d.ok(&["logs", name]));
    }
    // Each container's files are on the other host, and no increment was lost.
    for name in ["w1", "w2"] {
        let done = std::fs::read_to_string(host.join(format!("done-{name}"))).unwrap();
        assert_eq!(done.trim(), name);
    }
    let total = std::fs::read_to_string(host.join("counter")).unwrap();
    assert_eq!(
        total.trim(),
        "150",
        "lost updates across containers and hosts"
    );
    // And what the host wrote, a container reads.
    std::fs::write(host.join("from-host.txt"), b"hello containers").unwrap();
    let out = d.ok(&run(&[
        "--rm",
        "-v",
        "site:/data",
        IMAGE,
        "cat",
        "/data/from-host.txt",
    ]));
    assert_eq!(out, "hello containers");
}

#[test]
fn a_non_shared_volume_is_refused_to_a_second_host_while_in_use() {
    require_docker!();
    let (sock_a, drv_a) = plugin_socket("hosta");
    let (sock_b, drv_b) = plugin_socket("hostb");
    let c = cluster(2, &[&sock_a, &sock_b]);
    // Two engines: host A talks to node 0's plugin, host B to node 1's.
    let host_a = Dockerd::start();
    let host_b = Dockerd::start();
    host_a.ok(&[
        "volume", "create", "-d", &drv_a, "-o", "size=64M", "-o", "repl=2", "db",
    ]);
    host_a.ok(&run(&[
        "-d",
        "--name",
        "db1",
        "-v",
        "db:/data",
        IMAGE,
        "sh",
        "-c",
        "echo row1 > /data/table && sync && sleep 600",
    ]));
    wait_until(Duration::from_secs(20), "db1 wrote its file", || {
        host_a
            .docker(&["exec", "db1", "cat", "/data/table"])
            .stdout
            .trim()
            == "row1"
    });
    let v = c.json(0, &["volume", "inspect", "db"]);
    assert_eq!(v["attached_node"], c.nodes[0].id().as_str());

    // Host B (through its own node) may not mount it while host A uses it.
    host_b.err(
        &run(&[
            "--rm",
            "--volume-driver",
            &drv_b,
            "-v",
            "db:/data",
            IMAGE,
            "true",
        ]),
        "is attached to node",
    );
    let p = c.path().join("db-node1");
    c.shoal(1, &["volume", "mount", "db", p.to_str().unwrap()])
        .expect_err("is attached to node");

    // Once host A's container is gone the volume is detached, and host B takes it.
    host_a.ok(&["rm", "-f", "db1"]);
    let v = c.json(0, &["volume", "inspect", "db"]);
    assert_eq!(v["state"], "detached", "{v}");
    let out = host_b.ok(&run(&[
        "--rm",
        "--volume-driver",
        &drv_b,
        "-v",
        "db:/data",
        IMAGE,
        "cat",
        "/data/table",
    ]));
    assert_eq!(out.trim(), "row1");
}

/// One HTTP/1.1 request over the plugin socket: (status, body).
fn post(sock: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("plugin socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer and close before reading a huge body: ignore EPIPE.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

fn err_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    v["Err"].as_str().unwrap_or_default().to_string()
}

#[test]
fn strangers_on_the_plugin_socket_get_json_errors_and_the_plugin_stays_up() {
    require_docker!();
    let (sock, _) = plugin_socket("strangers");
    let c = cluster(1, &[&sock]);

    let (st, b) = post(&sock, "POST", "/VolumeDriver.Create", b"{not json");
    assert_eq!(st, 400);
    assert!(err_of(&b).contains("not valid JSON"), "{b}");
    let (_, b) = post(&sock, "POST", "/VolumeDriver.Mount", br#"{"Name":"x"}"#);
    assert!(err_of(&b).contains("missing field ID"), "{b}");
    let (_, b) = post(&sock, "POST", "/VolumeDriver.Create", br#"{"Opts":{}}"#);
    assert!(err_of(&b).contains("missing field Name"), "{b}");
    let (st, b) = post(
        &sock,
        "POST",
        "/VolumeDriver.Create",
        br#"{"Name":"v","Opts":{"size":5}}"#,
    );
    assert_eq!(st, 400, "{b}");
    assert!(!err_of(&b).is_empty());
    let (_, b) = post(
        &sock,
        "POST",
        "/VolumeDriver.Create",
        br#"{"Name":"../../etc"}"#,
    );
    assert!(err_of(&b).contains("volume name"), "{b}");
    let (_, b) = post(&sock, "POST", "/VolumeDriver.Create", br#"[1,2,3]"#);
    assert!(!err_of(&b).is_empty(), "{b}");
    let (st, b) = post(&sock, "POST", "/VolumeDriver.Frobnicate", b"{}");
    assert_eq!(st, 404);
    assert!(err_of(&b).contains("unknown endpoint"), "{b}");
    let (st, b) = post(&sock, "GET", "/Plugin.Activate", b"");
    assert_eq!(st, 405);
    assert!(err_of(&b).contains("POST"), "{b}");
    let huge = vec![b'{'; 8 << 20];
    let (st, b) = post(&sock, "POST", "/VolumeDriver.Create", &huge);
    assert_eq!(st, 413);
    assert!(err_of(&b).contains("over"), "{b}");
    // A request cut off mid-body.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"Na")
            .unwrap();
    }
    // Unmount of a volume never mounted, Remove of one that does not exist.
    let (_, b) = post(
        &sock,
        "POST",
        "/VolumeDriver.Unmount",
        br#"{"Name":"ghost","ID":"x"}"#,
    );
    assert_eq!(err_of(&b), "");
    let (_, b) = post(
        &sock,
        "POST",
        "/VolumeDriver.Remove",
        br#"{"Name":"ghost"}"#,
    );
    assert!(err_of(&b).contains("not found"), "{b}");

    // Still answering, and nothing was created.
    let (st, b) = post(&sock, "POST", "/Plugin.Activate", b"");
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["Implements"][0],
        "VolumeDriver"
    );
    let (_, b) = post(&sock, "POST", "/VolumeDriver.List", b"{}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["Volumes"],
        serde_json::json!([])
    );
    assert_eq!(c.json(0, &["volume", "list"]), serde_json::json!([]));
}
