//! The cluster's certificate authority: made once per cluster, kept in the metadata
//! store with its private key sealed under the cluster secret, and used by every node to
//! issue its own certificates.
//!
//! Like k3s, which keeps its CA keys in the datastore encrypted with the server token, a
//! Shoal cluster keeps the CA key in its store under `ca`, sealed with AES-256-GCM under a
//! key derived from the cluster secret (the certificate itself is public). So any node
//! that holds the secret can issue its node certificate at start and an admin
//! credential for the CLI, while the store alone (an etcd backup, a reader of etcd) does
//! not give the CA key away, and a node with a wrong secret cannot open it.

use hmac::{Hmac, Mac};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tracing::info;

use super::credential::Credential;
use super::{Role, ADMIN_NAME, NODE_NAME};
use crate::error::{Error, Result};
use crate::meta::MetaStore;
use crate::records::{self, Keys, RECORD_VERSION};

/// Years a CA certificate is valid.
const CA_YEARS: i32 = 20;
/// Years a node or admin certificate is valid (a node issues its own at every start).
const LEAF_YEARS: i32 = 5;

/// The CA as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub v: u32,
    /// The CA's common name (its subject); certificates it issues name it as issuer.
    pub name: String,
    pub cert_pem: String,
    /// `hex(nonce | AES-256-GCM(key PEM))`, the name and certificate as associated data.
    pub sealed_key: String,
    pub created_unix: u64,
}

/// The cluster CA, its key open.
pub struct ClusterCa {
    name: String,
    cert_pem: String,
    key: KeyPair,
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let year = this_year();
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + CA_YEARS, 1, 1);
    Ok(p)
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::Internal(format!("certificate: {e}"))
}

/// The current year by the system clock (validity periods start a year early, so
/// clocks a little apart still accept a new certificate).
fn this_year() -> i32 {
    1970 + (records::now_unix() / 31_556_952) as i32
}

/// The key that seals the CA key: HMAC-SHA256 of the cluster id under the secret.
fn seal_key(cluster_id: &str, secret: &str) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(format!("shoal-ca-seal\0{cluster_id}").as_bytes());
    m.finalize().into_bytes().into()
}

/// What the sealed key is bound to: the CA's name (the issuer it signs as) and its
/// certificate, so neither can be changed in the store without the key failing to open.
fn bound_to(name: &str, cert_pem: &str) -> Vec<u8> {
    format!("{name}\0{cert_pem}").into_bytes()
}

impl ClusterCa {
    /// A new CA for cluster `cluster_id`.
    pub fn generate(cluster_id: &str) -> Result<Self> {
        let name = format!("Shoal cluster {cluster_id} CA");
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = ca_params(&name)?.self_signed(&key).map_err(cert_error)?;
        Ok(Self {
            name,
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Seals the CA for the store.
    pub fn seal(&self, cluster_id: &str, secret: &str) -> Result<CaRecord> {
        Ok(CaRecord {
            v: RECORD_VERSION,
            name: self.name.clone(),
            cert_pem: self.cert_pem.clone(),
            sealed_key: super::seal::seal(
                &seal_key(cluster_id, secret),
                self.key.serialize_pem().as_bytes(),
                &bound_to(&self.name, &self.cert_pem),
            ),
            created_unix: records::now_unix(),
        })
    }

    /// Opens a sealed CA; fails with a message naming the secret when it does not fit.
    pub fn unseal(rec: &CaRecord, cluster_id: &str, secret: &str) -> Result<Self> {
        let corrupt = |why: &str| Error::CorruptRecord {
            key: "ca".into(),
            reason: why.into(),
        };
        let pem = super::seal::open(
            &seal_key(cluster_id, secret),
            &rec.sealed_key,
            &bound_to(&rec.name, &rec.cert_pem),
        )
        .ok_or_else(|| {
            Error::PermissionDenied(format!(
                "the cluster secret does not open cluster {cluster_id:?}'s certificate \
                 authority: this node's secret differs from the one the cluster was made with"
            ))
        })?;
        let pem = String::from_utf8(pem).map_err(|_| corrupt("CA key is not PEM"))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| corrupt(&format!("CA key: {e}")))?;
        Ok(Self {
            name: rec.name.clone(),
            cert_pem: rec.cert_pem.clone(),
            key,
        })
    }

    /// A new key and certificate for `role`; `label` names its holder (a node id, or
    /// who the admin credential is for) in the subject.
    pub fn issue(&self, role: Role, label: &str) -> Result<Credential> {
        let (name, usages) = match role {
            Role::Node => (
                NODE_NAME,
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            ),
            Role::Admin => (ADMIN_NAME, vec![ExtendedKeyUsagePurpose::ClientAuth]),
        };
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(cert_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} {label}"));
        p.distinguished_name = dn;
        p.extended_key_usages = usages;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let year = this_year();
        p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + LEAF_YEARS, 1, 1);
        let key = KeyPair::generate().map_err(cert_error)?;
        let issuer = Issuer::new(ca_params(&self.name)?, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(cert_error)?;
        Ok(Credential {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The cluster's CA from the store, made and stored first if the cluster has none yet
/// (a new cluster, or one made before certificates existed).
pub async fn load_or_create(
    meta: &MetaStore,
    keys: &Keys,
    cluster_id: &str,
    secret: &str,
) -> Result<ClusterCa> {
    loop {
        if let Some(kv) = meta.get(&keys.ca()).await? {
            let rec: CaRecord = records::decode(&kv.key, &kv.value)?;
            return ClusterCa::unseal(&rec, cluster_id, secret);
        }
        let ca = ClusterCa::generate(cluster_id)?;
        let rec = ca.seal(cluster_id, secret)?;
        if meta.put_if(&keys.ca(), &records::encode(&rec), 0).await? {
            info!(cluster = %cluster_id, "made the cluster certificate authority");
            return Ok(ca);
        }
        // Another node stored one first: use theirs.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_ca_opens_only_with_its_secret_and_cluster() {
        let ca = ClusterCa::generate("c1").unwrap();
        let rec = ca.seal("c1", "s3cret").unwrap();
        assert!(!rec.sealed_key.contains("PRIVATE"));
        let back = ClusterCa::unseal(&rec, "c1", "s3cret").unwrap();
        assert_eq!(back.key.serialize_pem(), ca.key.serialize_pem());
        let err = ClusterCa::unseal(&rec, "c1", "other").err().unwrap();
        assert!(err.to_string().contains("secret differs"), "{err}");
        assert!(ClusterCa::unseal(&rec, "c2", "s3cret").is_err());
        // The key is bound to its certificate: another certificate does not open it.
        let mut swapped = rec.clone();
        swapped.cert_pem = ClusterCa::generate("c1").unwrap().cert_pem;
        assert!(ClusterCa::unseal(&swapped, "c1", "s3cret").is_err());
        let mut renamed = rec.clone();
        renamed.name = "Someone else".into();
        assert!(ClusterCa::unseal(&renamed, "c1", "s3cret").is_err());
    }
}
