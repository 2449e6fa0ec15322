//! The unix-socket HTTP server Docker talks to. Docker finds a plugin by its socket's
//! file name in `/run/docker/plugins` (driver `shoal` ← `shoal.sock`), so nothing else
//! needs setting up. Requests come without a Content-Type: the body is read as bytes
//! (at most [`MAX_BODY`]) and parsed by the plugin.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::plugin::{Plugin, Reply, CONTENT_TYPE};

/// Docker's requests are a few hundred bytes; anything far larger is not Docker.
pub const MAX_BODY: usize = 1 << 20;

/// Where Docker looks for the `shoal` driver.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/shoal.sock";

/// Binds `socket`, refusing to take it from a live server (another node on this host).
/// A stale socket file left by a dead process is replaced.
pub async fn bind(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by another process (another node on this host? give it \
                     --docker-socket PATH, or \"\" for none)",
                    socket.display()
                ),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    UnixListener::bind(socket)
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK))
        .header("Content-Type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn answer<B: Backend>(
    plugin: Arc<Plugin<B>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::POST {
        return Ok(respond(Reply::error(
            405,
            format!(
                "method {} not allowed: the plugin protocol uses POST",
                req.method()
            ),
        )));
    }
    let endpoint = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let (status, msg) = if too_big {
                (413, format!("request body is over {MAX_BODY} bytes"))
            } else {
                (400, format!("reading the request body: {e}"))
            };
            return Ok(respond(Reply::error(status, msg)));
        }
    };
    debug!(%endpoint, bytes = body.len(), "docker request");
    Ok(respond(plugin.handle(&endpoint, &body).await))
}

/// Serves the plugin on `listener` until `shutdown` resolves, then removes `socket`.
pub async fn serve<B: Backend>(
    plugin: Arc<Plugin<B>>,
    listener: UnixListener,
    socket: PathBuf,
    shutdown: impl Future<Output = ()>,
) {
    info!(socket = %socket.display(), "docker volume plugin serving");
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "docker plugin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let p = plugin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(p.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "docker plugin connection ended");
            }
        });
    }
    let _ = std::fs::remove_file(&socket);
    info!("docker volume plugin stopped");
}
