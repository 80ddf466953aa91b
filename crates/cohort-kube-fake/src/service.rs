//! The emulator as a `tower::Service`, for clients that take one (`kube::Client::new`): no
//! sockets, and response bodies that stream (watches, followed logs).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::body::ResponseBody;
use crate::http::ResponseLost;
use crate::requests::Transport;
use crate::Handle;

/// An error type for anything a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the service could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request body could not be read. Not retryable as is.
    #[error("reading the request body failed: {0}")]
    RequestBody(#[source] BoxError),
    /// An injected fault threw the response away after the request took effect
    /// ([`crate::Emulator::lose_next_response`]). Retrying repeats the request.
    #[error(transparent)]
    ResponseLost(#[from] ResponseLost),
}

/// The in-process API server. Cheap to clone; keeps the emulator alive.
#[derive(Clone)]
pub struct EmulatorService {
    pub(crate) handle: Arc<Handle>,
}

impl std::fmt::Debug for EmulatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorService").finish_non_exhaustive()
    }
}

impl<B> tower::Service<http::Request<B>> for EmulatorService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = ServiceError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = self.handle.shared.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ServiceError::RequestBody(e.into()))?
                .to_bytes();
            Ok(crate::http::serve(&shared, &parts, bytes, Transport::InProcess).await?)
        })
    }
}
