//! Which daemon a client command talks to, and how request paths are written.
//!
//! Order (SPEC.md, "`--url` defaults to …"): an explicit `--url`, else the `listen` address of
//! `--config FILE`, else `LLMVISOR_URL`, else `http://127.0.0.1:8080`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The URL client commands use when nothing else names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The environment variable naming the daemon's URL.
pub const URL_ENV: &str = "LLMVISOR_URL";

/// A daemon's base URL, normalized to `http://HOST:PORT[/PREFIX]` with no trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("invalid URL `{url}`: {reason}")]
    Invalid { url: String, reason: String },
    #[error(
        "unsupported URL `{url}`: only http:// is supported (llmvisor serves plain HTTP; \
         give the address of a TLS proxy's plain side instead)"
    )]
    Scheme { url: String },
    #[error("{URL_ENV}: {0}")]
    FromEnv(Box<UrlError>),
}

impl BaseUrl {
    /// Parses what a user typed: `http://host:port`, `host:port` (http assumed), with or without
    /// a trailing slash, optionally with a path prefix (`http://host/llmvisor/`).
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let trimmed = input.trim();
        let invalid = |reason: &str| UrlError::Invalid {
            url: input.to_string(),
            reason: reason.to_string(),
        };
        if trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let uri: http::Uri = with_scheme
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            _ => {
                return Err(UrlError::Scheme {
                    url: input.to_string(),
                })
            }
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| invalid("it names no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "user info in the URL is not supported (use --api-key)",
            ));
        }
        if uri.query().is_some() {
            return Err(invalid("a query string is not allowed here"));
        }
        let prefix = uri.path().trim_end_matches('/');
        Ok(BaseUrl(format!("http://{}{}", authority.as_str(), prefix)))
    }

    /// The URL that reaches a daemon listening on `addr` from this machine: an unspecified
    /// address (`0.0.0.0`, `[::]`) is reached over loopback.
    pub fn from_listen(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        BaseUrl(format!("http://{}", SocketAddr::new(ip, addr.port())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full URL of `path_and_query` (which starts with `/`) on this daemon.
    pub fn join(&self, path_and_query: &str) -> String {
        if path_and_query.starts_with('/') {
            format!("{}{}", self.0, path_and_query)
        } else {
            format!("{}/{}", self.0, path_and_query)
        }
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Picks the daemon URL: `flag` (from `--url`), else `config_listen` (the `listen` of
/// `--config`), else `env` (the value of `LLMVISOR_URL`; empty counts as unset), else
/// [`DEFAULT_URL`].
pub fn resolve(
    flag: Option<&str>,
    config_listen: Option<SocketAddr>,
    env: Option<&str>,
) -> Result<BaseUrl, UrlError> {
    if let Some(flag) = flag {
        return BaseUrl::parse(flag);
    }
    if let Some(listen) = config_listen {
        return Ok(BaseUrl::from_listen(listen));
    }
    if let Some(env) = env.filter(|e| !e.trim().is_empty()) {
        return BaseUrl::parse(env).map_err(|e| UrlError::FromEnv(Box::new(e)));
    }
    BaseUrl::parse(DEFAULT_URL)
}

pub use crate::ids::encode_segment;

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn explicit_flag_wins_over_everything() {
        let url = resolve(
            Some("http://10.0.0.1:9000"),
            listen("127.0.0.1:7000"),
            Some("http://env:1"),
        )
        .unwrap();
        assert_eq!(url.as_str(), "http://10.0.0.1:9000");
    }

    #[test]
    fn config_listen_comes_before_the_environment() {
        let url = resolve(None, listen("127.0.0.1:7000"), Some("http://env:1")).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:7000");
    }

    #[test]
    fn environment_comes_before_the_default() {
        let url = resolve(None, None, Some("http://env:1/")).unwrap();
        assert_eq!(url.as_str(), "http://env:1");
        // An empty variable counts as unset.
        let url = resolve(None, None, Some("  ")).unwrap();
        assert_eq!(url.as_str(), DEFAULT_URL);
        let url = resolve(None, None, None).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8080");
    }

    #[test]
    fn a_bad_environment_url_names_the_variable() {
        let err = resolve(None, None, Some("https://x:1")).unwrap_err();
        assert!(err.to_string().starts_with("LLMVISOR_URL: "), "{err}");
    }

    #[test]
    fn trailing_slashes_and_missing_schemes_are_accepted() {
        for input in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "127.0.0.1:8080",
            "127.0.0.1:8080/",
            " HTTP://127.0.0.1:8080// ",
        ] {
            assert_eq!(
                BaseUrl::parse(input).unwrap().as_str(),
                "http://127.0.0.1:8080",
                "{input:?}"
            );
        }
        let prefixed = BaseUrl::parse("http://host:81/llmvisor/").unwrap();
        assert_eq!(prefixed.as_str(), "http://host:81/llmvisor");
        assert_eq!(
            prefixed.join("/api/models"),
            "http://host:81/llmvisor/api/models"
        );
        assert_eq!(
            BaseUrl::parse("[::1]:8080").unwrap().as_str(),
            "http://[::1]:8080"
        );
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        assert!(matches!(
            BaseUrl::parse("https://h:1"),
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(BaseUrl::parse(""), Err(UrlError::Invalid { .. })));
        assert!(matches!(
            BaseUrl::parse("http://h:1/?x=1"),
            Err(UrlError::Invalid { .. })
        ));
        assert!(matches!(
            BaseUrl::parse("http://a b"),
            Err(UrlError::Invalid { .. })
        ));
    }

    #[test]
    fn unspecified_listen_addresses_are_reached_over_loopback() {
        assert_eq!(
            BaseUrl::from_listen("0.0.0.0:8080".parse().unwrap()).as_str(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            BaseUrl::from_listen("[::]:8080".parse().unwrap()).as_str(),
            "http://[::1]:8080"
        );
        assert_eq!(
            BaseUrl::from_listen("192.168.1.5:9".parse().unwrap()).as_str(),
            "http://192.168.1.5:9"
        );
    }
}
