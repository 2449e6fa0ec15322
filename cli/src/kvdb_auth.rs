//! The flags that say how a node reaches a secured etcd: TLS (`--kvdb-ca`, and a client
//! certificate with `--kvdb-cert` / `--kvdb-key`) and a user (`--kvdb-user`, its password
//! from `--kvdb-password-file` or `SHOAL_KVDB_PASSWORD`, never the command line).

use std::path::{Path, PathBuf};

use anyhow::Context;
use shoal_blockd::meta::EtcdAuth;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct KvdbAuthArgs {
    /// PEM file of the CA that signed etcd's certificate (for https:// endpoints).
    #[arg(long, env = "SHOAL_KVDB_CA")]
    kvdb_ca: Option<PathBuf>,
    /// PEM file of this node's client certificate for etcd (with --kvdb-key), when etcd
    /// checks client certificates.
    #[arg(long, env = "SHOAL_KVDB_CERT", requires = "kvdb_key")]
    kvdb_cert: Option<PathBuf>,
    /// PEM file of the client certificate's key (mode 0600).
    #[arg(long, env = "SHOAL_KVDB_KEY", requires = "kvdb_cert")]
    kvdb_key: Option<PathBuf>,
    /// etcd user, when etcd has authentication on; its password comes from
    /// --kvdb-password-file or SHOAL_KVDB_PASSWORD.
    #[arg(long, env = "SHOAL_KVDB_USER")]
    kvdb_user: Option<String>,
    /// File (mode 0600) holding the etcd user's password.
    #[arg(long, env = "SHOAL_KVDB_PASSWORD_FILE", requires = "kvdb_user")]
    kvdb_password_file: Option<PathBuf>,
}

impl KvdbAuthArgs {
    /// Reads the files the flags name.
    pub fn auth(&self) -> anyhow::Result<EtcdAuth> {
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).with_context(|| format!("--{flag} {}", p.display()))
        };
        let ca_pem = self
            .kvdb_ca
            .as_deref()
            .map(|p| read("kvdb-ca", p))
            .transpose()?;
        let client = match (&self.kvdb_cert, &self.kvdb_key) {
            (Some(cert), Some(key)) => Some((
                read("kvdb-cert", cert)?,
                crate::node_cmd::read_private_file("kvdb-key", key)?.into_bytes(),
            )),
            _ => None,
        };
        let user = match &self.kvdb_user {
            None => None,
            Some(u) => {
                let password = match &self.kvdb_password_file {
                    Some(p) => crate::node_cmd::read_private_file("kvdb-password-file", p)?,
                    None => std::env::var("SHOAL_KVDB_PASSWORD")
                        .ok()
                        .filter(|p| !p.is_empty())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--kvdb-user {u:?} needs a password: give --kvdb-password-file \
                                 PATH (mode 0600) or set SHOAL_KVDB_PASSWORD"
                            )
                        })?,
                };
                Some((u.clone(), password))
            }
        };
        Ok(EtcdAuth {
            ca_pem,
            client,
            user,
        })
    }
}
