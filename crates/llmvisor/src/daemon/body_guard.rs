//! Limits on a request body that is streamed to a model's server rather than buffered
//! (`/upstream/*`, a form after its `model` field, llama-server's routes chosen by `?model=`):
//! a client that goes quiet for `body_idle_timeout` between frames, or sends more than
//! `stream_body_limit`, has its body cut. The upstream request then fails, so the request's
//! lease and connection slot end at once instead of when the client finally gives up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why a streamed body was cut: the error the upstream request fails with.
#[derive(Debug, thiserror::Error)]
pub enum BodyCut {
    #[error("the request body sent nothing for {} (body_idle_timeout)", crate::units::format_duration(*.0))]
    Idle(Duration),
    #[error("the request body is larger than {} (stream_body_limit)", crate::units::format_size(*.0))]
    TooLarge(u64),
}

impl BodyCut {
    /// 413 or 408 in OpenAI's shape.
    pub fn api_error(&self) -> super::ApiError {
        let (status, code) = match self {
            BodyCut::TooLarge(_) => (http::StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            BodyCut::Idle(_) => (http::StatusCode::REQUEST_TIMEOUT, "body_timeout"),
        };
        super::ApiError::new(status, "invalid_request_error", code, self.to_string())
    }

    /// The `BodyCut` somewhere in the source chain of an upstream request's error.
    pub fn find<'a>(mut err: Option<&'a (dyn std::error::Error + 'static)>) -> Option<&'a BodyCut> {
        while let Some(e) = err {
            if let Some(cut) = e.downcast_ref::<BodyCut>() {
                return Some(cut);
            }
            err = e.source();
        }
        None
    }
}

/// A streamed request body under the two limits.
pub struct GuardedBody {
    inner: Body,
    idle: Duration,
    limit: u64,
    seen: u64,
    /// Fires `idle` after the last frame (re-armed by each).
    quiet: Pin<Box<Sleep>>,
    cut: bool,
}

impl GuardedBody {
    pub fn new(inner: Body, idle: Duration, limit: u64) -> Self {
        Self {
            inner,
            idle,
            limit,
            seen: 0,
            quiet: Box::pin(tokio::time::sleep(idle)),
            cut: false,
        }
    }

    /// `body` under the limits of the config in force.
    pub fn for_config(body: Body, cfg: &crate::config::Config) -> Body {
        Body::new(Self::new(
            body,
            cfg.http.body_idle_timeout,
            cfg.http.stream_body_limit,
        ))
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.cut = true;
                        return Poll::Ready(Some(Err(Box::new(BodyCut::TooLarge(this.limit)))));
                    }
                }
                let deadline = Instant::now() + this.idle;
                this.quiet.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.quiet.as_mut().poll(cx).is_ready() {
                    this.cut = true;
                    return Poll::Ready(Some(Err(Box::new(BodyCut::Idle(this.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn trickle() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
        });
        (tx, Body::from_stream(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_body_is_cut_after_the_idle_timeout_and_each_frame_rearms_it() {
        let (tx, body) = trickle();
        let mut guarded = GuardedBody::new(body, Duration::from_secs(10), u64::MAX);
        let began = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(9)).await;
            tx.send(Bytes::from_static(b"x")).await.unwrap();
            assert!(guarded.frame().await.unwrap().is_ok());
        }
        let err = guarded.frame().await.unwrap().unwrap_err();
        assert!(matches!(
            BodyCut::find(Some(err.as_ref())),
            Some(BodyCut::Idle(_))
        ));
        assert_eq!(began.elapsed(), Duration::from_secs(37));
        assert!(guarded.frame().await.is_none(), "cut bodies end");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_cut() {
        let body = Body::from(vec![0u8; 100]);
        let mut guarded = GuardedBody::new(body, Duration::from_secs(10), 99);
        let err = guarded.frame().await.unwrap().unwrap_err();
        assert!(matches!(
            BodyCut::find(Some(err.as_ref())),
            Some(BodyCut::TooLarge(99))
        ));
        let mut fits = GuardedBody::new(Body::from(vec![0u8; 99]), Duration::from_secs(10), 99);
        assert_eq!(
            fits.frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap()
                .len(),
            99
        );
    }
}
