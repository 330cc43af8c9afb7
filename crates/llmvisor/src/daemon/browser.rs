//! Rules against web pages driving the API from a victim's browser.
//!
//! - DNS rebinding: a page on `evil.example` whose name is re-pointed at 127.0.0.1 reaches us
//!   with `Host: evil.example`. Without keys, only `Host` values that cannot be rebound are
//!   accepted: IP literals and `localhost` (and `*.localhost`, which resolvers keep on loopback).
//! - CSRF: a browser names the page's origin in `Origin` on cross-origin requests; an origin
//!   that is not the daemon's own and not in `cors_origins` is refused.
//! - Simple requests: JSON routes require `Content-Type: application/json`, which a form or a
//!   `no-cors` fetch cannot send without a preflight.
//! - Requests without `Origin` (`<img>`, links, navigations): where the browser's own credentials
//!   are enough (a route that needs no key, or Basic auth the browser remembers), a request that
//!   `Sec-Fetch-Site` says another site made is refused unless its `Origin` is in `cors_origins`,
//!   and a GET that starts or stops a model is refused unless the user made it (typed, bookmarked:
//!   `none`) or the daemon's own origin did (`same-origin`). Pages cannot set `Sec-Fetch-*`.

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

/// What the browser rules of [`check`] guard on one request.
#[derive(Debug, Clone, Copy)]
pub struct Guard {
    /// Only loopback or IP-literal `Host` names (the route needs no key: DNS rebinding).
    pub host: bool,
    /// The browser's own credentials would do (no key needed, or Basic auth): `Sec-Fetch-Site`
    /// rules apply.
    pub ambient: bool,
}

/// Checks `Host`, `Origin` and `Sec-Fetch-Site` of a request.
pub fn check(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    guard: Guard,
    cors_origins: &[String],
) -> Result<(), ApiError> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if guard.host {
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
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""));
    if let Some(o) = origin {
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
    if guard.ambient {
        check_fetch_site(method, uri, headers, origin, cors_origins)?;
    }
    Ok(())
}

/// The `Sec-Fetch-Site` rules (see the module doc).
fn check_fetch_site(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    origin: Option<&str>,
    cors_origins: &[String],
) -> Result<(), ApiError> {
    let Some(site) = headers.get("sec-fetch-site").map(|v| v.as_bytes()) else {
        return Ok(()); // not a browser, or one too old to say
    };
    let by_page_elsewhere =
        site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site");
    let listed = origin.is_some_and(|o| origin_allowed(o, None, cors_origins));
    if by_page_elsewhere && !listed {
        return Err(ApiError::forbidden(
            "forbidden_site",
            "a web page on another site made this request (Sec-Fetch-Site); without api_keys \
             llmvisor answers only its own pages and the origins in cors_origins (fix: add the \
             page's origin to cors_origins, or set api_keys)",
        ));
    }
    let by_user_or_us =
        site.eq_ignore_ascii_case(b"none") || site.eq_ignore_ascii_case(b"same-origin");
    if changes_state_on_get(method, uri) && !by_user_or_us && !listed {
        return Err(ApiError::forbidden(
            "forbidden_browser_get",
            "a web page may not start or stop models with a GET (fix: call it from a script, \
             use POST /api/models/{id}/load or /unload, or set api_keys)",
        ));
    }
    Ok(())
}

/// GETs that start or stop a model: llama-swap's `/unload`, `/upstream/...` (starts it) and a
/// llama-server route chosen by `?model=`.
fn changes_state_on_get(method: &Method, uri: &http::Uri) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let path = uri.path();
    path == "/unload"
        || path == "/upstream"
        || path.starts_with("/upstream/")
        || uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("model")))
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
    if is_json(&essence(&ct)) {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(&ct))
    }
}

/// A `Content-Type`'s media type, lowercased, without its parameters.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(essence: &str) -> bool {
    essence == "application/json" || essence.ends_with("+json")
}

/// A model server's page (HTML, SVG, anything a browser may render) runs sandboxed, in an origin
/// of its own, never as the daemon's origin: it cannot read what the dashboard keeps (the admin
/// key in its session storage) nor call the API as the dashboard would. JSON and event streams
/// are left as they are (the hot path; browsers do not render them as pages, and `nosniff` is
/// not needed for them).
pub fn sandbox_model_page(headers: &mut HeaderMap) {
    let data_only = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(essence)
        .is_some_and(|t| is_json(&t) || t == "text/event-stream" || t == "application/x-ndjson");
    if data_only {
        return;
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox allow-scripts allow-forms allow-popups allow-downloads"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
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
