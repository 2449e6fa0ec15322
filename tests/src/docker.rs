//! A real Docker engine for the plugin tests: `dockerd` (Debian's docker.io) started with
//! its own API socket, data root and exec root below a temporary directory, no bridge
//! and no iptables (no network is needed: containers run with `--network none`), and a
//! tiny image built `FROM scratch` with the host's static busybox (and util-linux's
//! `flock`, which busybox lacks).
//!
//! Docker finds volume plugins in `/run/docker/plugins` whatever its roots are, so each
//! test gives its node a socket name of its own there ([`plugin_socket`]) and uses that
//! name as the driver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{cleanup_mounts, wait_until, Cluster, CmdOut, Opts};

/// The image [`Dockerd::start`] builds: `/bin/busybox` and its applets, nothing else.
pub const IMAGE: &str = "shoal-test-busybox:1";

/// Whether dockerd, the docker client and a static busybox are installed.
pub fn available() -> bool {
    ["/usr/bin/busybox", "/usr/sbin/dockerd", "/usr/bin/docker"]
        .iter()
        .all(|p| Path::new(p).exists())
        || (which("dockerd").is_some() && which("docker").is_some() && busybox().is_some())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn busybox() -> Option<PathBuf> {
    Some(PathBuf::from("/usr/bin/busybox"))
        .filter(|p| p.exists())
        .or_else(|| which("busybox"))
}

/// The docker client of the engine's own package when present (a newer client found
/// first on PATH works too, but the pair is what the engine was tested with).
fn client() -> PathBuf {
    let deb = PathBuf::from("/usr/bin/docker");
    if deb.exists() {
        deb
    } else {
        which("docker").expect("docker client")
    }
}

/// Skips the calling test when Docker is not installed (`tests/setup.sh` installs it).
#[macro_export]
macro_rules! require_docker {
    () => {
        $crate::require_root!();
        if !$crate::docker::available() {
            eprintln!("SKIPPED: needs dockerd, docker and busybox (apt-get install docker.io busybox-static)");
            return;
        }
    };
}

/// A socket path in Docker's plugin directory with a name of this test's own: the
/// driver name is the file name without `.sock`.
pub fn plugin_socket(tag: &str) -> (String, String) {
    let driver = format!("shoaltest-{tag}-{:04x}", rand::random::<u16>());
    (format!("/run/docker/plugins/{driver}.sock"), driver)
}

/// Copies the file `path` (following links) to the same path below `root`.
fn copy_into(root: &Path, path: &Path) {
    let dest = root.join(path.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(path, &dest).unwrap();
}

/// Removes test plugin sockets (and a default `shoal.sock`) nobody serves any more, left
/// by a node that was killed: Docker retries a dead plugin socket for half a minute on
/// every global lookup.
fn sweep_dead_plugin_sockets() {
    let Ok(dir) = std::fs::read_dir("/run/docker/plugins") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let ours = name.starts_with("shoaltest-") || name == "shoal.sock";
        if ours && std::os::unix::net::UnixStream::connect(&p).is_err() {
            let _ = std::fs::remove_file(&p);
        }
    }
}

pub struct Dockerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    host: String,
}

impl Dockerd {
    /// Starts dockerd and builds [`IMAGE`].
    pub fn start() -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("shoal-dockerd-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("docker.sock");
        let host = format!("unix://{}", sock.display());
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new(which("dockerd").unwrap_or_else(|| "/usr/sbin/dockerd".into()))
            .args(["-H", &host])
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        sweep_dead_plugin_sockets();
        let mut d = Dockerd {
            dir,
            child: Some(child),
            host,
        };
        wait_until(Duration::from_secs(60), "dockerd answering", || {
            d.docker(&["version"]).ok
        });
        d.build_image();
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn build_image(&mut self) {
        let ctx = self.dir.path().join("image");
        let root = ctx.join("root");
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let bb = busybox().expect("busybox");
        std::fs::copy(&bb, bin.join("busybox")).unwrap();
        let list = Command::new(&bb).arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.is_empty() {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
            }
        }
        // busybox has no flock applet: util-linux's, with the libraries it loads.
        if let Some(flock) = which("flock") {
            copy_into(&root, &flock);
            let ldd = Command::new("ldd").arg(&flock).output().unwrap();
            for line in String::from_utf8_lossy(&ldd.stdout).lines() {
                if let Some(lib) = line.split_whitespace().find(|w| w.starts_with('/')) {
                    copy_into(&root, Path::new(lib));
                }
            }
        }
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY root /\nENV PATH=/bin:/usr/bin\n",
        )
        .unwrap();
        self.build(IMAGE, &ctx);
    }

    /// `docker build -t TAG CTX` with the classic builder (BuildKit needs more than this
    /// engine is given).
    pub fn build(&self, tag: &str, ctx: &Path) {
        let out = Command::new(client())
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag])
            .arg(ctx)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker build {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `docker ARGS` against this engine.
    pub fn docker(&self, args: &[&str]) -> CmdOut {
        let out = Command::new(client())
            .env("DOCKER_HOST", &self.host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker");
        CmdOut::from(out)
    }

    /// `docker ARGS`, panicking with its output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.ok,
            "docker {} failed: {}\n{}",
            args.join(" "),
            out.stderr,
            out.stdout
        );
        out.stdout
    }

    /// `docker ARGS`, expecting failure with `needle` in its error output.
    pub fn err(&self, args: &[&str], needle: &str) -> String {
        let out = self.docker(args);
        assert!(
            !out.ok,
            "docker {} succeeded, expected {needle:?}: {}",
            args.join(" "),
            out.stdout
        );
        assert!(
            out.stderr.contains(needle),
            "docker {}: expected {needle:?} in: {}",
            args.join(" "),
            out.stderr
        );
        out.stderr
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]).stdout;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.docker(&args);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on a child pid we own.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // dockerd's containerd and shims, if any outlived it.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.dir.path().to_string_lossy().as_ref())
            .status();
        cleanup_mounts(self.dir.path());
    }
}

/// A cluster of `n` nodes whose plugins listen on `sockets` (node `i` on `sockets[i]`).
pub fn cluster(n: usize, sockets: &[&str]) -> Cluster {
    Cluster::start(
        n,
        Opts {
            docker_sockets: sockets.iter().map(|s| s.to_string()).collect(),
            ..Opts::default()
        },
    )
}

/// `docker run` with no network, then `extra`.
pub fn run<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--network", "none"];
    a.extend_from_slice(extra);
    a
}
