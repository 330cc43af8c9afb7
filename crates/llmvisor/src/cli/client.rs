//! A tiny HTTP client for the daemon's `/api/*` routes, with errors meant for people.

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use super::url::BaseUrl;

/// How long to wait for the daemon to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest body read for an error answer or a JSON document.
const MAX_BODY: usize = 16 << 20;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the URL.
    #[error("no llmvisor at {url} (start one with `llmvisor serve --config FILE`)")]
    NotRunning { url: BaseUrl },
    /// The connection failed for another reason (timeout, DNS, …).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: BaseUrl, reason: String },
    /// 401 and no key was sent.
    #[error("the daemon at {url} needs an API key (set LLMVISOR_API_KEY or pass --api-key)")]
    NeedsKey { url: BaseUrl },
    /// 401 although a key was sent.
    #[error(
        "the daemon at {url} did not accept the API key (check LLMVISOR_API_KEY or --api-key)"
    )]
    BadKey { url: BaseUrl },
    /// An error answer in the daemon's JSON shape: its message, as the daemon wrote it.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    /// An error answer that is not the daemon's JSON shape.
    #[error("{url} answered {status}{}", fmt_detail(.detail))]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    /// The connection broke while the request or answer was under way.
    #[error("lost the connection to {url}: {reason}")]
    Transfer { url: BaseUrl, reason: String },
    /// A success answer that could not be understood.
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
}

fn fmt_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl ClientError {
    /// The HTTP status of an error answer, if the daemon answered at all.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Status { status, .. } => Some(*status),
            ClientError::NeedsKey { .. } | ClientError::BadKey { .. } => {
                Some(StatusCode::UNAUTHORIZED)
            }
            _ => None,
        }
    }
}

/// One daemon, reached at a base URL, optionally with an API key.
pub struct Daemon {
    base: BaseUrl,
    api_key: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Daemon {
    pub fn new(base: BaseUrl, api_key: Option<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        Daemon {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
            http,
        }
    }

    pub fn url(&self) -> &BaseUrl {
        &self.base
    }

    /// Sends a bodiless request and returns the answer when its status is a success.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let url = self.base.join(path_and_query);
        let mut req = Request::builder().method(method).uri(&url).header(
            header::USER_AGENT,
            concat!("llmvisor/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(key) = &self.api_key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::BadAnswer {
                url: url.clone(),
                reason: format!("cannot build the request: {e}"),
            })?;
        tracing::debug!(%url, method = %req.method(), "request");
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| self.request_error(&e))?;
        let status = resp.status();
        tracing::debug!(%url, %status, "answer");
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(if self.api_key.is_some() {
                ClientError::BadKey {
                    url: self.base.clone(),
                }
            } else {
                ClientError::NeedsKey {
                    url: self.base.clone(),
                }
            });
        }
        let body = self.read_body(resp.into_body()).await.unwrap_or_default();
        Err(error_from_answer(&url, status, &body))
    }

    /// The whole body of a successful answer.
    pub async fn bytes(&self, method: Method, path_and_query: &str) -> Result<Bytes, ClientError> {
        let resp = self.send(method, path_and_query).await?;
        self.read_body(resp.into_body()).await
    }

    /// A successful answer's body parsed as JSON.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<T, ClientError> {
        let body = self.bytes(method, path_and_query).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            url: self.base.join(path_and_query),
            reason: format!("not the JSON llmvisor sends ({e})"),
        })
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, ClientError> {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) => Err(ClientError::Transfer {
                url: self.base.clone(),
                reason: deepest_message(&*e),
            }),
        }
    }

    /// A transport error for a body being streamed from this daemon.
    pub fn transfer_error(&self, err: &(dyn StdError + 'static)) -> ClientError {
        ClientError::Transfer {
            url: self.base.clone(),
            reason: deepest_message(err),
        }
    }

    fn request_error(&self, err: &hyper_util::client::legacy::Error) -> ClientError {
        let io_kind = io_error_in(err).map(io::Error::kind);
        if err.is_connect() {
            return match io_kind {
                Some(
                    io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable,
                ) => ClientError::NotRunning {
                    url: self.base.clone(),
                },
                Some(io::ErrorKind::TimedOut) => ClientError::Connect {
                    url: self.base.clone(),
                    reason: format!(
                        "no answer within {} (is the address right?)",
                        crate::units::format_duration(CONNECT_TIMEOUT)
                    ),
                },
                _ => ClientError::Connect {
                    url: self.base.clone(),
                    reason: deepest_message(err),
                },
            };
        }
        ClientError::Transfer {
            url: self.base.clone(),
            reason: deepest_message(err),
        }
    }
}

/// The daemon's error message from an error answer, else the status and the body's first line.
pub fn error_from_answer(url: &str, status: StatusCode, body: &[u8]) -> ClientError {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        message: String,
    }
    if let Ok(env) = serde_json::from_slice::<Envelope>(body) {
        if !env.error.message.trim().is_empty() {
            return ClientError::Api {
                status,
                message: env.error.message,
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let detail = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    ClientError::Status {
        url: url.to_string(),
        status,
        detail,
    }
}

/// The first `io::Error` in `err`'s source chain.
fn io_error_in<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// The innermost error's message (the one that says what actually happened).
fn deepest_message(err: &(dyn StdError + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port that was just free: bound, then closed.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_refused_connection_says_no_llmvisor_runs_there() {
        let url = BaseUrl::parse(&format!("http://127.0.0.1:{}/", closed_port())).unwrap();
        let daemon = Daemon::new(url.clone(), None);
        let err = daemon.send(Method::GET, "/api/models").await.unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no llmvisor at {url} (start one with `llmvisor serve --config FILE`)")
        );
    }

    #[test]
    fn error_answers_carry_the_daemons_message() {
        let body = br#"{"error":{"message":"model `x` does not exist; known models: a, b","type":"not_found_error","code":404}}"#;
        let err = error_from_answer("http://h/api/models/x", StatusCode::NOT_FOUND, body);
        assert_eq!(
            err.to_string(),
            "model `x` does not exist; known models: a, b"
        );
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    }

    #[test]
    fn other_error_answers_show_status_and_first_line() {
        let err = error_from_answer(
            "http://h/api/models",
            StatusCode::BAD_GATEWAY,
            b"\n  upstream down\nmore",
        );
        assert_eq!(
            err.to_string(),
            "http://h/api/models answered 502 Bad Gateway: upstream down"
        );
        let err = error_from_answer("http://h/x", StatusCode::NOT_FOUND, b"");
        assert_eq!(err.to_string(), "http://h/x answered 404 Not Found");
    }

    #[test]
    fn unauthorized_messages() {
        let url = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            ClientError::NeedsKey { url }.to_string(),
            "the daemon at http://127.0.0.1:8080 needs an API key \
             (set LLMVISOR_API_KEY or pass --api-key)"
        );
    }
}
