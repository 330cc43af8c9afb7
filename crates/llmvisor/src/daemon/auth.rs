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
    } else if path.starts_with("/api/") || path == "/api" || path == "/metrics" {
        Scope::Admin
    } else {
        Scope::Api
    }
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
    let Some(presented) = bearer(headers) else {
        return false;
    };
    // Compare against every key without stopping early, each in constant time.
    keys.iter().fold(false, |found, k| {
        found | bool::from(k.as_bytes().ct_eq(presented.as_bytes()))
    })
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
    }
}
