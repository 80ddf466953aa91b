//! The emulator on a loopback port (plain HTTP/1.1), for clients that need a URL: kubectl,
//! Prefect's Python worker and kopf, kube-rs through a kubeconfig. One task owns the
//! listener and the connections; dropping [`Served`] stops it and closes every connection
//! (which ends their watches).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::requests::Transport;
use crate::service::ServiceError;
use crate::shared::Shared;
use crate::{kubeconfig, Handle};

/// A running loopback server. Stops when dropped.
pub struct Served {
    addr: SocketAddr,
    stop: CancellationToken,
    /// Keeps the emulator alive as long as it is served.
    _handle: Arc<Handle>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("addr", &self.addr).finish()
    }
}

impl Served {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig text for this server (cluster, user and context `cohort-kube-fake`,
    /// namespace `default`, no credentials).
    pub fn kubeconfig(&self) -> String {
        kubeconfig::render(&self.url())
    }

    /// Writes [`Served::kubeconfig`] to `dir/kubeconfig` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig())?;
        Ok(path)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds 127.0.0.1 on an ephemeral port and starts serving.
pub(crate) async fn serve(handle: Arc<Handle>) -> io::Result<Served> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(accept_loop(listener, handle.shared.clone(), stop.clone()));
    Ok(Served {
        addr,
        stop,
        _handle: handle,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ServiceError::RequestBody(e.into()))?
                .to_bytes();
            // An error here makes hyper close the connection without answering, which is
            // exactly what a lost response looks like to the client.
            Ok::<_, ServiceError>(
                crate::http::serve(&shared, &parts, bytes, Transport::Http).await?,
            )
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "connection ended");
    }
}
