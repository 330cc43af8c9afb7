//! API keys: `api_keys` guard `/v1/*` and `/upstream/*`; `admin_keys` (or, when there are none,
//! `api_keys`) guard `/api/*` and `/metrics`; `/healthz` is open.

use http::HeaderMap;
use subtle::ConstantTimeEq;

/// Which set of keys a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Open,
    Api,
    Admin,
}

pub fn scope_of(path: &str) -> Scope {
    // The dashboard's static assets hold no secret; the page asks for the admin key itself.
    if path == "/healthz" || path == "/ui" || path.starts_with("/ui/") {
        Scope::Open
    } else if super::ollama::is_ollama_path(path) {
        // Ollama's API (`/api/tags`, `/api/chat` …) is for model clients, like /v1/*.
        Scope::Api
    } else if path.starts_with("/api/")
        || path == "/api"
        || path == "/metrics"
        || is_llama_swap_admin(path)
    {
        Scope::Admin
    } else {
        Scope::Api
    }
}

/// llama-swap's operations routes: model output and unloads, guarded like `/api/*` (with no
/// `admin_keys`, `api_keys` guard them, as llama-swap's `apiKeys` do).
fn is_llama_swap_admin(path: &str) -> bool {
    matches!(path, "/running" | "/unload" | "/logs" | "/logs/stream") || path.starts_with("/logs/")
}

/// True if the request may pass. With no keys configured for its scope, everything passes.
pub fn allowed(
    scope: Scope,
    headers: &HeaderMap,
    api_keys: &[String],
    admin_keys: &[String],
) -> bool {
    let keys = match scope {
        Scope::Open => return true,
        Scope::Api => api_keys,
        Scope::Admin if admin_keys.is_empty() => api_keys,
        Scope::Admin => admin_keys,
    };
    if keys.is_empty() {
        return true;
    }
    let Some(presented) = presented_key(headers) else {
        return false;
    };
    // Compare against every key without stopping early, each in constant time.
    keys.iter().fold(false, |found, k| {
        found | bool::from(k.as_bytes().ct_eq(presented.as_bytes()))
    })
}

/// The key a request presents: `Authorization: Bearer KEY`, `x-api-key: KEY`, or Basic auth
/// (`Authorization: Basic base64(USER:KEY)`; the user name is ignored).
pub fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(k) = bearer(headers) {
        return Some(k.to_string());
    }
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim().to_string());
    }
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let key = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(_, pass)| pass);
    Some(key.to_string())
}

/// Standard base64 (padding optional); `None` when it is not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// True when the request presents Basic auth, which a browser remembers and sends by itself.
pub fn is_basic(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn keys_and_scopes() {
        let api = vec!["sk-1".to_string()];
        let admin = vec!["adm".to_string()];
        assert!(allowed(Scope::Api, &with("Bearer sk-1"), &api, &admin));
        assert!(allowed(Scope::Api, &with("bearer sk-1"), &api, &admin));
        assert!(!allowed(Scope::Api, &with("Bearer sk-2"), &api, &admin));
        assert!(!allowed(Scope::Api, &HeaderMap::new(), &api, &admin));
        assert!(!allowed(Scope::Admin, &with("Bearer sk-1"), &api, &admin));
        assert!(allowed(Scope::Admin, &with("Bearer adm"), &api, &admin));
        assert!(allowed(Scope::Admin, &with("Bearer sk-1"), &api, &[]));
        assert!(allowed(Scope::Open, &HeaderMap::new(), &api, &admin));
        assert!(allowed(Scope::Api, &HeaderMap::new(), &[], &[]));
        assert_eq!(scope_of("/healthz"), Scope::Open);
        assert_eq!(scope_of("/api/models"), Scope::Admin);
        assert_eq!(scope_of("/metrics"), Scope::Admin);
        assert_eq!(scope_of("/v1/models"), Scope::Api);
        assert_eq!(scope_of("/upstream/a/health"), Scope::Api);
        assert_eq!(scope_of("/logs/stream/a"), Scope::Admin);
        assert_eq!(scope_of("/running"), Scope::Admin);
        assert_eq!(scope_of("/unload"), Scope::Admin);
        assert_eq!(scope_of("/health"), Scope::Api);
        assert_eq!(scope_of("/v1/models/a"), Scope::Api);
    }

    #[test]
    fn x_api_key_and_basic_auth() {
        let api = vec!["sk-1".to_string()];
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-1".parse().unwrap());
        assert!(allowed(Scope::Api, &h, &api, &[]));
        h.insert("x-api-key", "sk-2".parse().unwrap());
        assert!(!allowed(Scope::Api, &h, &api, &[]));
        // "user:sk-1" and ":sk-1"
        assert!(allowed(Scope::Api, &with("Basic dXNlcjpzay0x"), &api, &[]));
        assert!(allowed(Scope::Api, &with("basic OnNrLTE="), &api, &[]));
        assert!(!allowed(Scope::Api, &with("Basic dXNlcjpzay0y"), &api, &[]));
        assert!(!allowed(Scope::Api, &with("Basic !!!"), &api, &[]));
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
    }
}
