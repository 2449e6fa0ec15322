//! The README's first command: `tests/demo.sh` starts etcd and three nodes, creates a
//! replicated ext4 volume, mounts it where no replica lives, writes, shows status, moves
//! the volume and reads the data back, then mounts a shared volume on two nodes and
//! reads on one what the other wrote; `tests/demo.sh stop` cleans everything up.

use std::path::Path;
use std::process::Command;

use shoal_tests::{mounts, require_root, shoal_bin};

#[test]
fn the_readme_demo_runs_and_cleans_up() {
    require_root!();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("shoal-demo-")
        .tempdir()
        .unwrap();
    let demo_dir = dir.path().join("demo");
    let run = |arg: Option<&str>| {
        let mut c = Command::new("bash");
        c.arg(root.join("tests/demo.sh"));
        if let Some(a) = arg {
            c.arg(a);
        }
        c.env("SHOAL_BIN", shoal_bin())
            .env("SHOAL_DEMO_DIR", &demo_dir)
            // The Docker tests own the plugin sockets on this host.
            .env("SHOAL_DEMO_DOCKER_SOCKET", "")
            .output()
            .unwrap()
    };
    let out = run(None);
    let text = String::from_utf8_lossy(&out.stdout);
    let stop = run(Some("stop"));
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Nodes: 3 online of 3"), "{text}");
    assert!(text.contains("hello from Shoal"), "{text}");
    assert!(text.contains("same SHA-256: ok"), "{text}");
    assert!(
        text.contains("written on node 4, read on node 2"),
        "the shared volume part: {text}"
    );
    assert!(stop.status.success());
    assert!(
        !mounts()
            .iter()
            .any(|(_, p)| Path::new(p).starts_with(&demo_dir)),
        "demo stop left mounts behind"
    );
}
