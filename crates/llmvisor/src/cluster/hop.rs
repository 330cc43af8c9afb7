//! Signed node-to-node hops (issue 19): a hop carries an HMAC-SHA256, keyed with the cluster
//! key, over what it asks for; the key itself never travels.
//!
//! The signed text is, one field a line: a version tag, the method, the path and query exactly
//! as sent, the body's SHA-256 (hex) or [`UNSIGNED_BODY`], the sending node, the receiving node,
//! the intent (`route`, or `place` when the receiver is asked to claim a slot for itself), the
//! sender's Unix time in seconds and a random nonce. The receiver recomputes it with its own
//! node id as the receiving node (a hop meant for another node does not verify), checks the
//! time is within [`REPLAY_WINDOW`] of its clock and that the nonce was not seen in that
//! window, and compares in constant time.
//!
//! A body the sender streams without holding it (`/upstream/…` with no known length, a
//! multipart upload after its `model` field) is signed as [`UNSIGNED_BODY`]: the signature then
//! covers everything but the body, so it still proves who sent the request, where to and when,
//! and cannot be replayed; whoever sits on the path between two nodes (plain HTTP) can read and
//! alter such a body, as they can read every body.
//!
//! A hop's "not placed here" answer is tagged the same way, over the responder and the hop's
//! nonce, so only the node the hop went to can make the sender route it again (a model server
//! behind it cannot).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use super::{
    HOP_BODY_HEADER, HOP_HEADER, HOP_NONCE_HEADER, HOP_PLACE_HEADER, HOP_SIGNATURE_HEADER,
    HOP_TIME_HEADER,
};

/// The body field of a hop whose body is streamed unsigned (see the module doc).
pub const UNSIGNED_BODY: &str = "UNSIGNED-BODY";
/// A hop signed further than this from the receiver's clock is refused; its nonce is
/// remembered this long.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);
/// Nonces remembered at most (a hop beyond them is refused until old ones expire): at the
/// forwarding rates measured (under 1,000 hops/s) a 60 s window holds about 60,000.
const MAX_NONCES: usize = 1 << 20;

const VERSION: &str = "LLMVISOR-HOP-1";
const NOT_PLACED_VERSION: &str = "LLMVISOR-NOT-PLACED-1";

type HmacSha256 = Hmac<Sha256>;

/// Why a hop was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HopError {
    #[error("the hop has no `{0}` header")]
    Missing(&'static str),
    #[error("the hop's `{0}` header is malformed")]
    Malformed(&'static str),
    #[error(
        "the hop's signature does not verify (another cluster_key, or another receiving node)"
    )]
    BadSignature,
    #[error(
        "the hop was signed {0} s away from this node's clock (allowed: ±30 s; check the clocks)"
    )]
    Stale(i64),
    #[error("the hop's nonce was already used (a replayed request)")]
    Replayed,
    #[error("too many hops in the replay window; retry")]
    WindowFull,
    #[error("the hop's body does not match its signed digest")]
    BodyMismatch,
}

/// What a hop asks for, as signed.
#[derive(Debug, Clone, PartialEq)]
pub struct HopRequest<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    /// SHA-256 of the body (hex), or [`UNSIGNED_BODY`].
    pub body: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// The receiver is asked to claim a placement for itself.
    pub place: bool,
    pub time: u64,
    pub nonce: &'a str,
}

/// A hop that verified: who sent it, with which nonce, asking for what.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedHop {
    pub from: String,
    pub nonce: String,
    pub place: bool,
    /// The signed body digest (`None`: [`UNSIGNED_BODY`]); the receiver checks the body
    /// against it before using it.
    pub body_sha256: Option<String>,
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

fn feed(m: &mut HmacSha256, fields: &[&str]) {
    for f in fields {
        m.update(f.as_bytes());
        m.update(b"\n");
    }
}

