//! Rules against web pages driving the API from a victim's browser.
//!
//! - DNS rebinding: a page on `evil.example` whose name is re-pointed at 127.0.0.1 reaches us
//!   with `Host: evil.example`. Without keys, only `Host` values that cannot be rebound are
//!   accepted: IP literals and `localhost` (and `*.localhost`, which resolvers keep on loopback).
//! - CSRF: a browser names the page's origin in `Origin` on cross-origin requests; an origin
//!   that is not the daemon's own and not in `cors_origins` is refused.
//! - Simple requests: JSON routes require `Content-Type: application/json`, which a form or a
//!   `no-cors` fetch cannot send without a preflight.

use http::{header, HeaderMap, HeaderValue, Method};

use super::error::ApiError;

/// The host part of a `Host` value (`name`, `name:port`, `[v6]:port`), lowercased.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// True for `Host` values a DNS name change cannot make point at us.
pub fn host_cannot_be_rebound(host: &str) -> bool {
    let name = host_name(host);
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

/// `scheme://host[:port]` of an `Origin` header without its scheme: the part compared with
/// `Host`.
fn origin_authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.split_once("://")?;
    Some(rest.trim_end_matches('/'))
}

/// True when `origin` may call the API: listed in `cors_origins`, or the daemon's own origin
/// (its authority equals the request's `Host`).
pub fn origin_allowed(origin: &str, host: Option<&str>, cors_origins: &[String]) -> bool {
    let origin = origin.trim();
    if cors_origins
        .iter()
        .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    match (origin_authority(origin), host) {
        (Some(a), Some(h)) => a.eq_ignore_ascii_case(h.trim()),
        _ => false,
    }
}

/// Checks `Host` and `Origin` of a request; `keyless` when its route needs no key.
pub fn check(headers: &HeaderMap, keyless: bool, cors_origins: &[String]) -> Result<(), ApiError> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if keyless {
        if let Some(h) = host {
            if !host_cannot_be_rebound(h) {
                return Err(ApiError::forbidden(
                    "forbidden_host",
                    format!(
                        "Host {h:?} is not a loopback name or an IP address; without api_keys \
                         llmvisor answers only those (protection against DNS rebinding; fix: \
                         call it as http://127.0.0.1:PORT or set api_keys)"
                    ),
                ));
            }
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let o = origin.to_str().unwrap_or("");
        if !origin_allowed(o, host, cors_origins) {
            return Err(ApiError::forbidden(
                "forbidden_origin",
                format!(
                    "requests from the web origin {o:?} are not allowed (fix: add it to \
                     cors_origins in the config)"
                ),
            ));
        }
    }
    Ok(())
}

/// The CORS headers for a request from an allowed `origin` (added to every answer to it).
pub fn cors_headers(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

pub fn preflight_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-api-key"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
}

/// Refuses a body declared as anything but JSON (415): the types a web page can send without a
/// CORS preflight (`text/plain`, forms) are all refused. A request without `Content-Type` passes
/// (scripts and older clients send none); a browser sending one without a type also sends
/// `Origin`, which [`check`] has already judged.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = String::from_utf8_lossy(ct.as_bytes());
    let essence = ct.split(';').next().unwrap_or("").trim();
    let essence = essence.to_ascii_lowercase();
    let json = essence == "application/json" || essence.ends_with("+json");
    if json {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(&ct))
    }
}

/// True for response headers an upstream must not set on our behalf (its own CORS policy).
pub fn is_upstream_cors(name: &http::HeaderName) -> bool {
    name.as_str().starts_with("access-control-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "a.localhost",
            "192.168.1.5:8080",
            "localhost.",
        ] {
            assert!(host_cannot_be_rebound(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "localhost.evil.com",
            "",
        ] {
            assert!(!host_cannot_be_rebound(bad), "{bad}");
        }
    }

    #[test]
    fn origins() {
        let listed = vec!["http://localhost:3000".to_string()];
        assert!(origin_allowed("http://localhost:3000", None, &listed));
        assert!(origin_allowed(
            "http://127.0.0.1:8080",
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:8080"),
            &listed
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:8080"), &listed));
    }
}
