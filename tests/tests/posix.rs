//! POSIX conformance of a shared-volume mount: the pjdfstest suite (`tests/pjdfstest.sh`)
//! against a real mount served by a real node; fails when the pass rate drops under
//! 97 % of the tests that run (skipped ones and why: docs/posix.md).

use std::process::Command;

use shoal_tests::{require_root, Cluster, Opts};

#[test]
fn pjdfstest_passes_on_a_shared_mount() {
    require_root!();
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"))
        .join("bin/pjdfstest");
    let installed = cargo_bin.exists()
        || Command::new("pjdfstest")
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(installed, "pjdfstest is not installed: run tests/setup.sh");
    let c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "posix", "--size", "2G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    // Mounted on the node that is not the coordinator: every call crosses the network.
    let m0 = c.path().join("mnt-0");
    c.shoal(0, &["volume", "mount", "posix", m0.to_str().unwrap()])
        .expect_ok("first mount (coordinator)");
    let m1 = c.path().join("mnt-1");
    c.shoal(1, &["volume", "mount", "posix", m1.to_str().unwrap()])
        .expect_ok("mount");
    // The EROFS tests remount the mount read-only and back with mount(8), which hands a
    // `fuse.shoal` mount to /sbin/mount.fuse.shoal. Installed as a user would (and left in
    // place: another test may be using it; tests/run.sh removes it at the end).
    let helper = std::path::Path::new("/sbin/mount.fuse.shoal");
    let _ = std::os::unix::fs::symlink(shoal_tests::shoal_bin(), helper);
    let remount = std::fs::read_link(helper).ok() == Some(shoal_tests::shoal_bin());
    if !remount {
        eprintln!(
            "NOTE: {} is not this build's shoal: EROFS tests skipped",
            helper.display()
        );
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&m1)
        .env("PJDFSTEST_MIN_RATE", "97")
        .env("PJDFSTEST_REMOUNT", if remount { "1" } else { "0" })
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pjdfstest below the bar:\n{text}");
    assert!(text.contains("pjdfstest: "), "{text}");
}