impl HopRequest<'_> {
    fn mac(&self, key: &[u8]) -> HmacSha256 {
        let time = self.time.to_string();
        let mut m = mac(key);
        feed(
            &mut m,
            &[
                VERSION,
                self.method,
                self.path_and_query,
                self.body,
                self.from,
                self.to,
                if self.place { "place" } else { "route" },
                &time,
                self.nonce,
            ],
        );
        m
    }

    /// The signature (hex).
    pub fn sign(&self, key: &[u8]) -> String {
        crate::ids::to_hex(&self.mac(key).finalize().into_bytes())
    }

    /// Whether `signature` (hex) is this request's, compared in constant time.
    pub fn verify(&self, key: &[u8], signature: &str) -> bool {
        crate::ids::from_hex(signature).is_some_and(|sig| self.mac(key).verify_slice(&sig).is_ok())
    }

    /// Sets the hop headers (sender, intent, time, nonce, body digest, signature) on `headers`.
    pub fn write_headers(&self, key: &[u8], headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        set(HOP_HEADER, self.from);
        set(HOP_TIME_HEADER, &self.time.to_string());
        set(HOP_NONCE_HEADER, self.nonce);
        set(HOP_BODY_HEADER, self.body);
        set(HOP_SIGNATURE_HEADER, &self.sign(key));
        if self.place {
            set(HOP_PLACE_HEADER, "1");
        } else {
            headers.remove(HOP_PLACE_HEADER);
        }
    }
}

/// SHA-256 of `body`, hex.
pub fn body_sha256(body: &[u8]) -> String {
    crate::ids::to_hex(&Sha256::digest(body))
}

