//! Two Docker registries on two hosts sharing one Shoal volume (a real Docker engine, a
//! real `docker-registry`, real node processes): what one pushes, the other serves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use shoal_tests::docker::{cluster, run, Dockerd, IMAGE};
use shoal_tests::{free_port, require_docker, wait_until};

/// A `docker-registry` process serving `root` on a free loopback port.
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    fn start(dir: &Path, name: &str, root: &Path) -> Registry {
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = dir.join(format!("{name}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                root.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        wait_until(Duration::from_secs(20), "registry listening", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn digest_in(out: &str) -> String {
    let at = out
        .find("sha256:")
        .unwrap_or_else(|| panic!("no digest in {out}"));
    out[at..at + 71].to_string()
}

#[test]
fn a_registry_on_two_nodes_serves_what_was_pushed_through_either() {
    require_docker!();
    if !Path::new("/usr/bin/docker-registry").exists() {
        eprintln!("SKIPPED: needs docker-registry (apt-get install docker-registry)");
        return;
    }
    let c = cluster(2, &[]);
    c.shoal(
        0,
        &[
            "volume", "create", "registry", "--size", "2G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    let roots: Vec<PathBuf> = (0..2)
        .map(|i| c.path().join(format!("registry-{i}")))
        .collect();
    for (i, r) in roots.iter().enumerate() {
        c.shoal(i, &["volume", "mount", "registry", r.to_str().unwrap()])
            .expect_ok("mount");
    }
    let reg_a = Registry::start(c.path(), "reg-a", &roots[0]);
    let reg_b = Registry::start(c.path(), "reg-b", &roots[1]);
    let d = Dockerd::start();

    let ctx = d.path().join("app");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY payload /payload\n"),
    )
    .unwrap();
    for round in 0..20 {
        // A new layer every round, so each push stores new blobs.
        let payload: Vec<u8> = (0..200_000).map(|_| rand::random::<u8>()).collect();
        std::fs::write(ctx.join("payload"), &payload).unwrap();
        let push_tag = format!("{}/shoal/app:r{round}", reg_a.addr);
        let pull_tag = format!("{}/shoal/app:r{round}", reg_b.addr);
        d.build(&push_tag, &ctx);
        let pushed = digest_in(&d.ok(&["push", &push_tag]));
        d.ok(&["rmi", &push_tag]);
        let pulled = digest_in(&d.ok(&["pull", &pull_tag]));
        assert_eq!(pushed, pulled, "round {round}: digests differ");
        // The layer came back through the other node, byte for byte.
        let out = d.ok(&run(&["--rm", &pull_tag, "sha256sum", "/payload"]));
        let want = hex::encode(Sha256::digest(&payload));
        assert!(
            out.starts_with(&want),
            "round {round}: payload differs: {out} vs {want}"
        );
        d.ok(&["rmi", &pull_tag]);
    }
}
