//! A real etcd server for a test, on a free loopback port, killed when dropped.

use super::*;

/// An etcd server on a free loopback port.
pub struct Etcd {
    child: Option<Child>,
    pub url: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    host: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd listening on `host` (an address of this network namespace).
    pub fn start(dir: &Path, host: &str) -> Etcd {
        let mut e = Etcd {
            child: None,
            url: String::new(),
            dir: dir.join("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
            host: host.to_string(),
        };
        e.url = format!("http://{host}:{}", e.client_port);
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd binary (apt-get install etcd-server)");
        self.child = Some(child);
        let addr = format!("{}:{}", self.host, self.client_port);
        wait_until(Duration::from_secs(20), "etcd to listen", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    /// Stops etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
