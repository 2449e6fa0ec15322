//! Credentials and TLS channels for tests that make gRPC calls to nodes themselves.

use shoal_blockd::auth::{CaRecord, ClusterCa, Credential, Role};
use shoal_blockd::meta::{EtcdAuth, EtcdStore, MetaStore};
use shoal_blockd::records::Keys;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::Cluster;

/// The admin credential node `i` wrote for the CLI.
pub fn admin_credential(c: &Cluster, i: usize) -> Credential {
    let path = c.credentials(i);
    let text = std::fs::read_to_string(&path).unwrap();
    Credential::parse(&text, &path.display().to_string()).unwrap()
}

/// A node certificate of the cluster's CA, issued the way a node issues its own: from
/// the CA record in etcd, opened with the cluster secret.
pub async fn node_credential(c: &Cluster) -> Credential {
    let url = c.etcd.as_ref().expect("a cluster on etcd").url.clone();
    let store = EtcdStore::connect_with(&[url], &EtcdAuth::default())
        .await
        .unwrap();
    let meta = MetaStore::Etcd(Box::new(store));
    let kv = meta.get(&Keys::new("test").ca()).await.unwrap().unwrap();
    let rec: CaRecord = serde_json::from_str(&kv.value).unwrap();
    ClusterCa::unseal(&rec, "test", &c.opts.secret)
        .unwrap()
        .issue(Role::Node, "test")
        .unwrap()
}

/// A credential of `role` from a CA that is not the cluster's.
pub fn foreign_credential(role: Role) -> Credential {
    ClusterCa::generate("test")
        .unwrap()
        .issue(role, "x")
        .unwrap()
}

/// A channel to `endpoint` over TLS with `cred`, or plain HTTP/2 without one.
pub async fn channel(
    endpoint: &str,
    cred: Option<&Credential>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if cred.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{endpoint}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Some(cred) = cred {
        ep = ep.tls_config(cred.client_tls())?;
    }
    ep.connect().await
}

/// A TLS channel to `endpoint` with settings made by the test.
pub async fn channel_with(
    endpoint: &str,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{endpoint}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}
