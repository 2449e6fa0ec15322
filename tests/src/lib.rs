//! Test harness: real etcd, real `shoal node` processes on loopback addresses, and
//! clean-up that runs even when a test fails.
//!
//! A [`Cluster`] owns a temporary directory. Everything it starts lives below it: etcd's
//! data, each node's data dir, every mount point a test asks for. Dropping the cluster
//! kills the processes and then releases, in order, every mount below the directory
//! (ext4 mounts, loop devices whose backing file is below it, FUSE mounts), so a failed
//! test leaves nothing mounted behind.
//!
//! Each cluster takes its own `127.A.B.0/24` block of loopback addresses at random, so
//! tests can run in parallel; node `i` listens on `127.A.B.(i+2)`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod docker;
mod etcd;
mod files;
mod netns;
pub mod shared_vols;
pub mod tls;

pub use etcd::{free_port, Etcd};
pub use files::{
    cleanup_mounts, fcntl_lock, mounts, sha256_file, wait_until, write_random_file,
    write_secret_file,
};

use netns::ip;
pub use netns::{can_netns, netns_cluster, HostNet};

/// The `shoal` binary under test.
pub fn shoal_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = root.join("target/debug/shoal");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p shoal) or set SHOAL_BIN",
        bin.display()
    );
    bin
}

/// Whether this process may mount (FUSE, loop devices). Integration tests need root.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/fuse").exists()
}

/// Skips the calling test (returns early) with a clear message when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::can_mount() {
            eprintln!("SKIPPED: this test needs root and /dev/fuse (real mounts)");
            return;
        }
    };
}

/// What a CLI call returned.
#[derive(Debug)]
pub struct CmdOut {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics with the output unless the call succeeded.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(self.ok, "{what} failed: {}\n{}", self.stderr, self.stdout);
        self
    }

    /// Panics unless the call failed with a one-line error containing `needle`.
    pub fn expect_err(self, needle: &str) -> Self {
        assert!(
            !self.ok,
            "expected failure with {needle:?}, got success: {}",
            self.stdout
        );
        let first = self.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && first.contains(needle),
            "expected one-line error containing {needle:?}, got: {}",
            self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Options for starting a cluster.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Use etcd (true) or each node's embedded store (false; one node only).
    pub etcd: bool,
    pub secret: String,
    /// Pool capacity per node (`--capacity`).
    pub capacity: String,
    /// (zone, rack) per node; default all "default".
    pub labels: Vec<(String, String)>,
    /// More `shoal node start` arguments, for every node.
    pub extra_args: Vec<String>,
    /// Run each node in its own network namespace (a host with its own address on a
    /// bridge), so a test can cut a node off the network.
    pub netns: bool,
    /// Docker plugin socket per node (by index; "default" for the node's default);
    /// nodes without one serve no plugin, so several nodes share this host.
    pub docker_sockets: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            etcd: true,
            secret: "test-secret".into(),
            capacity: "4G".into(),
            labels: Vec::new(),
            extra_args: Vec::new(),
            netns: false,
            docker_sockets: Vec::new(),
        }
    }
}

/// One `shoal node` process.
pub struct NodeProc {
    child: Option<Child>,
    pub ip: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    /// Extra environment for the node process (failpoints), from its next start.
    pub env: Vec<(String, String)>,
}

impl NodeProc {
    pub fn endpoint(&self) -> String {
        format!("{}:9710", self.ip)
    }

    /// The node's id, pinned in its data dir.
    pub fn id(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node-id"))
            .expect("node id file")
            .trim()
            .to_string()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }
}

/// A cluster of real node processes. See the module doc.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The bridge and namespaces when `opts.netns`.
    pub hostnet: Option<HostNet>,
    pub etcd: Option<Etcd>,
    pub nodes: Vec<NodeProc>,
    pub opts: Opts,
    net: String,
}

