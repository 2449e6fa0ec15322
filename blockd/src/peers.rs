//! Connections to other nodes, and the cluster token that proves membership.
//!
//! A node's connections to other nodes are mutual TLS with its node certificate
//! ([`crate::auth`]); forwarded control calls go on connections of their own with the
//! admin credential the node issued itself. Node-to-node calls also carry a token derived
//! from the cluster id and the join secret in a metadata header; the block service
//! refuses calls without the right one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shoal_proto::block::block_client::BlockClient;
use shoal_proto::control::control_client::ControlClient;
use shoal_proto::ns::namespace_client::NamespaceClient;
use shoal_proto::CLUSTER_TOKEN_HEADER;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// Largest gRPC message a node sends or accepts: a 1 MiB block write plus headroom.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// HTTP/2 flow-control window per stream between nodes.
pub const WINDOW_BYTES: u32 = 8 << 20;

/// Largest HTTP/2 frame a node accepts: a 1 MiB block travels in one or two frames
/// instead of 64 of the default 16 KiB.
pub const FRAME_BYTES: u32 = 1 << 20;

/// Token a node presents to its peers.
pub fn cluster_token(cluster_id: &str, secret: &str) -> String {
    hex::encode(Sha256::digest(format!(
        "shoal-token\0{cluster_id}\0{secret}"
    )))
}

/// What the cluster record keeps to check a joining node's secret.
pub fn secret_hash(cluster_id: &str, secret: &str) -> String {
    hex::encode(Sha256::digest(format!(
        "shoal-secret\0{cluster_id}\0{secret}"
    )))
}

/// Adds the cluster token to every outgoing request.
#[derive(Clone)]
pub struct TokenInterceptor(AsciiMetadataValue);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(CLUSTER_TOKEN_HEADER, self.0.clone());
        Ok(req)
    }
}

/// A block API client of a peer: tonic's generated client (which it derefs to) and the
/// same channel for writes sent without tonic's codec (`write_http`).
#[derive(Clone)]
pub struct PeerBlockClient {
    grpc: BlockClient<InterceptedService<Channel, TokenInterceptor>>,
    channel: Channel,
    /// The cluster token as the header `write_http` sends.
    token: http::HeaderValue,
}

impl PeerBlockClient {
    /// `Block/Write` of `data` with the other fields in `header`; the data is sent as it
    /// is, not copied into an encode buffer.
    pub async fn write_bytes(
        &self,
        header: &crate::write_wire::Header<'_>,
        data: bytes::Bytes,
    ) -> Result<(), tonic::Status> {
        let parts = crate::write_wire::request_parts(header, data);
        crate::write_http::send_write(&self.channel, &self.token, parts).await
    }
}

impl std::ops::Deref for PeerBlockClient {
    type Target = BlockClient<InterceptedService<Channel, TokenInterceptor>>;
    fn deref(&self) -> &Self::Target {
        &self.grpc
    }
}

impl std::ops::DerefMut for PeerBlockClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.grpc
    }
}
pub type PeerNamespaceClient = NamespaceClient<InterceptedService<Channel, TokenInterceptor>>;

/// The TLS a node's connections use: its node certificate, and for forwarded control
/// calls its admin credential.
#[derive(Clone)]
pub struct PeerTls {
    pub node: ClientTlsConfig,
    pub admin: ClientTlsConfig,
}

/// A cache of channels to other nodes, by gRPC address.
pub struct Peers {
    token: TokenInterceptor,
    /// None only in tests that talk to in-process servers over plain HTTP/2.
    tls: Option<PeerTls>,
    channels: Mutex<HashMap<String, Channel>>,
    admin_channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    /// Peers over plain HTTP/2: only for tests against in-process servers (a node
    /// serves TLS only).
    #[doc(hidden)]
    pub fn new(token: &str) -> Self {
        Self::with_tls(token, None)
    }

    /// Peers over mutual TLS (what a node uses).
    pub fn with_tls(token: &str, tls: Option<PeerTls>) -> Self {
        Self {
            token: TokenInterceptor(token.parse().expect("hex token is valid ASCII")),
            tls,
            channels: Mutex::new(HashMap::new()),
            admin_channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, address: &str) -> Result<Channel> {
        let mut map = self.channels.lock().expect("peers lock poisoned");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let ch = self.new_channel(address)?;
        map.insert(address.to_string(), ch.clone());
        Ok(ch)
    }

    /// A channel of its own (not shared through the cache), driven by the runtime that
    /// is current when it is made.
    fn new_channel(&self, address: &str) -> Result<Channel> {
        connect_lazy(address, self.tls.as_ref().map(|t| &t.node))
    }
}

/// A lazily connecting channel to the node at `address`, over TLS when `tls` is given.
fn connect_lazy(address: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel> {
    {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| Error::InvalidArgument(format!("node address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A 1 MiB block must not crawl through HTTP/2's default 64 KiB window.
            .initial_stream_window_size(WINDOW_BYTES)
            .initial_connection_window_size(WINDOW_BYTES * 4)
            // Read replies of 1 MiB in few frames.
            .max_frame_size(FRAME_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| Error::Internal(format!("TLS settings for {address}: {e}")))?;
        }
        Ok(ep.connect_lazy())
    }
}

impl Peers {
    /// A block API client for the node at `address`.
    pub fn block(&self, address: &str) -> Result<PeerBlockClient> {
        Ok(self.block_over(self.channel(address)?))
    }

    /// A block API client over a channel made elsewhere (tests use in-memory ones).
    pub fn block_over(&self, channel: Channel) -> PeerBlockClient {
        PeerBlockClient {
            grpc: BlockClient::with_interceptor(channel.clone(), self.token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            channel,
            token: http::HeaderValue::from_bytes(self.token.0.as_bytes())
                .expect("an ASCII metadata value is a header value"),
        }
    }

    /// A block client on a connection of its own, driven by the runtime current when it
    /// is made (a thread's own runtime: see `thread_io.rs`).
    pub fn block_private(&self, address: &str) -> Result<PeerBlockClient> {
        Ok(self.block_over(self.new_channel(address)?))
    }

    /// A namespace API client for the coordinator at `address` (sharedfs mounts).
    pub fn namespace(&self, address: &str) -> Result<PeerNamespaceClient> {
        Ok(
            NamespaceClient::with_interceptor(self.channel(address)?, self.token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A namespace client on a connection of its own, for a thread that runs its own
    /// runtime (a FUSE thread: its calls then need no hand-off to another thread).
    pub fn namespace_private(&self, address: &str) -> Result<PeerNamespaceClient> {
        Ok(
            NamespaceClient::with_interceptor(self.new_channel(address)?, self.token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// Whether a request carries this cluster's token.
    pub fn token_ok<T>(&self, req: &tonic::Request<T>) -> bool {
        req.metadata()
            .get(shoal_proto::CLUSTER_TOKEN_HEADER)
            .is_some_and(|t| t == self.token.0)
    }

    /// A control API client for the node at `address` (forwarded CLI requests).
    pub fn control(&self, address: &str) -> Result<ControlClient<Channel>> {
        let mut map = self.admin_channels.lock().expect("peers lock poisoned");
        let ch = match map.get(address) {
            Some(c) => c.clone(),
            None => {
                let ch = connect_lazy(address, self.tls.as_ref().map(|t| &t.admin))?;
                map.insert(address.to_string(), ch.clone());
                ch
            }
        };
        Ok(ControlClient::new(ch))
    }
}
