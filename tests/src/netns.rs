//! Several hosts on one machine: a network namespace per node, linked to a bridge that
//! also carries etcd's address, so a test can cut a node off (or only its store).

use super::*;

/// Hosts with their own addresses: one network namespace per node, each linked by a veth
/// pair to a bridge in this namespace, which also carries etcd's address (`.1`).
pub struct HostNet {
    tag: String,
    hosts: Vec<usize>,
}

pub(crate) fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(st.success(), "ip {} failed", args.join(" "));
}

/// Whether network namespaces can be made here (root with iproute2 and nsenter).
pub fn can_netns() -> bool {
    let works = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    can_mount() && works("ip", &["netns", "list"]) && works("nsenter", &["--version"])
}

/// `n` nodes, each in its own network namespace (so a test can cut one off), with a
/// replica timeout of 2 s; None, after saying why, where namespaces cannot be made.
pub fn netns_cluster(n: usize) -> Option<Cluster> {
    if !can_netns() {
        eprintln!("SKIPPED: needs root, iproute2 and nsenter for network namespaces");
        return None;
    }
    Some(Cluster::start(
        n,
        Opts {
            netns: true,
            extra_args: vec!["--replica-timeout".into(), "2".into()],
            ..Opts::default()
        },
    ))
}

impl HostNet {
    pub(crate) fn create(net: &str) -> HostNet {
        let h = HostNet {
            tag: format!("{:04x}", rand::random::<u16>()),
            hosts: Vec::new(),
        };
        let br = h.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        h
    }

    pub(crate) fn bridge(&self) -> String {
        format!("sbr{}", self.tag)
    }

    pub(crate) fn ns_name(&self, i: usize) -> String {
        format!("shoal-{}-{i}", self.tag)
    }

    pub(crate) fn veth(&self, i: usize) -> String {
        format!("sv{}{i}", self.tag)
    }

    pub(crate) fn add_host(&mut self, i: usize, addr: &str) {
        let (ns, veth, peer) = (self.ns_name(i), self.veth(i), format!("sp{}{i}", self.tag));
        ip(&["netns", "add", &ns]);
        self.hosts.push(i);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["link", "set", &veth, "master", &self.bridge()]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    pub(crate) fn set_link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.veth(i), if up { "up" } else { "down" }]);
    }

    pub(crate) fn destroy(self) {
        for i in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns_name(*i)])
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(*i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}
