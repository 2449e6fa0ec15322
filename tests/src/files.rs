//! Small helpers of the tests: locks, mounts and their clean-up, waiting, files and their
//! checksums, secret files.

use super::*;

/// An fcntl (POSIX) lock of the whole file: `typ` F_RDLCK, F_WRLCK or F_UNLCK; `wait`
/// blocks until granted (F_SETLKW).
pub fn fcntl_lock(f: &std::fs::File, typ: i32, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fl = libc::flock {
        l_type: typ as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    // SAFETY: fcntl on a descriptor the file owns, with a valid flock.
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Releases every mount and loop device below `dir`, deepest first.
pub fn cleanup_mounts(dir: &Path) {
    // ext4 (and any other) mounts of loop devices backed by files below dir.
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if !Path::new(b.trim().trim_end_matches(" (deleted)")).starts_with(dir) {
                continue;
            }
            let dev = format!("/dev/{name}");
            for m in mounts().into_iter().filter(|(src, _)| *src == dev) {
                let _ = Command::new("umount").arg("-l").arg(&m.1).status();
            }
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
    let mut below: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|(_, p)| PathBuf::from(p))
        .filter(|p| p.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in below {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}

/// (source, mount point) of every mount.
pub fn mounts() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.replace("\\040", " ")))
        })
        .collect()
}

/// Polls `f` until it holds, panicking with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Writes `mib` MiB of random data to `path` with fsync, returning its SHA-256.
pub fn write_random_file(path: &Path, mib: usize) -> String {
    use rand::RngExt;
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut h = Sha256::new();
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill(&mut buf[..]);
        f.write_all(&buf).unwrap();
        h.update(&buf);
    }
    f.sync_all().unwrap();
    hex::encode(h.finalize())
}

/// Writes `secret` to a new file only its owner can read, as a node's `--secret-file`.
pub fn write_secret_file(path: &Path, secret: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(secret.as_bytes()).unwrap();
}
