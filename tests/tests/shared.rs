//! Shared volumes: one namespace mounted on several nodes at once, over real node
//! processes, etcd and FUSE. Each check is what an application on one host relies on
//! about what another host did.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use shoal_tests::{mounts, require_root, Cluster, Opts};

/// A shared volume with repl 2 on three nodes, mounted on every node.
fn mounted_everywhere(name: &str) -> (Cluster, Vec<PathBuf>) {
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

fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(_, m)| Path::new(m) == p)
}

#[test]
fn one_namespace_on_three_hosts_sees_every_change_at_once() {
    require_root!();
    let (c, m) = mounted_everywhere("web");
    // Exactly one node coordinates; the other mounts talk to it.
    let v = c.json(0, &["volume", "inspect", "web"]);
    assert!(v["attached_node"].as_str().is_some(), "{v}");
    assert_eq!(v["shared"], true);

    // Create on A, see on B and C.
    fs::create_dir_all(m[0].join("uploads/2026")).unwrap();
    fs::write(m[0].join("uploads/2026/a.txt"), b"first").unwrap();
    assert_eq!(fs::read(m[1].join("uploads/2026/a.txt")).unwrap(), b"first");
    assert!(m[2].join("uploads/2026").is_dir());

    // Write on B, read on A right after: size and bytes.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(m[1].join("uploads/blob"), &blob).unwrap();
    assert_eq!(
        fs::metadata(m[0].join("uploads/blob")).unwrap().len(),
        3_000_000
    );
    assert_eq!(fs::read(m[0].join("uploads/blob")).unwrap(), blob);
    // Overwrite in place on C: no stale bytes on A.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m[2].join("uploads/blob"))
        .unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(1_000_000)).unwrap();
    f.write_all(b"CHANGED").unwrap();
    drop(f);
    let back = fs::read(m[0].join("uploads/blob")).unwrap();
    assert_eq!(&back[1_000_000..1_000_007], b"CHANGED");
    assert_eq!(back.len(), 3_000_000);

    // Rename on A over an existing file, unlink on B: everyone agrees.
    fs::write(m[0].join("uploads/b.txt"), b"second").unwrap();
    fs::rename(m[0].join("uploads/2026/a.txt"), m[0].join("uploads/b.txt")).unwrap();
    assert_eq!(fs::read(m[2].join("uploads/b.txt")).unwrap(), b"first");
    assert!(!m[1].join("uploads/2026/a.txt").exists());
    fs::remove_file(m[1].join("uploads/b.txt")).unwrap();
    assert!(!m[0].join("uploads/b.txt").exists());
    let mut names: Vec<String> = fs::read_dir(m[2].join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["2026", "blob"]);

    // Symlinks, hard links, modes and ownership travel too.
    std::os::unix::fs::symlink("blob", m[0].join("uploads/link")).unwrap();
    assert_eq!(
        fs::read_link(m[1].join("uploads/link")).unwrap(),
        Path::new("blob")
    );
    fs::hard_link(m[0].join("uploads/blob"), m[0].join("uploads/hard")).unwrap();
    assert_eq!(fs::metadata(m[2].join("uploads/blob")).unwrap().nlink(), 2);
    std::os::unix::fs::chown(m[1].join("uploads/hard"), Some(1234), Some(99)).unwrap();
    let md = fs::metadata(m[0].join("uploads/blob")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 99));

    // df shows the volume's size.
    let st = nix::sys::statvfs::statvfs(&m[2]).unwrap();
    let total = st.blocks() * st.fragment_size();
    assert!(total > 1900 << 20 && total <= 2 << 30, "df size {total}");

    // Unmount one host; the others go on.
    c.shoal(1, &["volume", "unmount", m[1].to_str().unwrap()])
        .expect_ok("unmount");
    assert!(!is_mounted(&m[1]));
    assert_eq!(
        fs::read(m[2].join("uploads/hard")).unwrap().len(),
        3_000_000
    );
}

#[test]
fn appends_from_two_hosts_never_interleave_within_a_write() {
    require_root!();
    let (_c, m) = mounted_everywhere("log");
    let path_a = m[0].join("app.log");
    fs::write(&path_a, b"").unwrap();
    let writers: Vec<_> = (0..2)
        .map(|h| {
            let p = m[h].join("app.log");
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
                for i in 0..300 {
                    // One write() call per record.
                    let rec = format!("host{h}-{i:04}-{}\n", "x".repeat(100 + h * 50));
                    f.write_all(rec.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let text = fs::read_to_string(m[2].join("app.log")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 600, "every record is there, none overwritten");
    for l in &lines {
        let ok = (l.starts_with("host0-") && l.len() == 111)
            || (l.starts_with("host1-") && l.len() == 161);
        assert!(ok, "a torn record: {l:?}");
    }
}

#[test]
fn the_namespace_survives_a_coordinator_restart() {
    require_root!();
    let mut c = Cluster::start(2, Opts::default());
    c.shoal(
        0,
        &[
            "volume", "create", "keep", "--size", "1G", "--repl", "2", "--shared",
        ],
    )
    .expect_ok("create");
    let mnt = c.path().join("mnt");
    c.shoal(0, &["volume", "mount", "keep", mnt.to_str().unwrap()])
        .expect_ok("mount");
    for i in 0..200 {
        fs::write(mnt.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    let f = fs::File::open(mnt.join("f7")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // kill -9 the coordinator's node: no clean shutdown, no checkpoint.
    c.kill(0);
    shoal_tests::cleanup_mounts(&mnt);
    c.restart(0);
    c.wait_all_online();
    let mnt2 = c.path().join("mnt2");
    c.shoal(1, &["volume", "mount", "keep", mnt2.to_str().unwrap()])
        .expect_ok("mount after the restart");
    for i in 0..200 {
        assert_eq!(
            fs::read_to_string(mnt2.join(format!("f{i}"))).unwrap(),
            format!("content {i}"),
            "journal replayed"
        );
    }
}
