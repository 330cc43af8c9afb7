//! The floor of llmvisor's HTTP stack for one proxy hop: the smallest reverse proxy that can be
//! built from the same parts (tokio on one thread, hyper's HTTP/1 server, hyper-util's pooled
//! client), with none of llmvisor's own work — no routing, auth, lease, connection slot, body
//! read or event. `bench/proxy.sh` runs it beside the daemon (variant `hyper-floor`), so the
//! difference between the two is what llmvisor itself costs per request.
//!
//! ```sh
//! cargo run --release -p llmvisor --example hop_floor -- 127.0.0.1:9000 127.0.0.1:8080
//! ```
//! (listen address, upstream address). Every request goes to the upstream with the same method,
//! path, headers and body; the answer is streamed back.

use std::net::SocketAddr;

use http::{Request, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: hop_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: host:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR: host:port");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve(listen, upstream));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) {
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let listener = TcpListener::bind(listen).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let client = client.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                parts.uri = match Uri::try_from(format!("http://{upstream}{pq}")) {
                    Ok(uri) => uri,
                    Err(e) => return Err(e.to_string()),
                };
                parts.headers.remove(http::header::HOST);
                client
                    .request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
