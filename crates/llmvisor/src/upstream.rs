//! Where a model's server listens, and the one pooled HTTP client that talks to all of them.
//!
//! A server listens on a loopback TCP port or, when its `cmd` uses `${SOCKET}`, on a unix socket.
//! Both go through the same keep-alive client: a unix socket is named in the request URI as
//! `unix://<hex of the path>/…`, which the connector below decodes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpStream, UnixStream};

/// The address of one running server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(Arc<Path>),
}

impl Endpoint {
    /// The base URL shown to people and to apps: `http://127.0.0.1:10500`, or
    /// `unix:/path/to/model.sock` for a socket.
    pub fn base_url(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => format!("http://{addr}"),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Tcp(addr) => Some(addr.port()),
            Endpoint::Unix(_) => None,
        }
    }

    /// The URI the shared client uses for `path_and_query` on this server.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let authority = match self {
            Endpoint::Tcp(addr) => addr.to_string(),
            Endpoint::Unix(path) => crate::ids::to_hex(path.as_os_str().as_encoded_bytes()),
        };
        let scheme = match self {
            Endpoint::Tcp(_) => "http",
            Endpoint::Unix(_) => UNIX_SCHEME,
        };
        let pq = if path_and_query.starts_with('/') {
            path_and_query
        } else {
            "/"
        };
        Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(pq)
            .build()
    }
}

const UNIX_SCHEME: &str = "unix";

/// The client type used for every upstream request (health probes and proxied requests).
pub type UpstreamClient = Client<Connector, UpstreamBody>;

/// Any error a request body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of an upstream request: any body, boxed, so that this module does not depend on the
/// daemon's HTTP server (the library builds without it).
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes `body` as an [`UpstreamBody`].
pub fn body<B>(body: B) -> UpstreamBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty [`UpstreamBody`] (health probes).
pub fn empty_body() -> UpstreamBody {
    body(http_body_util::Empty::<Bytes>::new())
}

/// Idle keep-alive connections per server, and how long one may stay idle. The pool does not
/// bound how many connections a server gets: the proxy does, with each model's connection slots
/// (`max_connections`, for llama-server its own slot count), so at most that many connections
/// are ever opened to a server and all of them are reused. Idle ones are closed after 4 s,
/// before llama-server's own 5 s keep-alive timeout, so a pooled connection is never one the
/// server is about to drop. (With a tiny pool and no limit, sustained concurrency churned
/// connections; with a big pool and no limit, idle keep-alives held llama-server's HTTP
/// threads and bursts were answered in 5-second waves — docs/benchmarks-http.md.)
const IDLE_PER_SERVER: usize = 64;
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// A keep-alive client for TCP and unix-socket upstreams.
pub fn client() -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_SERVER)
        .build(Connector)
}

/// A client that never reuses a connection: for the one retry of a request whose pooled
/// connection was closed under it (`daemon/proxy.rs`), which must not get another stale one.
pub fn fresh_client() -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(Connector)
}

/// Connects `http://host:port` over TCP (no delay) and `unix://HEX` over a unix socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Connector;

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no authority in URI"))?
                .as_str()
                .to_owned();
            if uri.scheme_str() == Some(UNIX_SCHEME) {
                let path = crate::ids::from_hex(&authority).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "bad unix socket address")
                })?;
                let path = PathBuf::from(std::ffi::OsString::from_vec(path));
                let stream = UnixStream::connect(path).await?;
                Ok(UpstreamIo::Unix(TokioIo::new(stream)))
            } else {
                let stream = TcpStream::connect(authority).await?;
                stream.set_nodelay(true)?;
                Ok(UpstreamIo::Tcp(TokioIo::new(stream)))
            }
        })
    }
}

/// A connection to an upstream, over either transport.
pub enum UpstreamIo {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_paths_round_trip_through_the_uri() {
        let ep = Endpoint::Unix(Path::new("/tmp/llm visor/a.sock").into());
        let uri = ep.uri("/health?x=1").unwrap();
        assert_eq!(uri.scheme_str(), Some("unix"));
        let decoded = crate::ids::from_hex(uri.authority().unwrap().as_str()).unwrap();
        assert_eq!(decoded, b"/tmp/llm visor/a.sock");
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/health?x=1");
        assert_eq!(ep.base_url(), "unix:/tmp/llm visor/a.sock");
    }

    #[test]
    fn tcp_uri_and_url() {
        let ep = Endpoint::Tcp(([127, 0, 0, 1], 10500).into());
        assert_eq!(
            ep.uri("/v1/models").unwrap().to_string(),
            "http://127.0.0.1:10500/v1/models"
        );
        assert_eq!(ep.base_url(), "http://127.0.0.1:10500");
        assert_eq!(ep.port(), Some(10500));
    }
}
