//! One-time join tokens: how a new node gets the cluster secret without anyone copying
//! the secret file to it.
//!
//! `shoal cluster join-token` asks a node for a token: 32 random bytes, shown once. The
//! node stores under `jointokens/<id>` the cluster secret sealed (AES-256-GCM) under a key
//! derived from the token, with an expiry; the id is another hash of the token, so the
//! store alone reveals neither the token nor the secret. A new node started with the
//! token finds the record by its id, opens the secret, and deletes the record by a
//! conditional delete before it uses it: a token joins one node only, and an expired one
//! none. The node then keeps the secret in `<data-dir>/secret` (mode 0600) and starts as
//! any member.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use super::seal;
use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::records::{self, Keys, RECORD_VERSION};

/// Every token starts with this, so a pasted secret or password is told apart.
pub const TOKEN_PREFIX: &str = "shoal-join-";

/// Longest life a token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A join token as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRecord {
    pub v: u32,
    /// The cluster secret, sealed under the token's key (see [`seal`]).
    pub sealed_secret: String,
    pub expires_unix: u64,
    /// The node that made it.
    pub made_by: String,
}

fn derive(token: &[u8; 32], label: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    h.update([0u8]);
    h.update(token);
    h.finalize().into()
}

/// The token's record key suffix.
fn token_id(token: &[u8; 32]) -> String {
    hex::encode(&derive(token, "shoal-join-id")[..16])
}

fn parse(token: &str, cluster_id: &str) -> Result<[u8; 32]> {
    let bad = || {
        Error::InvalidArgument(format!(
            "the join token is not one of Shoal's (they look like {TOKEN_PREFIX}<64 hex \
             digits>, made by `shoal cluster join-token` on a node of cluster \
             {cluster_id:?})"
        ))
    };
    let hex_part = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    hex::decode(hex_part)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(bad)
}

/// Makes a token that lets one node join within `ttl`, and stores its record.
pub async fn create(
    meta: &MetaStore,
    keys: &Keys,
    secret: &str,
    ttl: Duration,
    made_by: &str,
) -> Result<(String, u64)> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(Error::InvalidArgument(format!(
            "join token lifetime {ttl:?}: must be above zero and at most {} days",
            MAX_TTL.as_secs() / 86_400
        )));
    }
    let token: [u8; 32] = rand::random();
    let id = token_id(&token);
    let expires_unix = records::now_unix() + ttl.as_secs().max(1);
    let rec = JoinRecord {
        v: RECORD_VERSION,
        sealed_secret: seal::seal(
            &derive(&token, "shoal-join-key"),
            secret.as_bytes(),
            id.as_bytes(),
        ),
        expires_unix,
        made_by: made_by.to_string(),
    };
    if !meta
        .put_if(&keys.join_token(&id), &records::encode(&rec), 0)
        .await?
    {
        return Err(Error::Internal("a join token id came up twice".into()));
    }
    info!(expires_unix, "made a join token");
    Ok((
        format!("{TOKEN_PREFIX}{}", hex::encode(token)),
        expires_unix,
    ))
}

