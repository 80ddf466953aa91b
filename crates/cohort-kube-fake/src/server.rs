//! The emulator on a loopback port, for clients that need a URL: kubectl, Prefect's Python
//! worker and kopf, kube-rs through a kubeconfig — plain HTTP/1.1 with no credentials, or as a
//! pod sees its cluster's API server: HTTPS with a certificate of the cluster's own CA and a
//! service account's bearer token ([`InCluster`]). One task owns the listener and the
//! connections; dropping [`Served`] stops it and closes every connection (which ends their
//! watches).

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
    in_cluster: Option<InCluster>,
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
    /// `http://127.0.0.1:<port>`, or `https://…` served in-cluster style.
    pub fn url(&self) -> String {
        let scheme = if self.in_cluster.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// What a pod is given to reach this server, when it is served in-cluster style.
    pub fn in_cluster(&self) -> Option<&InCluster> {
        self.in_cluster.as_ref()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig text for this server (cluster, user and context `cohort-kube-fake`,
    /// namespace `default`; the CA and the token when served in-cluster style).
    pub fn kubeconfig(&self) -> String {
        kubeconfig::render(&self.url(), self.in_cluster.as_ref())
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

/// What a pod of an emulated cluster is given to reach its API server
/// (`/var/run/secrets/kubernetes.io/serviceaccount/`): the cluster CA that signed the
/// server's certificate, and the service account's token. Requests without the token are
/// refused with 401, as an API server refuses anonymous ones.
#[derive(Debug, Clone)]
pub struct InCluster {
    /// `ca.crt`: the PEM certificate of the CA that signed the server's certificate (for
    /// `127.0.0.1`, `localhost` and `kubernetes.default.svc`).
    pub ca_pem: String,
    /// `token`.
    pub token: String,
}

/// Binds 127.0.0.1 on an ephemeral port and starts serving plain HTTP.
pub(crate) async fn serve(handle: Arc<Handle>) -> io::Result<Served> {
    start(handle, None).await
}

/// Binds 127.0.0.1 on an ephemeral port and starts serving HTTPS, requiring `token`.
pub(crate) async fn serve_in_cluster(handle: Arc<Handle>, token: String) -> io::Result<Served> {
    let (ca_pem, config) = tls_config()?;
    start(handle, Some((InCluster { ca_pem, token }, config))).await
}

async fn start(
    handle: Arc<Handle>,
    tls: Option<(InCluster, tokio_rustls::rustls::ServerConfig)>,
) -> io::Result<Served> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let (in_cluster, security) = match tls {
        Some((in_cluster, config)) => (
            Some(in_cluster.clone()),
            Some(Security {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                bearer: format!("Bearer {}", in_cluster.token),
            }),
        ),
        None => (None, None),
    };
    tokio::spawn(accept_loop(
        listener,
        handle.shared.clone(),
        security.map(Arc::new),
        stop.clone(),
    ));
    Ok(Served {
        addr,
        in_cluster,
        stop,
        _handle: handle,
    })
}

/// TLS and the token an in-cluster style server requires.
struct Security {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The `Authorization` header a request must carry.
    bearer: String,
}

/// A fresh cluster CA and a server certificate it signed; the CA's PEM and the server's TLS
/// configuration.
fn tls_config() -> io::Result<(String, tokio_rustls::rustls::ServerConfig)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let invalid = |e: rcgen::Error| io::Error::new(io::ErrorKind::InvalidInput, e);
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cohort-kube-fake-ca");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(invalid)?)
        .map_err(invalid)?;
    let server_key = KeyPair::generate().map_err(invalid)?;
    let server = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .map_err(invalid)?
    .signed_by(&server_key, &ca)
    .map_err(invalid)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
    .with_no_client_auth()
    .with_single_cert(vec![server.der().clone()], key)
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok((ca.pem(), config))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    security: Option<Arc<Security>>,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, shared.clone(), security.clone()));
                }
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, security: Option<Arc<Security>>) {
    let Some(security) = security else {
        return serve_http(TokioIo::new(stream), shared, None).await;
    };
    match security.acceptor.accept(stream).await {
        Ok(tls) => serve_http(TokioIo::new(tls), shared, Some(security)).await,
        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
    }
}

async fn serve_http<I>(io: I, shared: Arc<Shared>, security: Option<Arc<Security>>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        let security = security.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ServiceError::RequestBody(e.into()))?
                .to_bytes();
            let transport = match &security {
                None => Transport::Http,
                Some(security) => {
                    let authorized = parts
                        .headers
                        .get(http::header::AUTHORIZATION)
                        .is_some_and(|v| v.as_bytes() == security.bearer.as_bytes());
                    if !authorized {
                        return Ok(crate::http::error(&crate::error::ApiError::unauthorized()));
                    }
                    Transport::Https
                }
            };
            // An error here makes hyper close the connection without answering, which is
            // exactly what a lost response looks like to the client.
            Ok::<_, ServiceError>(crate::http::serve(&shared, &parts, bytes, transport).await?)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "connection ended");
    }
}