impl Cluster {
    /// Starts etcd (per `opts`) and `n` nodes, and waits until every node sees all as online.
    pub fn start(n: usize, opts: Opts) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("shoal-test-")
            .tempdir()
            .unwrap();
        let a = 1 + rand::random::<u8>() % 250;
        let b = 1 + rand::random::<u8>() % 250;
        let (hostnet, net, etcd_host) = if opts.netns {
            let h = HostNet::create(&format!("10.{a}.{b}"));
            let host = format!("10.{a}.{b}.1");
            (Some(h), format!("10.{a}.{b}"), host)
        } else {
            (None, format!("127.{a}.{b}"), "127.0.0.1".to_string())
        };
        let etcd = opts.etcd.then(|| Etcd::start(dir.path(), &etcd_host));
        let mut c = Cluster {
            dir,
            hostnet,
            etcd,
            nodes: Vec::new(),
            opts,
            net,
        };
        for _ in 0..n {
            c.add_node();
        }
        c.wait_all_online();
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file (mode 0600) holding `opts.secret`, made on first use.
    pub fn secret_file(&self) -> PathBuf {
        let path = self.path().join("secret");
        if !path.exists() {
            write_secret_file(&path, &self.opts.secret);
        }
        path
    }

    /// The node start arguments for node number `i`.
    pub fn node_args(&self, i: usize) -> Vec<String> {
        let ip = format!("{}.{}", self.net, i + 2);
        let data = self.path().join(format!("node{i}"));
        let (zone, rack) = self
            .opts
            .labels
            .get(i)
            .cloned()
            .unwrap_or(("default".into(), "default".into()));
        let mut args: Vec<String> = vec![
            "node".into(),
            "start".into(),
            "--cluster-id".into(),
            "test".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("{ip}:9710"),
            "--gossip".into(),
            format!("{ip}:9711"),
            "--secret-file".into(),
            self.secret_file().display().to_string(),
            "--zone".into(),
            zone,
            "--rack".into(),
            rack,
        ];
        if !self.opts.capacity.is_empty() {
            args.push("--capacity".into());
            args.push(self.opts.capacity.clone());
        }
        if let Some(e) = &self.etcd {
            args.push("--kvdb".into());
            args.push(e.url.clone());
        }
        // "default": no flag, the node serves Docker's default socket.
        match self.opts.docker_sockets.get(i).map(String::as_str) {
            Some("default") => {}
            other => {
                args.push("--docker-socket".into());
                args.push(other.unwrap_or_default().to_string());
            }
        }
        args.extend(self.opts.extra_args.iter().cloned());
        args
    }

    /// Starts one more node and waits until it answers.
    pub fn add_node(&mut self) -> usize {
        let args = self.node_args(self.nodes.len());
        self.add_node_with(args, Vec::new())
    }

    /// Starts one more node with these arguments and environment, and waits until it
    /// answers.
    pub fn add_node_with(&mut self, args: Vec<String>, env: Vec<(String, String)>) -> usize {
        let i = self.nodes.len();
        let ip = format!("{}.{}", self.net, i + 2);
        let data_dir = self.path().join(format!("node{i}"));
        if let Some(h) = &mut self.hostnet {
            h.add_host(i, &ip);
        }
        self.nodes.push(NodeProc {
            child: None,
            ip,
            data_dir,
            args,
            env,
        });
        self.spawn(i);
        i
    }

    fn spawn(&mut self, i: usize) {
        let log_path = self.path().join(format!("node{i}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = match &self.hostnet {
            // nsenter enters only the network namespace: mounts stay visible to the test.
            Some(h) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", h.ns_name(i)))
                    .arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        let node = &mut self.nodes[i];
        // Written again at every start (after the join): a stale one from an earlier
        // run, maybe of another CA, must not look like readiness.
        let _ = std::fs::remove_file(node.data_dir.join("admin.pem"));
        let child = cmd
            .args(&node.args)
            .env("RUST_LOG", "info")
            .env_remove("SHOAL_ENDPOINT")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn shoal node");
        node.child = Some(child);
        let ep = node.endpoint();
        let mut waited = Duration::ZERO;
        // Serving, and the admin credential written (the port is bound before the node
        // has joined and issued it).
        let creds = node.data_dir.join("admin.pem");
        while std::net::TcpStream::connect(&ep).is_err() || !creds.exists() {
            if let Some(st) = self.nodes[i].child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node {i} exited with {st} during start:\n{}", self.log(i));
            }
            std::thread::sleep(Duration::from_millis(50));
            waited += Duration::from_millis(50);
            assert!(
                waited < Duration::from_secs(30),
                "node {i} did not start:\n{}",
                self.log(i)
            );
        }
    }

    /// The node's log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.path().join(format!("node{i}.log"))).unwrap_or_default()
    }

