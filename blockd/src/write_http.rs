//! `Block/Write` over HTTP/2 without tonic's message codec, on both ends.
//!
//! The call is ordinary gRPC on the wire (see [`crate::write_wire`] for why its bytes
//! are made and read by hand). This module carries it:
//! - [`BlockRoutes`] is the block API service a node serves: `Write` is answered here,
//!   from the frames of the request body; every other call goes to tonic's generated
//!   `BlockServer`.
//! - [`send_write`] makes the call on a tonic [`Channel`], its body the three buffers of
//!   [`crate::write_wire::request_parts`], and reads the gRPC status back the way tonic's
//!   client does (a trailers-only answer, or trailers after the reply message).
//!
//! A peer running tonic's own client or server on the other end interoperates: the
//! coordinator tests talk to a `BlockServer` of fakes through this sender.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderValue};
use http_body::{Body as _, Frame, SizeHint};
use shoal_proto::block::block_server::BlockServer;
use shoal_proto::CLUSTER_TOKEN_HEADER;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::peers::MAX_MESSAGE_BYTES;
use crate::services::{unauthenticated, BlockService};
use crate::write_wire::{self, WireError, WRITE_PATH};

/// Frames of at least this many bytes are kept as they arrived; smaller ones are copied
/// together (at most one buffer per this many bytes of message, whatever the peer sends).
const KEEP_FRAME: usize = 16 << 10;

fn grpc() -> HeaderValue {
    HeaderValue::from_static("application/grpc")
}

/// A body of buffers sent as they are, then optional trailers.
struct PartsBody {
    parts: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl PartsBody {
    fn new(parts: impl IntoIterator<Item = Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self {
            parts: parts.into_iter().filter(|p| !p.is_empty()).collect(),
            trailers,
        }
    }
}

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(p) = this.parts.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.parts.iter().map(|p| p.len() as u64).sum())
    }
}

/// The next frame of a body, or None at its end.
async fn next_frame(body: &mut Body) -> Option<Result<Frame<Bytes>, Status>> {
    poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// The block API as a node serves it: see the module doc.
#[derive(Clone)]
pub struct BlockRoutes {
    service: BlockService,
    grpc: BlockServer<BlockService>,
}

impl BlockRoutes {
    pub fn new(service: BlockService) -> Self {
        let grpc = BlockServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self { service, grpc }
    }
}

impl NamedService for BlockRoutes {
    const NAME: &'static str = <BlockServer<BlockService> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send + 'static>>;

impl Service<http::Request<Body>> for BlockRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Every block call is authenticated from its headers, before a byte of its body
        // is read or decoded.
        let token = req
            .headers()
            .get(CLUSTER_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        if !self.service.token_ok(token) {
            return Box::pin(async { Ok(unauthenticated().into_http()) });
        }
        if req.uri().path() != WRITE_PATH {
            return self.grpc.call(req);
        }
        let service = self.service.clone();
        Box::pin(async move {
            Ok(match serve_write(&service, req).await {
                Ok(()) => ok_reply(),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A status for a message that cannot be read.
fn refused(e: WireError) -> Status {
    match e {
        // As tonic answers a message over its limit (and not ResourceExhausted, which
        // callers read as a full pool).
        WireError::TooLarge { .. } => Status::out_of_range(e.to_string()),
        WireError::Compressed => Status::unimplemented(e.to_string()),
        WireError::Malformed(_) => Status::invalid_argument(e.to_string()),
    }
}

async fn serve_write(service: &BlockService, req: http::Request<Body>) -> Result<(), Status> {
    let headers = req.headers();
    let token = headers
        .get(CLUSTER_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok());
    if !service.token_ok(token) {
        return Err(unauthenticated());
    }
    if let Some(enc) = headers.get("grpc-encoding") {
        if enc != "identity" {
            return Err(Status::unimplemented(format!(
                "grpc-encoding {enc:?}: block writes are not compressed"
            )));
        }
    }
    let mut body = req.into_body();
    let mut frames = Vec::new();
    // Small frames are copied together: a peer sending a message in tiny (or padded)
    // frames must not make us keep millions of buffers, each holding its read buffer.
    let mut small = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = next_frame(&mut body).await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers: a request has none that matter
        };
        total += data.len();
        // Stop reading a body that cannot be one allowed message (5 bytes of prefix).
        if total > MAX_MESSAGE_BYTES + 5 {
            return Err(refused(WireError::TooLarge {
                len: total,
                limit: MAX_MESSAGE_BYTES,
            }));
        }
        if data.len() < KEEP_FRAME {
            small.extend_from_slice(&data);
            continue;
        }
        if !small.is_empty() {
            frames.push(small.split().freeze());
        }
        frames.push(data);
    }
    if !small.is_empty() {
        frames.push(small.freeze());
    }
    let write = write_wire::parse(&frames, MAX_MESSAGE_BYTES).map_err(refused)?;
    service.write_wire(write).await
}

/// `WriteReply {}` with status OK in the trailers.
fn ok_reply() -> http::Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = PartsBody::new([write_wire::empty_reply()], Some(trailers));
    let mut resp = http::Response::new(Body::new(body));
    resp.headers_mut().insert(CONTENT_TYPE, grpc());
    resp
}

/// Calls `Block/Write` on `channel` with the message in `parts` (sent as they are: one
/// HTTP/2 data frame or more each).
pub async fn send_write(
    channel: &Channel,
    token: &HeaderValue,
    parts: impl IntoIterator<Item = Bytes>,
) -> Result<(), Status> {
    let mut req = http::Request::new(Body::new(PartsBody::new(parts, None)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(WRITE_PATH);
    *req.version_mut() = http::Version::HTTP_2;
    let h = req.headers_mut();
    h.insert(TE, HeaderValue::from_static("trailers"));
    h.insert(CONTENT_TYPE, grpc());
    h.insert(CLUSTER_TOKEN_HEADER, token.clone());
    let mut ch = channel.clone();
    // Transport errors become statuses the way tonic's client makes them (Unavailable
    // for a refused or broken connection), so callers see no difference.
    poll_fn(|cx| ch.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let resp = ch
        .call(req)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    outcome(resp).await
}

fn ok_or(status: Status) -> Result<(), Status> {
    if status.code() == Code::Ok {
        Ok(())
    } else {
        Err(status)
    }
}

/// The gRPC status of a reply.
async fn outcome(resp: http::Response<Body>) -> Result<(), Status> {
    // Trailers-only: an error (or OK) in the headers and no body.
    if let Some(status) = Status::from_header_map(resp.headers()) {
        return ok_or(status);
    }
    if resp.status() != http::StatusCode::OK {
        return Err(http_status(resp.status()));
    }
    let mut body = resp.into_body();
    let mut trailers = None;
    while let Some(frame) = next_frame(&mut body).await {
        if let Ok(t) = frame?.into_trailers() {
            trailers = Some(t);
        }
    }
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) => ok_or(status),
        // As tonic's client reads a stream that ended without a status (a reset one).
        None => Err(Status::unknown("block write reply carries no grpc-status")),
    }
}

/// A status for an HTTP error answer, as tonic's client maps them (gRPC's HTTP table).
fn http_status(code: http::StatusCode) -> Status {
    use http::StatusCode as H;
    let msg = format!("block write answered HTTP {code}");
    match code {
        H::BAD_REQUEST => Status::internal(msg),
        H::UNAUTHORIZED => Status::unauthenticated(msg),
        H::FORBIDDEN => Status::permission_denied(msg),
        H::NOT_FOUND => Status::unimplemented(msg),
        H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
            Status::unavailable(msg)
        }
        _ => Status::unknown(msg),
    }
}
