//! Fleet-mode fixtures: a real 3-member etcd cluster on loopback (free ports, temp data dirs)
//! and `llmvisor serve` nodes configured for it. Every process is started here and killed and
//! reaped by its pid (never by name).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::serve::{closed_port, ServeProcess};
use super::{fake_llm, Scratch};

/// `etcd` from `PATH` (scripts/setup-fleet.sh installs Debian's etcd-server), or `None`.
pub fn etcd_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return Some(p.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("etcd"))
        .find(|p| p.is_file())
}

/// Skips the calling test (returns `None`) when etcd is not installed, saying how to get it.
pub fn etcd_or_skip() -> Option<PathBuf> {
    let found = etcd_bin();
    if found.is_none() {
        eprintln!("skipped: etcd is not installed (run scripts/setup-fleet.sh)");
    }
    found
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// Plain-HTTP `/health` (and `/metrics`), also when clients must use TLS.
    metrics: u16,
    child: Option<Child>,
}

/// A throwaway CA and the certificates signed by it (made with `openssl`), in PEM files.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    /// Mode 0600.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        let f = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl is installed (scripts/setup-fleet.sh)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=llmvisor-test-ca",
        ];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        for (who, usage, san) in [
            (
                "server",
                "serverAuth,clientAuth",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            ),
            ("client", "clientAuth", ""),
        ] {
            let subj = format!("/CN=llmvisor-test-{who}");
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let mut req = vec!["req", "-subj", &subj, "-keyout", &key, "-out", &csr];
            req.extend(ec);
            openssl(&req);
            let ext = format!("{who}.ext");
            std::fs::write(f(&ext), format!("{san}extendedKeyUsage={usage}\n")).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ]);
        }
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "server.key", "client.key"] {
            std::fs::set_permissions(f(key), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        TlsFiles {
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server.key"),
            client_cert: f("client.pem"),
            client_key: f("client.key"),
        }
    }
}

/// A real etcd cluster on 127.0.0.1.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
    token: String,
    /// Clients must use TLS with a client certificate signed by this CA.
    tls: Option<TlsFiles>,
}

impl Etcd {
    /// Starts `n` members and waits until the cluster has a leader.
    pub fn start(n: usize) -> Etcd {
        Self::start_with(n, false)
    }

    /// One member that takes only TLS clients with a certificate of [`Self::tls`]'s CA
    /// (`--client-cert-auth`).
    pub fn start_tls() -> Etcd {
        Self::start_with(1, true)
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn start_with(n: usize, tls: bool) -> Etcd {
        let bin = etcd_bin().expect("etcd is installed");
        let dir = tempfile::Builder::new()
            .prefix("llmvisor-etcd")
            .tempdir()
            .unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: closed_port(),
                peer: closed_port(),
                metrics: closed_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            bin,
            dir,
            members,
            initial,
            token: format!("llmvisor-test-{}-{}", std::process::id(), closed_port()),
            tls: None,
        };
        if tls {
            etcd.tls = Some(TlsFiles::generate(etcd.dir.path()));
        }
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new(&self.bin);
        if let Some(t) = &self.tls {
            cmd.args([
                "--client-cert-auth",
                "--trusted-ca-file",
                t.ca.to_str().unwrap(),
            ])
            .args(["--cert-file", t.server_cert.to_str().unwrap()])
            .args(["--key-file", t.server_key.to_str().unwrap()]);
        }
        let metrics = format!("http://127.0.0.1:{}", m.metrics);
        let child = cmd
            .args(["--name", &m.name])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    /// A client of the first member (a plain-HTTP cluster's), as root once auth is enabled.
    #[cfg(feature = "fleet")]
    pub async fn client(&self, user: Option<(&str, &str)>) -> etcd_client::Client {
        let opts = user.map(|(u, p)| etcd_client::ConnectOptions::new().with_user(u, p));
        etcd_client::Client::connect([&self.endpoints()[0]], opts)
            .await
            .expect("connect to etcd")
    }

    /// `etcdctl user add`/`role grant`/`auth enable`: root (password `root_password`) and a
    /// user `node` (password `node_password`) that may read and write `/llmvisor/`.
    #[cfg(feature = "fleet")]
    pub async fn enable_auth(&self, root_password: &str, node_password: &str) {
        use etcd_client::Permission;
        let mut c = self.client(None).await;
        c.user_add("root", root_password, None).await.unwrap();
        c.role_add("root").await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("llmvisor").await.unwrap();
        let rw = Permission::read_write("/llmvisor/").with_prefix();
        c.role_grant_permission("llmvisor", rw).await.unwrap();
        c.user_add("node", node_password, None).await.unwrap();
        c.user_grant_role("node", "llmvisor").await.unwrap();
        c.auth_enable().await.unwrap();
    }

    /// Waits until some running member reports itself healthy (a leader exists).
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let up = self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .any(|m| health(m.metrics));
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd had no healthy member within {within:?}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL member `i` by pid and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none());
        self.spawn(i);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `GET /health` of one member: `{"health":"true"}` once it has a leader.
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.contains("\"health\":\"true\"")
}

