//! `multipart/form-data` requests (`/v1/audio/transcriptions`, `/v1/images/edits`): the model is
//! read from the form's `model` field, and the body is streamed upstream as it arrives. Only the
//! bytes up to the end of the `model` field are held (at most [`MAX_PREFIX`]); the file parts
//! that follow are never buffered, so an upload may be larger than `body_limit`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::state::AppState;

/// The most of a form read while looking for its `model` field.
pub const MAX_PREFIX: usize = 1 << 20;
/// A client gets this long to send the form up to its `model` field.
const PREFIX_TIMEOUT: Duration = Duration::from_secs(60);

/// The `boundary` of a `multipart/form-data` content type; `None` for any other type.
pub fn boundary(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut parts = ct.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// What the form read so far says about its `model` field.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Model(String),
    /// Not yet seen: read more.
    NotYet,
    /// The form ended without one.
    Missing,
}

/// Looks for the `model` field in the first bytes of a form with `boundary`.
pub fn find_model(buf: &[u8], boundary: &str) -> Found {
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let mut pos = match find(buf, d, 0) {
        Some(p) => p + d.len(),
        None => return Found::NotYet,
    };
    loop {
        if buf.get(pos..pos + 2) == Some(b"--") {
            return Found::Missing;
        }
        let Some(head_end) = find(buf, b"\r\n\r\n", pos) else {
            return Found::NotYet;
        };
        let head = String::from_utf8_lossy(&buf[pos..head_end]);
        let value_start = head_end + 4;
        let mut end_delim = b"\r\n".to_vec();
        end_delim.extend_from_slice(d);
        let is_model = head.lines().any(|l| {
            let l = l.trim().to_ascii_lowercase();
            l.starts_with("content-disposition:")
                && l.split(';')
                    .any(|p| p.trim() == "name=\"model\"" || p.trim() == "name=model")
        });
        let Some(value_end) = find(buf, &end_delim, value_start) else {
            return Found::NotYet;
        };
        if is_model {
            let v = String::from_utf8_lossy(&buf[value_start..value_end]);
            return Found::Model(v.trim().to_string());
        }
        pos = value_end + end_delim.len();
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Routes a `multipart/form-data` POST by its `model` field and streams it through.
pub async fn forward(
    st: Arc<AppState>,
    parts: http::request::Parts,
    body: Body,
    boundary: &str,
    began: Instant,
) -> Response {
    let mut body = body;
    let mut prefix = BytesMut::new();
    let read = async {
        loop {
            match find_model(&prefix, boundary) {
                Found::Model(m) if !m.is_empty() => return Ok(m),
                Found::Model(_) | Found::Missing => {
                    return Err(ApiError::bad_request(
                        "missing_model",
                        "the form has no \"model\" field: name one of the models listed at GET /v1/models",
                    ))
                }
                Found::NotYet => {}
            }
            if prefix.len() > MAX_PREFIX {
                return Err(ApiError::bad_request(
                    "missing_model",
                    format!(
                        "no \"model\" field in the first {} of the form: send it before the file",
                        crate::units::format_size(MAX_PREFIX as u64)
                    ),
                ));
            }
            match body.frame().await {
                None => {
                    return Err(ApiError::bad_request(
                        "missing_model",
                        "the form ended without a \"model\" field",
                    ))
                }
                Some(Err(e)) => {
                    return Err(ApiError::bad_request(
                        "body_read_failed",
                        format!("could not read the request body: {e}"),
                    ))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        prefix.extend_from_slice(&data);
                    }
                }
            }
        }
    };
    let model = match tokio::time::timeout(PREFIX_TIMEOUT, read).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => {
            return ApiError::bad_request(
                "body_timeout",
                "the form's \"model\" field did not arrive in time",
            )
            .into_response()
        }
    };
    let head = futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(prefix.freeze()) });
    let rest = body.into_data_stream();
    let streamed = Body::from_stream(futures_util::StreamExt::chain(head, rest));
    let path = super::proxy::path_and_query(&parts.uri, "/");
    super::proxy::forward(st, &model, parts, streamed, &path, began).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";

    #[test]
    fn model_field_is_found_wherever_it_is_and_partial_forms_read_on() {
        assert_eq!(find_model(FORM, "XyZ"), Found::Model("whisper".into()));
        for cut in 0..FORM.len() - 20 {
            assert_ne!(find_model(&FORM[..cut], "XyZ"), Found::Missing, "cut {cut}");
        }
        let no_model = b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n";
        assert_eq!(find_model(no_model, "b"), Found::Missing);
        assert_eq!(find_model(b"garbage", "b"), Found::NotYet);
        assert_eq!(find_model(b"--b--", "b"), Found::Missing);
    }

    #[test]
    fn boundary_of_the_content_type() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=\"abc\"".parse().unwrap(),
        );
        assert_eq!(boundary(&h).as_deref(), Some("abc"));
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(boundary(&h), None);
    }
}
