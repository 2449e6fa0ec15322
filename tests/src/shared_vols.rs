//! Set-ups shared by the shared-volume tests (`shared.rs`, `shared_locks.rs`,
//! `shared_failover.rs`): a volume mounted on every node, one coordinated by a node
//! without a replica, a coordinator killed and replaced.

use std::path::{Path, PathBuf};

use crate::{mounts, Cluster, Opts};

/// A shared volume with repl 2 on three nodes, mounted on every node.
pub fn mounted_everywhere(name: &str) -> (Cluster, Vec<PathBuf>) {
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
pub fn coordinated_by_node_0(c: &Cluster, name: &str, hosts: usize) -> Vec<PathBuf> {
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
pub fn kill_node_0_and_wait_for_a_new_coordinator(c: &mut Cluster, name: &str) {
    let dead = c.nodes[0].id();
    c.kill(0);
    crate::wait_until(
        std::time::Duration::from_secs(60),
        "a new coordinator",
        || {
            let v = c.json(1, &["volume", "inspect", name]);
            !v["attached_node"].is_null() && v["attached_node"] != dead.as_str()
        },
    );
}

pub fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(_, m)| Path::new(m) == p)
}
