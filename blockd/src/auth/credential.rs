//! A credential (a key, its certificate and the cluster CA's certificate), its file
//! format, and the TLS settings tonic uses with it on either end of a connection.
//!
//! The file is three PEM blocks: the private key, the certificate, the CA certificate.
//! It is written with mode 0600 and read only by its owner.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::NODE_NAME;
use crate::error::{Error, Result};

/// How long a TLS handshake may take before the server drops the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Credential {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").finish_non_exhaustive()
    }
}

/// Writes `bytes` to `path` as a new file of mode 0600, aside and renamed into place (a
/// crash never leaves it empty or half written), replacing what was there.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The PEM blocks of `text`, in order, as (label, whole block).
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            current = Some((label.to_string(), format!("{line}\n")));
        } else if let Some((label, mut block)) = current.take() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END ") {
                out.push((label, block));
            } else {
                current = Some((label, block));
            }
        }
    }
    out
}

impl Credential {
    /// The credential as its file holds it.
    pub fn to_text(&self) -> String {
        format!(
            "# Shoal credential: private key, certificate, cluster CA. Keep it secret.\n{}{}{}",
            self.key_pem, self.cert_pem, self.ca_pem
        )
    }

    /// Reads a credential file's text; `what` names the file in errors.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        let blocks = pem_blocks(text);
        let key = blocks.iter().find(|(l, _)| l.ends_with("PRIVATE KEY"));
        let certs: Vec<&String> = blocks
            .iter()
            .filter(|(l, _)| l == "CERTIFICATE")
            .map(|(_, b)| b)
            .collect();
        match (key, certs.as_slice()) {
            (Some((_, key)), [cert, ca]) => Ok(Self {
                ca_pem: (*ca).clone(),
                cert_pem: (*cert).clone(),
                key_pem: key.clone(),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "{what} is not a Shoal credential: it must hold a private key and two \
                 certificates (its own, then the cluster CA's); found {} key(s) and {} \
                 certificate(s)",
                blocks
                    .iter()
                    .filter(|(l, _)| l.ends_with("PRIVATE KEY"))
                    .count(),
                certs.len()
            ))),
        }
    }

    /// Writes the credential to `path` (mode 0600, replacing it whole).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_private(path, self.to_text().as_bytes())
    }

    /// TLS for connecting to nodes with this credential: the server must show a node
    /// certificate of this cluster's CA.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(NODE_NAME)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// TLS for serving with this (node) credential: every client must show a certificate
    /// of this cluster's CA.
    pub fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ca::ClusterCa, Role};
    use super::*;

    #[test]
    fn credential_file_round_trips_and_bad_files_are_named() {
        let ca = ClusterCa::generate("c1").unwrap();
        let cred = ca.issue(Role::Admin, "test").unwrap();
        let back = Credential::parse(&cred.to_text(), "f").unwrap();
        assert_eq!(back.key_pem, cred.key_pem);
        assert_eq!(back.cert_pem, cred.cert_pem);
        assert_eq!(back.ca_pem, ca.cert_pem());
        let err = Credential::parse(&cred.cert_pem, "/x/admin.pem").unwrap_err();
        assert!(err.to_string().contains("/x/admin.pem"), "{err}");
        assert!(err.to_string().contains("0 key(s) and 1"), "{err}");
    }

    #[test]
    fn written_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.pem");
        let cred = ClusterCa::generate("c1")
            .unwrap()
            .issue(Role::Admin, "t")
            .unwrap();
        cred.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(Credential::parse(&text, "f").is_ok());
    }
}
