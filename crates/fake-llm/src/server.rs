//! Listening socket, connection loop and the `--crash-after` machinery.
//!
//! Connections are served by hyper directly (rather than `axum::serve`) so that
//! each connection's I/O can be wrapped: `--crash-after` must exit only once
//! the Nth response has left the process, i.e. when hyper flushes the
//! connection after the response body has ended.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request};
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::log;

static X_FAKE_PID: HeaderName = HeaderName::from_static("x-fake-pid");

/// A bound TCP or UNIX listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a UNIX socket at `path`, removing a stale file first.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => log!("removed stale socket file {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Listener::Unix(UnixListener::bind(path)?, path.to_owned()))
    }

    /// Binds a TCP socket (`host` may be a name, resolved like llama-server does).
    pub async fn bind_tcp(host: &str, port: u16) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind((host, port)).await?))
    }

    /// Human- and test-readable address: `http://IP:PORT` or `unix:PATH`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}"),
                Err(e) => format!("<unknown address: {e}>"),
            },
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Small streamed chunks must not wait for Nagle.
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

/// Per-connection flag: set once this connection carried the response after
/// which the process must crash; checked whenever the connection is flushed.
#[derive(Clone, Default)]
pub struct CrashArm(Arc<AtomicBool>);

impl CrashArm {
    pub fn arm(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// An accepted connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection plus its optional crash flag.
struct ConnIo {
    stream: Stream,
    crash: Option<CrashArm>,
    /// `--close-reused`: once a response has been written, the next bytes a client sends end
    /// the connection unanswered.
    close_reused: bool,
    wrote: bool,
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = match &mut this.stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if this.close_reused && this.wrote && buf.filled().len() > before {
            // A second request: read (so the close is a FIN, not a reset) and never seen.
            buf.set_filled(before);
            log!("closing a reused connection unanswered (--close-reused)");
        }
        res
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.wrote = true;
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.wrote = true;
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = match &mut this.stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        };
        // hyper only flushes the socket once its write buffer is empty, so
        // by now the whole response is in the kernel.
        if let (Poll::Ready(Ok(())), Some(arm)) = (&res, &this.crash) {
            if arm.0.load(Ordering::Acquire) {
                log!("crashing now (--crash-after): exit code 3");
                std::process::exit(3);
            }
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Called by [`TrackedBody`] when a counted response body has ended.
pub trait OnComplete: Send + Sync + 'static {
    fn completed(&self, conn: Option<&CrashArm>);
    fn aborted(&self, what: &'static str);
}

/// Wraps a response body to learn whether it was sent to the end (then
/// `OnComplete::completed` runs when hyper drops it, just before hyper
/// flushes the connection) or abandoned (client went away).
pub struct TrackedBody {
    inner: Body,
    ended: std::cell::Cell<bool>,
    what: &'static str,
    conn: Option<CrashArm>,
    sink: Arc<dyn OnComplete>,
}

impl TrackedBody {
    pub fn wrap(
        inner: Body,
        what: &'static str,
        conn: Option<CrashArm>,
        sink: Arc<dyn OnComplete>,
    ) -> Body {
        Body::new(TrackedBody {
            inner,
            ended: std::cell::Cell::new(false),
            what,
            conn,
            sink,
        })
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = res {
            this.ended.set(true);
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.ended.set(true);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.ended.get() {
            self.sink.completed(self.conn.as_ref());
        } else {
            self.sink.aborted(self.what);
        }
    }
}

/// Accepts connections forever, serving each with `router`.
pub async fn serve(
    listener: Listener,
    router: Router,
    pid: u32,
    track_crash: bool,
    close_reused: bool,
) -> ! {
    let pid_header = HeaderValue::from(pid);
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                log!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let crash = track_crash.then(CrashArm::default);
        let io = TokioIo::new(ConnIo {
            stream,
            crash: crash.clone(),
            close_reused,
            wrote: false,
        });
        let svc = TowerToHyperService::new(router.clone());
        let pid_header = pid_header.clone();
        let conn = builder.serve_connection(
            io,
            service_fn(move |mut req: Request<Incoming>| {
                if let Some(c) = &crash {
                    req.extensions_mut().insert(c.clone());
                }
                let fut = hyper::service::Service::call(&svc, req);
                let pid_header = pid_header.clone();
                async move {
                    let mut resp = fut.await?;
                    resp.headers_mut().insert(X_FAKE_PID.clone(), pid_header);
                    Ok::<_, Infallible>(resp)
                }
            }),
        );
        tokio::spawn(async move {
            // Errors here are client-side hangups and the like: nothing to do.
            let _ = conn.await;
        });
    }
}
