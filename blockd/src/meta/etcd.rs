//! The etcd-backed metadata store.
//!
//! Every call has a deadline: an etcd that is down or unreachable makes the call fail
//! with [`Error::MetaUnavailable`] naming the endpoints, instead of hanging.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp,
};

use super::KeyValue;
use crate::error::{Error, Result};

/// How long one etcd call may take before the store reports etcd unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// See the module doc.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (URLs such as `http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let names = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT);
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
}
