//! The etcd-backed metadata store.
//!
//! Every call has a deadline: an etcd that is down or unreachable makes the call fail
//! with [`Error::MetaUnavailable`] naming the endpoints, instead of hanging.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use super::{Claim, KeyValue};
use crate::error::{Error, Result};

/// How long one etcd call may take before the store reports etcd unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node proves itself to etcd and checks etcd: TLS (the CA that signed etcd's
/// certificate, and a client certificate when etcd asks for one) and a user.
#[derive(Clone, Default)]
pub struct EtcdAuth {
    /// PEM of the CA to trust for etcd's certificate (`https://` endpoints).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of the client certificate and its key, for etcd's `--client-cert-auth`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password, for etcd's `auth enable`.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAuth {
    // Never prints the password or the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (URLs such as `http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with(endpoints, &EtcdAuth::default()).await
    }

    /// Connects to etcd at `endpoints` with TLS and a user as `auth` says.
    pub async fn connect_with(endpoints: &[String], auth: &EtcdAuth) -> Result<Self> {
        let names = endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT);
        if let Some(ca) = &auth.ca_pem {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &auth.client {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = &auth.user {
            // A token that expires (or is revoked by an auth change) is taken again
            // instead of failing every call until the node restarts.
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let client = tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| Error::MetaUnavailable(format!("etcd at {names}: connect timed out")))?
            .map_err(|e| Error::MetaUnavailable(format!("etcd at {names}: {e}")))?;
        let store = Self {
            client,
            endpoints: names,
        };
        // A connect is lazy; one read proves etcd answers.
        store.get("/shoal/.probe").await?;
        Ok(store)
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> Error {
        Error::MetaUnavailable(format!("etcd at {}: {e}", self.endpoints))
    }

    async fn bounded<T, F>(&self, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => Err(self.unavailable("request timed out")),
        }
    }

    fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = String::from_utf8(kv.value().to_vec()).map_err(|_| Error::CorruptRecord {
            key: key.clone(),
            reason: "value is not UTF-8".into(),
        })?;
        Ok(KeyValue {
            key,
            value,
            rev: kv.mod_revision(),
        })
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut c = self.client.clone();
        let resp = self.bounded(c.get(key, None)).await?;
        resp.kvs().first().map(Self::to_kv).transpose()
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        resp.kvs().iter().map(Self::to_kv).collect()
    }

    pub async fn put(&self, key: &str, value: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.bounded(c.put(key, value, None)).await?;
        Ok(())
    }

    pub async fn put_if(&self, key: &str, value: &str, expected_rev: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected_rev)])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self.bounded(c.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    pub async fn delete_put_if(
        &self,
        key: &str,
        expected_rev: i64,
        put_key: &str,
        value: &str,
    ) -> Result<bool> {
        if expected_rev == 0 {
            return Ok(false);
        }
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected_rev)])
            .and_then([
                TxnOp::delete(key, None::<DeleteOptions>),
                TxnOp::put(put_key, value, None),
            ]);
        let resp = self.bounded(c.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    pub async fn delete_if(&self, key: &str, expected_rev: i64) -> Result<bool> {
        if expected_rev == 0 {
            return Ok(false);
        }
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected_rev)])
            .and_then([TxnOp::delete(key, None::<DeleteOptions>)]);
        let resp = self.bounded(c.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    pub async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<Claim> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        let lease = self.bounded(c.lease_grant(secs, None)).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = match self.bounded(c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.bounded(c.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            return Ok(Claim::Held { lease });
        }
        let _ = self.bounded(c.lease_revoke(lease)).await;
        let holder = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(Self::to_kv),
            _ => None,
        });
        match holder {
            Some(kv) => Ok(Claim::Taken(kv?)),
            // Expired between the compare and the read: ask again.
            None => Ok(Claim::Taken(KeyValue {
                key: key.to_string(),
                value: String::new(),
                rev: 0,
            })),
        }
    }

    pub async fn renew(&self, lease: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let renewed = async {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.is_some_and(|r| r.ttl() > 0))
        };
        match self.bounded(renewed).await {
            // etcd answers a renewal of an expired or revoked lease either way.
            Err(e) if e.to_string().contains("lease not found") => Ok(false),
            other => other,
        }
    }

    pub async fn release(&self, lease: i64) -> Result<()> {
        let mut c = self.client.clone();
        match self.bounded(c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Already expired: released all the same.
            Err(e) if e.to_string().contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