/// The key the nodes share for node-to-node hops.
pub const CLUSTER_KEY: &str = "test-cluster-key-0123456789abcdef";
/// The key clients use.
pub const CLIENT_KEY: &str = "client-key-0123";

/// One `llmvisor serve` node of a fleet.
pub struct FleetNode {
    pub id: String,
    pub scratch: Scratch,
    pub url: String,
    config: PathBuf,
    pub serve: Option<ServeProcess>,
}

impl FleetNode {
    /// Writes the node's config: fake-llm models `(id, fake-llm flags, extra model TOML)`.
    pub fn new(
        id: &str,
        fleet: &str,
        etcd: &[String],
        lease_ttl: &str,
        models: &[(&str, &str, &str)],
    ) -> FleetNode {
        Self::with_top(id, fleet, etcd, lease_ttl, models, "")
    }

    /// [`Self::with_top`] with extra `[cluster]` TOML (e.g. etcd credentials).
    pub fn with_cluster(
        id: &str,
        fleet: &str,
        etcd: &[String],
        lease_ttl: &str,
        models: &[(&str, &str, &str)],
        cluster: &str,
    ) -> FleetNode {
        let node = Self::with_top(id, fleet, etcd, lease_ttl, models, "");
        let text = std::fs::read_to_string(&node.config).unwrap();
        let text = text.replacen("[cluster]\n", &format!("[cluster]\n{cluster}\n"), 1);
        std::fs::write(&node.config, text).unwrap();
        node
    }

    /// The node's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// [`Self::new`] with extra top-level TOML (e.g. `preload = [...]`).
    pub fn with_top(
        id: &str,
        fleet: &str,
        etcd: &[String],
        lease_ttl: &str,
        models: &[(&str, &str, &str)],
        top: &str,
    ) -> FleetNode {
        let scratch = Scratch::new();
        let url = format!("http://127.0.0.1:{}", closed_port());
        let mut text = format!(
            "{top}\nlisten = {:?}\nstate_dir = {:?}\nport_range = [{}, {}]\napi_keys = [{CLIENT_KEY:?}]\n\
             [cluster]\netcd = {etcd:?}\nname = {fleet:?}\nnode = {id:?}\nadvertise = {url:?}\n\
             lease_ttl = {lease_ttl:?}\ncluster_key = {CLUSTER_KEY:?}\n",
            url.trim_start_matches("http://"),
            scratch.state_dir().display().to_string(),
            scratch.ports.0,
            scratch.ports.1,
        );
        for (model, flags, extra) in models {
            let pids = scratch.path(&format!("{model}.pids")).display().to_string();
            text.push_str(&format!(
                "[models.{model}]\ncmd = \"{} --port ${{PORT}} --pid-file {pids} {flags}\"\n\
                 stop_timeout = \"2s\"\nstartup_timeout = \"30s\"\n{extra}\n",
                fake_llm().display()
            ));
        }
        let config = scratch.path("llmvisor.toml");
        std::fs::write(&config, text).unwrap();
        FleetNode {
            id: id.to_string(),
            scratch,
            url,
            config,
            serve: None,
        }
    }

    /// Starts (or restarts) the daemon; answers once `/healthz` does.
    pub fn start(&mut self) {
        assert!(self.serve.is_none());
        self.serve = Some(ServeProcess::start_at(&self.config, self.url.clone()));
    }

    pub fn serve(&self) -> &ServeProcess {
        self.serve.as_ref().expect("node is running")
    }

    /// SIGKILL the daemon by pid and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut s) = self.serve.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    /// Pids of the model servers this node has spawned (from their pid files).
    pub fn spawned(&self, model: &str) -> Vec<u32> {
        self.scratch.pids(&format!("{model}.pids"))
    }

    /// Of [`Self::spawned`], those alive now.
    pub fn running(&self, model: &str) -> Vec<u32> {
        self.spawned(model)
            .into_iter()
            .filter(|p| llmvisor::procfs::is_alive(*p))
            .collect()
    }
}

/// A POST with the client key; `Err` when the node does not answer at all.
pub async fn post(url: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    send(req).await
}

/// A POST with exactly `headers` (no client key unless given).
pub async fn post_with(
    url: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(axum::body::Body::from(body.to_string())).unwrap()).await
}

/// A GET with the client key.
pub async fn get(url: &str, path: &str) -> Result<(u16, String), String> {
    let req = http::Request::builder()
        .uri(format!("{url}{path}"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .body(axum::body::Body::empty())
        .unwrap();
    send(req).await
}

async fn send(req: http::Request<axum::body::Body>) -> Result<(u16, String), String> {
    send_full(req).await.map(|(status, _, body)| (status, body))
}

/// A whole answer: status, headers, body.
pub type Answer = (u16, http::HeaderMap, String);

/// Sends `req` as it is; `Err` when the node does not answer at all.
pub async fn send_full(req: http::Request<axum::body::Body>) -> Result<Answer, String> {
    use http_body_util::BodyExt;
    let resp = llmvisor::upstream::client()
        .request(req.map(llmvisor::upstream::body))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// A chat request for `model`.
pub fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}