/// A fresh nonce (128 random bits, hex).
pub fn new_nonce() -> String {
    crate::ids::random_hex(16)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The nonces seen within the replay window.
#[derive(Default)]
pub struct ReplayGuard {
    /// Nonce → the Unix second after which it can no longer verify (so may be forgotten).
    seen: Mutex<HashMap<String, u64>>,
}

impl ReplayGuard {
    /// Accepts `nonce` signed at `time` once, when `time` is within the window of `now`.
    pub fn admit(&self, time: u64, nonce: &str, now: u64) -> Result<(), HopError> {
        let window = REPLAY_WINDOW.as_secs();
        let skew = time as i64 - now as i64;
        if skew.unsigned_abs() > window {
            return Err(HopError::Stale(skew));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_NONCES {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= MAX_NONCES {
                return Err(HopError::WindowFull);
            }
        }
        if seen.contains_key(nonce) {
            return Err(HopError::Replayed);
        }
        seen.insert(nonce.to_string(), time + window);
        // Forget expired nonces now and then (each is checked once per window of inserts).
        if seen.len().is_power_of_two() && seen.len() >= 1024 {
            seen.retain(|_, until| *until >= now);
        }
        Ok(())
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, HopError> {
    headers
        .get(name)
        .ok_or(HopError::Missing(name))?
        .to_str()
        .map_err(|_| HopError::Malformed(name))
}

/// Verifies the hop headers of a request for `method path_and_query` received by node `me`.
pub fn verify_headers(
    key: &[u8],
    me: &str,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    replay: &ReplayGuard,
) -> Result<VerifiedHop, HopError> {
    let from = header(headers, HOP_HEADER)?;
    let time = header(headers, HOP_TIME_HEADER)?
        .parse::<u64>()
        .map_err(|_| HopError::Malformed(HOP_TIME_HEADER))?;
    let nonce = header(headers, HOP_NONCE_HEADER)?;
    let body = header(headers, HOP_BODY_HEADER)?;
    let signature = header(headers, HOP_SIGNATURE_HEADER)?;
    let place = headers.contains_key(HOP_PLACE_HEADER);
    let req = HopRequest {
        method,
        path_and_query,
        body,
        from,
        to: me,
        place,
        time,
        nonce,
    };
    if !req.verify(key, signature) {
        return Err(HopError::BadSignature);
    }
    // Only a genuine hop's nonce is remembered: forged ones cannot fill the cache.
    replay.admit(time, nonce, unix_now())?;
    Ok(VerifiedHop {
        from: from.to_string(),
        nonce: nonce.to_string(),
        place,
        body_sha256: (body != UNSIGNED_BODY).then(|| body.to_string()),
    })
}

/// The tag a node puts on its "not placed here" answer to the hop with `nonce`.
pub fn not_placed_tag(key: &[u8], responder: &str, nonce: &str) -> String {
    let mut m = mac(key);
    feed(&mut m, &[NOT_PLACED_VERSION, responder, nonce]);
    crate::ids::to_hex(&m.finalize().into_bytes())
}

/// Whether `tag` is `responder`'s "not placed here" answer to the hop with `nonce`.
pub fn verify_not_placed(key: &[u8], responder: &str, nonce: &str, tag: &str) -> bool {
    let mut m = mac(key);
    feed(&mut m, &[NOT_PLACED_VERSION, responder, nonce]);
    crate::ids::from_hex(tag).is_some_and(|t| m.verify_slice(&t).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-cluster-key-0123456789abcdef";

    fn req(nonce: &str) -> HopRequest<'_> {
        HopRequest {
            method: "POST",
            path_and_query: "/v1/chat/completions?x=1",
            body: UNSIGNED_BODY,
            from: "a",
            to: "b",
            place: false,
            time: unix_now(),
            nonce,
        }
    }

    #[test]
    fn a_signed_hop_verifies_once_and_only_as_signed() {
        let nonce = new_nonce();
        let r = req(&nonce);
        let mut h = HeaderMap::new();
        r.write_headers(KEY, &mut h);
        assert!(
            !h.values().any(|v| v.as_bytes() == KEY),
            "the key never travels"
        );
        let guard = ReplayGuard::default();
        let ok = verify_headers(KEY, "b", "POST", r.path_and_query, &h, &guard).unwrap();
        assert_eq!(ok.from, "a");
        assert!(!ok.place);
        assert_eq!(ok.body_sha256, None);
        assert_eq!(
            verify_headers(KEY, "b", "POST", r.path_and_query, &h, &guard),
            Err(HopError::Replayed)
        );
        let fresh = ReplayGuard::default();
        let bad = |me, method, path, key: &[u8]| {
            verify_headers(key, me, method, path, &h, &fresh).unwrap_err()
        };
        assert_eq!(
            bad("c", "POST", r.path_and_query, KEY),
            HopError::BadSignature
        );
        assert_eq!(
            bad("b", "GET", r.path_and_query, KEY),
            HopError::BadSignature
        );
        assert_eq!(
            bad("b", "POST", "/v1/chat/completions", KEY),
            HopError::BadSignature
        );
        assert_eq!(
            bad("b", "POST", r.path_and_query, b"another-key-0123456"),
            HopError::BadSignature
        );
        // The intent is signed: a "route" hop cannot be turned into a "place" one.
        let mut placed = h.clone();
        placed.insert(HOP_PLACE_HEADER, HeaderValue::from_static("1"));
        assert_eq!(
            verify_headers(KEY, "b", "POST", r.path_and_query, &placed, &fresh),
            Err(HopError::BadSignature)
        );
    }

    #[test]
    fn the_replay_window_bounds_the_clock_skew() {
        let g = ReplayGuard::default();
        let now = 1_000_000;
        assert_eq!(g.admit(now - 31, "n1", now), Err(HopError::Stale(-31)));
        assert_eq!(g.admit(now + 31, "n2", now), Err(HopError::Stale(31)));
        assert_eq!(g.admit(now - 30, "n3", now), Ok(()));
        assert_eq!(g.admit(now + 30, "n4", now), Ok(()));
        assert_eq!(g.admit(now, "n4", now), Err(HopError::Replayed));
    }

    #[test]
    fn a_not_placed_tag_is_bound_to_the_responder_and_the_nonce() {
        let tag = not_placed_tag(KEY, "b", "nonce-1");
        assert!(verify_not_placed(KEY, "b", "nonce-1", &tag));
        assert!(!verify_not_placed(KEY, "c", "nonce-1", &tag));
        assert!(!verify_not_placed(KEY, "b", "nonce-2", &tag));
        assert!(!verify_not_placed(KEY, "b", "nonce-1", "1"));
    }

    #[test]
    fn body_digest_is_sha256() {
        assert_eq!(
            body_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