    /// The admin credential node `i` wrote (any node's works for every node).
    pub fn credentials(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.join("admin.pem")
    }

    /// Runs `shoal ARGS` against node `i`.
    pub fn shoal(&self, i: usize, args: &[&str]) -> CmdOut {
        let out = Command::new(shoal_bin())
            .args(args)
            .env("SHOAL_ENDPOINT", self.nodes[i].endpoint())
            .env("SHOAL_CREDENTIALS", self.credentials(i))
            .stdin(Stdio::null())
            .output()
            .expect("run shoal");
        CmdOut::from(out)
    }

    /// Runs `shoal ARGS --json` against node `i` and parses the output.
    pub fn json(&self, i: usize, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.shoal(i, &a).expect_ok(&args.join(" ")).json()
    }

    /// Node states as node `i` reports them: id → "online" | "offline".
    pub fn states(&self, i: usize) -> Vec<(String, String)> {
        let s = self.json(i, &["status"]);
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Waits until the first running node reports every node online.
    pub fn wait_all_online(&mut self) {
        let n = self.nodes.len();
        let asker = (0..n)
            .find(|&i| self.nodes[i].running())
            .expect("a running node");
        wait_until(Duration::from_secs(30), "all nodes online", || {
            let st = self.states(asker);
            st.len() == n && st.iter().all(|(_, s)| s == "online")
        });
    }

    pub fn signal(&self, i: usize, sig: i32) {
        let pid = self.nodes[i].pid().expect("node is running");
        // SAFETY: kill(2) on a child pid we own.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGKILL);
        let _ = self.nodes[i].child.take().unwrap().wait();
    }

    /// SIGTERM node `i` and return its exit code.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        self.signal(i, libc::SIGTERM);
        let st = self.nodes[i].child.take().unwrap().wait().unwrap();
        st.code()
    }

    /// Cuts node `i` off the network (its link to the bridge goes down).
    pub fn cut(&self, i: usize) {
        self.hostnet
            .as_ref()
            .expect("a netns cluster")
            .set_link(i, false);
    }

    /// Cuts node `i` off the metadata store only (etcd on the host's bridge address):
    /// it still reaches the other nodes, and they it (gossip says it is alive).
    pub fn cut_store(&self, i: usize) {
        let h = self.hostnet.as_ref().expect("a netns cluster");
        let store = format!("{}.1/32", self.net);
        ip(&["-n", &h.ns_name(i), "route", "add", "blackhole", &store]);
    }

    /// Gives node `i` its metadata store back (see [`Cluster::cut_store`]).
    pub fn heal_store(&self, i: usize) {
        let h = self.hostnet.as_ref().expect("a netns cluster");
        let store = format!("{}.1/32", self.net);
        ip(&["-n", &h.ns_name(i), "route", "del", "blackhole", &store]);
    }

    /// Puts node `i` back on the network.
    pub fn heal(&self, i: usize) {
        self.hostnet
            .as_ref()
            .expect("a netns cluster")
            .set_link(i, true);
    }

    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// Starts a stopped or killed node again with the same arguments.
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].running() {
            self.kill(i);
        }
        self.spawn(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: kill(2) on a child pid we own; SIGCONT first so a paused node dies.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        cleanup_mounts(self.dir.path());
        // A killed node leaves its plugin socket behind, and Docker would wait on it.
        for s in &self.opts.docker_sockets {
            let path = match s.as_str() {
                "default" => "/run/docker/plugins/shoal.sock",
                p => p,
            };
            if path.starts_with('/') && std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(e) = &mut self.etcd {
            e.stop();
        }
        if let Some(h) = self.hostnet.take() {
            h.destroy();
        }
    }
}
