//! gRPC requests from strangers and garbage: refused with a clear status, node stays up.

use std::io::Write;

use shoal_blockd::auth::Role;
use shoal_blockd::peers::{cluster_token, PeerTls, Peers};
use shoal_blockd::write_http::send_write;
use shoal_blockd::write_wire::{request_parts, Header};
use shoal_proto::block::block_client::BlockClient;
use shoal_proto::block::{OpenRequest, ReadRequest, ReplicaRef, WriteRequest};
use shoal_proto::control::control_client::ControlClient;
use shoal_proto::control::{CreateVolumeRequest, MountRequest, VolumeRef};
use shoal_tests::tls::{admin_credential, channel, foreign_credential, node_credential};
use shoal_tests::{require_root, Cluster, Opts};
use tonic::Code;

#[test]
fn garbage_and_unauthenticated_requests_are_refused() {
    require_root!();
    let c = Cluster::start(1, Opts::default());
    let ep = c.nodes[0].endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = admin_credential(&c, 0);
        let node = node_credential(&c).await;
        let peers = |token: &str| {
            Peers::with_tls(
                token,
                Some(PeerTls {
                    node: node.client_tls(),
                    admin: admin.client_tls(),
                }),
            )
        };
        // Block API with a node certificate but without the cluster token.
        let mut b = BlockClient::new(channel(&ep, Some(&node)).await.unwrap());
        let err = b
            .write(WriteRequest {
                replica: Some(ReplicaRef {
                    volume_id: "abc".into(),
                    size_bytes: 1 << 20,
                }),
                offset: 0,
                data: vec![1u8; 16].into(),
                fua: false,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        // The same through the sender that skips tonic's codec.
        let stranger = peers("not-the-token").block(&ep).unwrap();
        let nobody = ReplicaRef {
            volume_id: "strangers".into(),
            size_bytes: 4 << 20,
        };
        let header = |rep, offset| Header {
            replica: rep,
            offset,
            fua: false,
            epoch: 1,
            version: 1,
            complete_below: 0,
        };
        let err = stranger
            .write_bytes(&header(&nobody, 0), vec![1u8; 16].into())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");

        // Even a member cannot make a replica by writing to it, nor open one the volume
        // records do not place on the node, nor fence a volume past its record's epoch.
        let member = peers(&cluster_token("test", "test-secret"));
        let mut m = member.block(&ep).unwrap();
        let err = m
            .write_bytes(&header(&nobody, 0), vec![1u8; 16].into())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err}");
        let open = |rep: &ReplicaRef, epoch| OpenRequest {
            replica: Some(rep.clone()),
            epoch,
            min_version: 0,
            mark: 0,
        };
        let err = m.open(open(&nobody, 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert!(
            !c.nodes[0]
                .data_dir
                .join("pool/replicas/strangers.img")
                .exists(),
            "nothing made"
        );
        // A real volume, attached here: its replica follows epoch 1.
        let v = c.json(0, &["volume", "create", "strangers", "--size", "4M"]);
        let id = v["id"].as_str().unwrap().to_string();
        c.shoal(0, &["volume", "attach", "strangers"])
            .expect_ok("attach");
        let rep = ReplicaRef {
            volume_id: id,
            size_bytes: 4 << 20,
        };
        let err = m.open(open(&rep, u64::MAX)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("newer than"), "{err}");
        let err = m
            .write(WriteRequest {
                replica: Some(rep.clone()),
                data: vec![1u8; 16].into(),
                epoch: u64::MAX,
                version: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("never opened"), "{err}");
        let header = |offset| header(&rep, offset);

        // A member's writes, encoded by tonic and by our sender, land where they say;
        // one past the replica's end, or for a bad id, is refused and writes nothing.
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let b: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 239) as u8).collect();
        m.write(WriteRequest {
            replica: Some(rep.clone()),
            offset: 4096,
            data: a.clone().into(),
            epoch: 1,
            version: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        m.write_bytes(&header(2 << 20), b.clone().into())
            .await
            .unwrap();
        // A reader from an epoch the replica has left behind (a replaced coordinator)
        // is refused.
        let err = m
            .read(ReadRequest {
                replica: Some(rep.clone()),
                offset: 4096,
                length: 16,
                epoch: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("stale epoch"), "{err}");
        let read = |offset: u64, length: usize| {
            let mut m = m.clone();
            let rep = rep.clone();
            async move {
                m.read(ReadRequest {
                    replica: Some(rep),
                    offset,
                    length: length as u32,
                    epoch: 1,
                })
                .await
                .unwrap()
                .into_inner()
                .data
            }
        };
        assert!(read(4096, a.len()).await == a, "tonic-encoded write");
        assert!(read(2 << 20, b.len()).await == b, "write sent as frames");
        let err = m
            .write_bytes(&header((4 << 20) - 8), vec![9u8; 16].into())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("beyond the volume size"), "{err}");
        assert_eq!(&read((4 << 20) - 8, 8).await[..], &[0u8; 8]);
        // Only the node's own route reads messages off the frames: a message in 64 Ki
        // one-byte frames lands whole, and a compressed one is refused by that route.
        let channel = channel(&ep, Some(&node)).await.unwrap();
        let token =
            tonic::codegen::http::HeaderValue::from_str(&cluster_token("test", "test-secret"))
                .unwrap();
        let c: Vec<u8> = (0..(64u32 << 10)).map(|i| (i % 233) as u8).collect();
        let whole: Vec<u8> = request_parts(&header(8192), c.clone().into())
            .iter()
            .flat_map(|p| p.to_vec())
            .collect();
        let tiny = whole.iter().map(|b| bytes::Bytes::copy_from_slice(&[*b]));
        send_write(&channel, &token, tiny).await.unwrap();
        assert!(
            read(8192, c.len()).await == c,
            "write sent in one-byte frames"
        );
        let mut compressed = whole.clone();
        compressed[0] = 1;
        let err = send_write(&channel, &token, [compressed.into()])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err}");
        assert!(err.message().contains("compressed"), "{err}");

        let bad = ReplicaRef {
            volume_id: "../etc".into(),
            size_bytes: 4 << 20,
        };
        let err = m
            .write_bytes(
                &Header {
                    replica: &bad,
                    ..header(0)
                },
                vec![9u8; 16].into(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // Control API with nonsense fields.
        let mut ctl =
            ControlClient::new(shoal_tests::tls::channel(&ep, Some(&admin)).await.unwrap());
        let bad = [
            CreateVolumeRequest {
                name: "".into(),
                size_bytes: 1 << 30,
                repl: 1,
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: 0,
                repl: 1,
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: 1 << 30,
                repl: 99,
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: (1 << 30) + 1,
                repl: 1,
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: u64::MAX - 4095,
                repl: 1,
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: 1 << 30,
                repl: 1,
                fs: "ntfs".into(),
                ..Default::default()
            },
            CreateVolumeRequest {
                name: "ok".into(),
                size_bytes: 1 << 30,
                repl: 1,
                io_priority: "urgent".into(),
                ..Default::default()
            },
        ];
        for req in bad {
            let err = ctl.create_volume(req.clone()).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err}");
        }
        let err = ctl
            .inspect_volume(VolumeRef {
                name: "../../etc".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = ctl
            .mount_volume(MountRequest {
                name: "x".into(),
                path: "relative".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Never over a system directory, nor over one that holds files.
        let full = tempfile::tempdir().unwrap();
        std::fs::write(full.path().join("keep"), b"mine").unwrap();
        for (path, why) in [
            ("/etc".to_string(), "system directory"),
            ("/root/.ssh".to_string(), "system directory"),
            (full.path().display().to_string(), "not an empty directory"),
        ] {
            let err = ctl
                .mount_volume(MountRequest {
                    name: "strangers".into(),
                    path: path.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err}");
            assert!(err.message().contains(why), "{path}: {err}");
        }
        assert_eq!(std::fs::read(full.path().join("keep")).unwrap(), b"mine");
    });

    // Raw garbage on the gRPC port.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
    ] {
        if let Ok(mut s) = std::net::TcpStream::connect(c.nodes[0].endpoint()) {
            let _ = s.write_all(junk);
        }
    }
    // The node still answers and nothing was created but the one volume.
    let list = c.json(0, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// Gossip from a process that knows only the ports (or the wrong secret) is dropped:
/// the node answers nothing. The same announce sealed with the cluster's key is
/// answered, so silence means refusal, not a lost packet.
#[test]
fn forged_gossip_is_dropped() {
    use shoal_blockd::gossip_auth::{gossip_key, seal};
    use shoal_blockd::membership::{announce_payload, GossipId};
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;

    require_root!();
    let c = Cluster::start(1, Opts::default());
    let node: SocketAddr = format!("{}:9711", c.nodes[0].ip).parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let me = sock.local_addr().unwrap();
    let payload = announce_payload(
        GossipId {
            node: "intruder".into(),
            addr: me,
            bump: 1,
        },
        node,
    );
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let answered = |packet: &[u8]| {
        sock.send_to(packet, node).unwrap();
        let mut buf = [0u8; 2048];
        sock.recv_from(&mut buf).is_ok()
    };
    // Bare foca, as a stranger that read the protocol would send it.
    assert!(
        !answered(&payload),
        "an unauthenticated announce was answered"
    );
    // Sealed with another cluster's secret.
    let mut forged = Vec::new();
    seal(
        &gossip_key("test", "not-the-secret"),
        now_ms(),
        1,
        &payload,
        &mut forged,
    );
    assert!(
        !answered(&forged),
        "an announce with a wrong MAC was answered"
    );
    // Garbage.
    assert!(!answered(&[0u8; 64]), "garbage was answered");
    // A member's announce is answered.
    let mut sealed = Vec::new();
    seal(
        &gossip_key("test", &c.opts.secret),
        now_ms(),
        2,
        &payload,
        &mut sealed,
    );
    assert!(answered(&sealed), "a member's announce got no answer");
}

/// Every RPC of every service, as the `.proto` files declare them (a new RPC is covered
/// without touching this test).
fn rpcs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for text in [
        include_str!("../../proto/proto/block.proto"),
        include_str!("../../proto/proto/control.proto"),
        include_str!("../../proto/proto/namespace.proto"),
    ] {
        let mut package = String::new();
        let mut service = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(p) = line.strip_prefix("package ") {
                package = p.trim_end_matches(';').to_string();
            } else if let Some(s) = line.strip_prefix("service ") {
                service = format!("{package}.{}", s.trim_end_matches(" {").trim());
            } else if let Some(r) = line.strip_prefix("rpc ") {
                let method = r.split('(').next().unwrap().trim().to_string();
                out.push((service.clone(), method));
            }
        }
    }
    out
}

/// Calls `/service/method` with an empty message, whatever the method's types are.
async fn call(
    ch: &tonic::transport::Channel,
    service: &str,
    method: &str,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = format!("/{service}/{method}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary(tonic::Request::new(()), path, codec)
        .await
        .map(|_| ())
}

/// Every call of `rpcs` on `ch` fails in the transport, before any service answers.
async fn no_service_answers(ch: &tonic::transport::Channel, rpcs: &[(String, String)], what: &str) {
    for (service, method) in rpcs {
        let err = call(ch, service, method).await.unwrap_err();
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{what}: {service}/{method}: {err}"
        );
    }
}

/// No connection without a certificate of the cluster's CA, on any RPC of any service;
/// a node certificate cannot make control calls; block and namespace calls need the
/// cluster token besides a certificate. Nothing changes on the node.
#[test]
fn every_rpc_needs_the_cluster_ca_and_the_right_role() {
    require_root!();
    let c = Cluster::start(1, Opts::default());
    c.shoal(0, &["volume", "create", "kept", "--size", "4M"])
        .expect_ok("create");
    let ep = c.nodes[0].endpoint();
    let rpcs = rpcs();
    assert!(rpcs.len() >= 25, "{rpcs:?}");
    assert!(rpcs
        .iter()
        .any(|(s, m)| s == "shoal.ns.v1.Namespace" && m == "Callbacks"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Plain HTTP/2, and TLS with certificates of another CA: no call gets an answer
        // from a service (the connection fails, or every call does).
        let others = [
            None,
            Some(foreign_credential(Role::Admin)),
            Some(foreign_credential(Role::Node)),
        ];
        for cred in &others {
            let what = match cred {
                None => "plain HTTP/2",
                Some(_) => "another CA's certificate",
            };
            if let Ok(ch) = channel(&ep, cred.as_ref()).await {
                no_service_answers(&ch, &rpcs, what).await;
            }
        }
        // Trusting the cluster's CA (so the client accepts the node) but showing another
        // CA's certificate, or none: the node refuses the connection or every call.
        let cluster_ca = admin_credential(&c, 0).ca_pem;
        let foreign = foreign_credential(Role::Admin);
        let tls = [
            Some(tonic::transport::Identity::from_pem(
                &foreign.cert_pem,
                &foreign.key_pem,
            )),
            None,
        ];
        for identity in tls {
            let what = if identity.is_some() {
                "another CA's client certificate"
            } else {
                "no client certificate"
            };
            let mut cfg = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&cluster_ca))
                .domain_name(shoal_blockd::auth::NODE_NAME);
            if let Some(id) = identity {
                cfg = cfg.identity(id);
            }
            if let Ok(ch) = shoal_tests::tls::channel_with(&ep, cfg).await {
                no_service_answers(&ch, &rpcs, what).await;
            }
        }
        // The cluster's node certificate: no control call; block and namespace calls
        // without the token are refused before their (empty) bodies are read.
        let node = node_credential(&c).await;
        let ch = channel(&ep, Some(&node)).await.unwrap();
        for (service, method) in &rpcs {
            let err = call(&ch, service, method).await.unwrap_err();
            let want = if service.ends_with(".Control") {
                Code::PermissionDenied
            } else {
                Code::Unauthenticated
            };
            assert_eq!(
                err.code(),
                want,
                "node certificate: {service}/{method}: {err}"
            );
        }
        // The admin credential: control calls are answered, block and namespace calls
        // are not (no token).
        let admin = admin_credential(&c, 0);
        let ch = channel(&ep, Some(&admin)).await.unwrap();
        call(&ch, "shoal.control.v1.Control", "ListVolumes")
            .await
            .unwrap();
        for (service, method) in rpcs.iter().filter(|(s, _)| !s.ends_with(".Control")) {
            let err = call(&ch, service, method).await.unwrap_err();
            assert_eq!(
                err.code(),
                Code::Unauthenticated,
                "admin: {service}/{method}: {err}"
            );
        }
    });
    let list = c.json(0, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // The CLI without a credential stops before it connects, and says what to pass.
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["volume", "list", "--endpoint", &ep])
        .env("SHOAL_CREDENTIALS", c.path().join("nothing-here.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--credentials"), "{err}");
}
