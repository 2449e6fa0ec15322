//! Who may call what: the cluster CA, the credentials it issues, and the roles they carry.
//!
//! Every gRPC connection to a node is mutual TLS under the cluster's CA ([`ca`]): a
//! client without a certificate of that CA gets no connection at all. Two roles are told
//! apart by the certificate's DNS name:
//! - [`Role::Node`] (`node.shoal.internal`): nodes, on both ends of block and namespace
//!   calls. Those calls are checked by the cluster token, which only holders of the
//!   cluster secret (nodes) can make; the certificate's role is not checked per call.
//! - [`Role::Admin`] (`admin.shoal.internal`): the CLI's credential, the only one the
//!   control API accepts ([`require_admin`]).
//!
//! [`join`] has the one-time tokens a new node joins with; [`seal`] the sealing of the
//! secrets both keep in the store.

pub mod ca;
pub mod credential;
pub mod join;
pub mod seal;

use tonic::{Request, Status};

pub use ca::{load_or_create, CaRecord, ClusterCa};
pub use credential::Credential;

/// The DNS name in every node certificate (clients check it as the server name).
pub const NODE_NAME: &str = "node.shoal.internal";
/// The DNS name in every admin certificate.
pub const ADMIN_NAME: &str = "admin.shoal.internal";

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node,
    Admin,
}

/// The role of a peer's (already verified) certificate chain, if it has one.
pub fn role_of(chain: &[tonic::transport::CertificateDer<'_>]) -> Option<Role> {
    let leaf = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
    let valid = |name: &'static str| {
        let name = rustls_pki_types::ServerName::try_from(name).expect("a valid DNS name");
        leaf.verify_is_valid_for_subject_name(&name).is_ok()
    };
    if valid(ADMIN_NAME) {
        Some(Role::Admin)
    } else if valid(NODE_NAME) {
        Some(Role::Node)
    } else {
        None
    }
}

/// Interceptor of the control API: only an admin certificate may call it. Runs before
/// the request body is decoded.
pub fn require_admin(req: Request<()>) -> Result<Request<()>, Status> {
    let role = req.peer_certs().and_then(|c| role_of(&c));
    match role {
        Some(Role::Admin) => Ok(req),
        Some(Role::Node) => Err(Status::permission_denied(
            "a node certificate cannot make control calls: use an admin credential \
             (shoal --credentials FILE)",
        )),
        None => Err(Status::unauthenticated(
            "control calls need an admin credential of this cluster (shoal --credentials FILE)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_certificate_name() {
        let ca = ClusterCa::generate("c1").unwrap();
        let der = |c: &Credential| {
            use rustls_pki_types::pem::PemObject;
            tonic::transport::CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()
        };
        let admin = ca.issue(Role::Admin, "a").unwrap();
        let node = ca.issue(Role::Node, "n").unwrap();
        assert_eq!(role_of(&[der(&admin)]), Some(Role::Admin));
        assert_eq!(role_of(&[der(&node)]), Some(Role::Node));
        assert_eq!(role_of(&[]), None);
    }
}