/// Spends `token`: the cluster secret it carries, its record deleted. Refuses an unknown,
/// used or expired token with a message saying which.
pub async fn redeem(
    meta: &MetaStore,
    keys: &Keys,
    cluster_id: &str,
    token: &str,
    now_unix: u64,
) -> Result<String> {
    let token = parse(token, cluster_id)?;
    let id = token_id(&token);
    let key = keys.join_token(&id);
    let kv = meta.get(&key).await?.ok_or_else(|| {
        Error::PermissionDenied(format!(
            "the join token is not known to cluster {cluster_id:?}: it was used already, \
             has expired and been removed, or belongs to another cluster; make a new one \
             with `shoal cluster join-token` on a node of the cluster"
        ))
    })?;
    let rec: JoinRecord = records::decode(&kv.key, &kv.value)?;
    if now_unix >= rec.expires_unix {
        let _ = meta.delete_if(&key, kv.rev).await;
        return Err(Error::PermissionDenied(format!(
            "the join token expired {} s ago; make a new one with `shoal cluster join-token`",
            now_unix - rec.expires_unix
        )));
    }
    let secret = seal::open(
        &derive(&token, "shoal-join-key"),
        &rec.sealed_secret,
        id.as_bytes(),
    )
    .and_then(|s| String::from_utf8(s).ok())
    .ok_or_else(|| Error::CorruptRecord {
        key: key.clone(),
        reason: "the sealed secret does not open with its token".into(),
    })?;
    // Spent before it is used: of two nodes racing with one token, one gets it.
    if !meta.delete_if(&key, kv.rev).await? {
        return Err(Error::PermissionDenied(
            "the join token was used by another node at the same moment".into(),
        ));
    }
    info!(made_by = %rec.made_by, "joined with a one-time token");
    Ok(secret)
}

/// Deletes expired tokens' records (a node's upkeep).
pub async fn forget_expired(meta: &MetaStore, keys: &Keys, now_unix: u64) -> Result<usize> {
    let mut n = 0;
    for kv in meta.list(&keys.join_tokens()).await? {
        let expired = records::decode::<JoinRecord>(&kv.key, &kv.value)
            .map(|r| now_unix >= r.expires_unix)
            .unwrap_or(false);
        if expired && meta.delete_if(&kv.key, kv.rev).await? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::EmbeddedStore;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("meta.json")).unwrap();
        (dir, MetaStore::Embedded(s))
    }

    #[tokio::test]
    async fn a_token_joins_once_and_only_before_it_expires() {
        let (_d, meta) = store();
        let keys = Keys::new("c1");
        let ttl = Duration::from_secs(60);
        let (token, exp) = create(&meta, &keys, "s3cret", ttl, "n1").await.unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        // The store holds neither the token nor the secret.
        let all = meta.list(&keys.join_tokens()).await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(!all[0].value.contains("s3cret"));
        assert!(!all[0].value.contains(&token[TOKEN_PREFIX.len()..]));
        let now = exp - 60;
        assert_eq!(
            redeem(&meta, &keys, "c1", &token, now).await.unwrap(),
            "s3cret"
        );
        let err = redeem(&meta, &keys, "c1", &token, now).await.unwrap_err();
        assert!(err.to_string().contains("used already"), "{err}");

        let (token, exp) = create(&meta, &keys, "s3cret", ttl, "n1").await.unwrap();
        let err = redeem(&meta, &keys, "c1", &token, exp).await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");

        let err = redeem(&meta, &keys, "c1", "s3cret", now).await.unwrap_err();
        assert!(err.to_string().contains("not one of Shoal's"), "{err}");
        let other = format!("{TOKEN_PREFIX}{}", "ab".repeat(32));
        let err = redeem(&meta, &keys, "c1", &other, now).await.unwrap_err();
        assert!(err.to_string().contains("not known"), "{err}");
        assert!(create(&meta, &keys, "s", Duration::ZERO, "n1")
            .await
            .is_err());
        assert!(create(&meta, &keys, "s", MAX_TTL * 2, "n1").await.is_err());
    }

    #[tokio::test]
    async fn expired_records_are_forgotten() {
        let (_d, meta) = store();
        let keys = Keys::new("c1");
        let (_, exp) = create(&meta, &keys, "s", Duration::from_secs(5), "n")
            .await
            .unwrap();
        create(&meta, &keys, "s", Duration::from_secs(500), "n")
            .await
            .unwrap();
        assert_eq!(forget_expired(&meta, &keys, exp - 1).await.unwrap(), 0);
        assert_eq!(forget_expired(&meta, &keys, exp).await.unwrap(), 1);
        assert_eq!(meta.list(&keys.join_tokens()).await.unwrap().len(), 1);
    }
}
