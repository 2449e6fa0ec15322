//! gRPC requests from strangers and garbage: refused with a clear status, node stays up.

use std::io::Write;

use shoal_proto::block::block_client::BlockClient;
use shoal_proto::block::{ReplicaRef, WriteRequest};
use shoal_proto::control::control_client::ControlClient;
use shoal_proto::control::{CreateVolumeRequest, MountRequest, VolumeRef};
use shoal_tests::{require_root, Cluster, Opts};
use tonic::Code;

#[test]
fn garbage_and_unauthenticated_requests_are_refused() {
    require_root!();
    let c = Cluster::start(1, Opts::default());
    let url = format!("http://{}", c.nodes[0].endpoint());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Block API without the cluster token.
        let mut b = BlockClient::connect(url.clone()).await.unwrap();
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

        // Control API with nonsense fields.
        let mut ctl = ControlClient::connect(url.clone()).await.unwrap();
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
    // The node still answers and nothing was created.
    let list = c.json(0, &["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 0);
}
