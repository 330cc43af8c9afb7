//! `[cluster]` (fleet mode) and the per-model `replicas`/`nodes` keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::tree::{Kind, Node};
use super::{is_placeholder, Parser, Sp, PLACEHOLDER_HELP};
use crate::config::{
    ClusterConfig, EtcdAuth, EtcdTls, CLUSTER_KEYS, DEFAULT_CLUSTER_NAME, DEFAULT_ETCD,
    DEFAULT_LEASE_TTL,
};

/// The shortest `lease_ttl`: etcd rounds leases to whole seconds and renews at a third of them.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Node ids and the fleet name become etcd key segments and URL-free labels.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `http://host:port` with no path (a trailing `/` is allowed).
fn valid_http_url(s: &str) -> bool {
    s.strip_prefix("http://").is_some_and(valid_authority)
}

/// An etcd endpoint: `http://host:port` or `https://host:port`.
fn valid_etcd_url(s: &str) -> bool {
    valid_http_url(s) || s.strip_prefix("https://").is_some_and(valid_authority)
}

fn valid_authority(rest: &str) -> bool {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    !rest.is_empty() && !rest.contains('/') && !rest.contains(char::is_whitespace)
}

fn url_is_loopback(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .map_or("", |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host name, for the default `node`.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl Parser<'_> {
    pub(super) fn replicas(&mut self, n: &Node) -> Option<u32> {
        match &n.kind {
            Kind::Int(i) if (1..=1000).contains(i) => Some(*i as u32),
            Kind::Int(i) => {
                self.err_help(
                    n.at(),
                    format!("`replicas` must be between 1 and 1000, found {i}"),
                    "replicas is how many instances may run cluster-wide, e.g. replicas = 1",
                );
                None
            }
            _ => {
                self.type_err("`replicas`", n, "an integer");
                None
            }
        }
    }

    pub(super) fn nodes(&mut self, n: &Node) -> Option<Vec<String>> {
        let list = self.string_list("nodes", n)?;
        let mut out: Vec<String> = Vec::new();
        for item in list {
            if !valid_id(&item.v) {
                self.err_help(
                    item.at,
                    format!("node id {:?} in `nodes` is not a valid node id", item.v),
                    "node ids are 1-63 letters, digits, `-`, `_` or `.`",
                );
            } else if !out.contains(&item.v) {
                out.push(item.v);
            }
        }
        if out.is_empty() {
            self.err_help(
                n.at(),
                "`nodes` is empty: the model could run nowhere",
                "remove `nodes` to let the model run on any node",
            );
            return None;
        }
        Some(out)
    }

    /// A file named by `[cluster] key` (relative to the config's directory), which must exist;
    /// `private`: a secret, refused when every user may read it.
    fn cluster_file(
        &mut self,
        key: &str,
        file: &Sp<String>,
        base: Option<&Path>,
        private: bool,
    ) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = match base {
            Some(dir) if Path::new(&file.v).is_relative() => dir.join(&file.v),
            _ => PathBuf::from(&file.v),
        };
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => {
                self.err(file.at, format!("`{key}` {}: not a file", path.display()));
                None
            }
            Ok(m) if private && m.permissions().mode() & 0o004 != 0 => {
                self.err_help(
                    file.at,
                    format!(
                        "`{key}` {} is readable by every user (mode {:o})",
                        path.display(),
                        m.permissions().mode() & 0o777
                    ),
                    format!(
                        "it is a secret: `chmod 600 {}` (Kubernetes: defaultMode: 0400 on the \
                         Secret's volume)",
                        path.display()
                    ),
                );
                None
            }
            Ok(_) => Some(path),
            Err(e) => {
                self.err(
                    file.at,
                    format!("`{key}`: cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// `etcd_ca`/`etcd_cert`/`etcd_key` and `etcd_user`/`etcd_password(_file)`, checked
    /// against each other and against the endpoints' scheme.
    fn etcd_credentials(
        &mut self,
        table: &Node,
        given: &HashMap<&str, Sp<String>>,
        endpoints: Option<&[Sp<String>]>,
        base: Option<&Path>,
    ) -> (Option<EtcdTls>, Option<EtcdAuth>) {
        let https = endpoints.is_some_and(|e| e.iter().any(|e| e.v.starts_with("https://")));
        if let Some(list) = endpoints {
            if https && list.iter().any(|e| e.v.starts_with("http://")) {
                self.err_help(
                    list[0].at,
                    "`etcd` mixes http:// and https:// endpoints",
                    "use https:// for every member of a TLS etcd",
                );
            }
        }
        let file = |p: &mut Self, key: &str, private: bool| {
            let f = given.get(key)?;
            p.cluster_file(key, f, base, private)
        };
        let ca = file(self, "etcd_ca", false);
        let cert = file(self, "etcd_cert", false);
        let key = file(self, "etcd_key", true);
        let tls_key = ["etcd_ca", "etcd_cert", "etcd_key"]
            .into_iter()
            .find_map(|k| given.get(k));
        match (given.get("etcd_cert"), given.get("etcd_key")) {
            (Some(c), None) => self.err_help(
                c.at,
                "`etcd_cert` needs `etcd_key`",
                "set etcd_key to the client certificate's private key (PEM)",
            ),
            (None, Some(k)) => self.err_help(
                k.at,
                "`etcd_key` needs `etcd_cert`",
                "set etcd_cert to the client certificate (PEM)",
            ),
            _ => {}
        }
        if let Some(t) = tls_key.filter(|_| !https) {
            self.err_help(
                t.at,
                "TLS to etcd is configured but the `etcd` endpoints are http://",
                "write them as https://host:port",
            );
        }
        if https && !given.contains_key("etcd_ca") {
            self.err_help(
                endpoints.map_or(table.at(), |e| e[0].at),
                "https:// etcd endpoints need `etcd_ca`",
                "set etcd_ca to the PEM file of the CA that signed the etcd members' certificates",
            );
        }
        let tls = ca.map(|ca| EtcdTls {
            ca,
            client: cert.zip(key),
        });
        let password =
            match (given.get("etcd_password"), given.get("etcd_password_file")) {
                (Some(_), Some(f)) => {
                    self.err(
                        f.at,
                        "set `etcd_password` or `etcd_password_file`, not both",
                    );
                    None
                }
                (Some(p), None) => Some(p.v.clone()),
                (None, Some(f)) => file(self, "etcd_password_file", true).and_then(|path| {
                    match std::fs::read_to_string(&path) {
                        Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_string()),
                        Err(e) => {
                            self.err(
                                f.at,
                                format!(
                                    "`etcd_password_file`: cannot read {}: {e}",
                                    path.display()
                                ),
                            );
                            None
                        }
                    }
                }),
                (None, None) => None,
            };
        let auth = match (given.get("etcd_user"), password) {
            (Some(u), Some(password)) => Some(EtcdAuth {
                user: u.v.clone(),
                password,
            }),
            (Some(u), None) => {
                if !given.contains_key("etcd_password") && !given.contains_key("etcd_password_file")
                {
                    self.err_help(
                        u.at,
                        "`etcd_user` needs a password",
                        "set etcd_password_file to a file holding it (or etcd_password)",
                    );
                }
                None
            }
            (None, Some(_)) => {
                let at = given
                    .get("etcd_password")
                    .or(given.get("etcd_password_file"))
                    .map_or(table.at(), |p| p.at);
                self.err_help(
                    at,
                    "an etcd password needs `etcd_user`",
                    "set etcd_user = \"NAME\"",
                );
                None
            }
            (None, None) => None,
        };
        (tls, auth)
    }

    /// The `[cluster]` table; `None` after reporting its problems.
    pub(super) fn cluster(
        &mut self,
        n: &Node,
        base: Option<&Path>,
        listen: Option<&Sp<SocketAddr>>,
        api_keys: bool,
    ) -> Option<ClusterConfig> {
        let Kind::Table(fields) = &n.kind else {
            self.type_err("`cluster`", n, "a table");
            return None;
        };
        let errors_before = self.diags.len();
        let mut etcd = None;
        let mut name = None;
        let mut node = None;
        let mut advertise: Option<Sp<String>> = None;
        let mut lease_ttl = None;
        let mut cluster_key = None;
        let mut endpoints: Option<Vec<Sp<String>>> = None;
        let mut credentials: HashMap<&str, Sp<String>> = HashMap::new();
        for f in fields {
            let v = &f.value;
            match f.key.as_str() {
                "etcd" => {
                    let Some(list) = self.string_list("etcd", v) else {
                        continue;
                    };
                    if list.is_empty() {
                        self.err_help(
                            v.at(),
                            "`etcd` is empty",
                            format!("e.g. etcd = [{DEFAULT_ETCD:?}]"),
                        );
                    }
                    for e in &list {
                        if !valid_etcd_url(&e.v) {
                            self.err_help(
                                e.at,
                                format!(
                                    "etcd endpoint {:?} is not an http(s)://host:port URL",
                                    e.v
                                ),
                                format!("e.g. etcd = [{DEFAULT_ETCD:?}]"),
                            );
                        }
                    }
                    etcd = Some(list.iter().map(|e| e.v.clone()).collect::<Vec<_>>());
                    endpoints = (!list.is_empty()).then_some(list);
                }
                key @ ("etcd_ca" | "etcd_cert" | "etcd_key" | "etcd_user" | "etcd_password"
                | "etcd_password_file") => {
                    let Some(s) = self.string(key, v) else {
                        continue;
                    };
                    if s.is_empty() {
                        self.err(v.at(), format!("`{key}` is empty"));
                        continue;
                    }
                    let name = CLUSTER_KEYS.iter().copied().find(|k| *k == key);
                    if let Some(name) = name {
                        credentials.insert(
                            name,
                            Sp {
                                v: s.to_string(),
                                at: v.at(),
                            },
                        );
                    }
                }
                key @ ("name" | "node") => {
                    let Some(s) = self.string(key, v) else {
                        continue;
                    };
                    if !valid_id(s) {
                        self.err_help(
                            v.at(),
                            format!("`{key}` {s:?} is not a valid id"),
                            "1-63 letters, digits, `-`, `_` or `.`",
                        );
                    } else if key == "name" {
                        name = Some(s.to_string());
                    } else {
                        node = Some(s.to_string());
                    }
                }
                "advertise" => {
                    let Some(s) = self.string("advertise", v) else {
                        continue;
                    };
                    if valid_http_url(s) {
                        advertise = Some(Sp {
                            v: s.trim_end_matches('/').to_string(),
                            at: v.at(),
                        });
                    } else {
                        self.err_help(
                            v.at(),
                            format!("`advertise` {s:?} is not an http://host:port URL"),
                            "the URL at which the other nodes reach this daemon, e.g. \
                             advertise = \"http://10.0.0.5:8080\"",
                        );
                    }
                }
                "lease_ttl" => {
                    if let Some(d) = self.duration("lease_ttl", v) {
                        if d < MIN_LEASE_TTL {
                            self.err_help(
                                v.at(),
                                "`lease_ttl` must be at least 2s",
                                "etcd leases count whole seconds; e.g. lease_ttl = \"5s\"",
                            );
                        } else {
                            // Whole seconds, rounded up: what etcd will hold.
                            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                            lease_ttl = Some(Duration::from_secs(secs));
                        }
                    }
                }
                "cluster_key" => {
                    let Some(s) = self.string("cluster_key", v) else {
                        continue;
                    };
                    if s.len() < 16 {
                        self.err_help(
                            v.at(),
                            "`cluster_key` is shorter than 16 characters",
                            "use a long random secret, e.g. the output of `openssl rand -hex 32`",
                        );
                    } else if is_placeholder(s) {
                        self.err_help(
                            v.at(),
                            format!("`cluster_key` {s:?} is a placeholder"),
                            PLACEHOLDER_HELP,
                        );
                    } else {
                        cluster_key = Some(s.to_string());
                    }
                }
                key => {
                    let help = match super::super::diagnostic::closest(
                        key,
                        CLUSTER_KEYS.iter().copied(),
                    ) {
                        Some(s) => format!(
                            "did you mean `{s}`? valid keys: {}",
                            CLUSTER_KEYS.join(", ")
                        ),
                        None => format!("valid keys: {}", CLUSTER_KEYS.join(", ")),
                    };
                    self.err_help(
                        f.key_at(),
                        format!("unknown key `{key}` in [cluster]"),
                        help,
                    );
                }
            }
        }
        let (etcd_tls, etcd_auth) =
            self.etcd_credentials(n, &credentials, endpoints.as_deref(), base);
        let advertise = match advertise {
            Some(a) => a,
            None => {
                let addr = listen
                    .map_or_else(|| crate::config::DEFAULT_LISTEN.parse().ok(), |l| Some(l.v));
                match addr {
                    Some(a) if !a.ip().is_unspecified() => Sp {
                        v: format!("http://{a}"),
                        at: n.at(),
                    },
                    _ => {
                        self.err_help(
                            n.at(),
                            "[cluster] needs `advertise` when `listen` is a wildcard address",
                            "set advertise = \"http://THIS-HOST-IP:PORT\": how the other nodes reach this daemon",
                        );
                        return None;
                    }
                }
            }
        };
        if cluster_key.is_none() && api_keys {
            self.err_help(
                n.at(),
                "[cluster] needs `cluster_key` when `api_keys` are set",
                "nodes forward requests to each other with the cluster key, never with a client's \
                 key; set the same long random secret on every node",
            );
        } else if cluster_key.is_none() && !url_is_loopback(&advertise.v) {
            self.err_help(
                advertise.at,
                "[cluster] needs `cluster_key` when `advertise` is not a loopback address",
                "nodes forward requests to each other with it; set the same long random secret \
                 on every node, e.g. the output of `openssl rand -hex 32`",
            );
        }
        if self.diags.len() > errors_before {
            return None;
        }
        Some(ClusterConfig {
            etcd: etcd.unwrap_or_else(|| vec![DEFAULT_ETCD.to_string()]),
            name: name.unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string()),
            node: node.unwrap_or_else(host_name),
            advertise: advertise.v,
            lease_ttl: lease_ttl.unwrap_or(DEFAULT_LEASE_TTL),
            cluster_key,
            etcd_tls,
            etcd_auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse_with_env;
    use std::time::Duration;

    const MODEL: &str = "[models.m]\ncmd = [\"srv\", \"--port\", \"${PORT}\"]\n";

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        parse_with_env(text, None, &|k| {
            (k == "HOME").then(|| "/home/u".to_string())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn no_cluster_table_is_one_host() {
        let c = parse(MODEL).unwrap();
        assert!(c.cluster.is_none());
        assert_eq!(c.models[0].replicas, 1);
        assert!(c.models[0].nodes.is_empty());
    }

    #[test]
    fn cluster_table_and_model_keys() {
        let text = format!(
            "listen = \"127.0.0.1:9000\"\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n\
             name = \"lab\"\nnode = \"box-a\"\nlease_ttl = \"2500ms\"\n\
             {MODEL}replicas = 2\nnodes = [\"box-a\", \"box-b\"]\n"
        );
        let c = parse(&text).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.name, "lab");
        assert_eq!(cl.node, "box-a");
        assert_eq!(cl.advertise, "http://127.0.0.1:9000");
        assert_eq!(cl.lease_ttl, Duration::from_secs(3));
        assert_eq!(cl.cluster_key, None);
        assert_eq!(c.models[0].replicas, 2);
        assert_eq!(c.models[0].nodes, ["box-a", "box-b"]);
    }

    #[test]
    fn cluster_errors_have_positions() {
        let text = format!(
            "[cluster]\netcd = [\"127.0.0.1:2379\"]\nadvertise = \"http://10.0.0.5:8080\"\n\
             lease_ttl = \"1s\"\nnod = \"x\"\n{MODEL}replicas = 0\n"
        );
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains(
                "<config>:2:9: error: etcd endpoint \"127.0.0.1:2379\" is not an http(s)://host:port URL"
            ),
            "{e}"
        );
        assert!(
            e.contains("<config>:3:13: error: [cluster] needs `cluster_key`"),
            "{e}"
        );
        assert!(
            e.contains("<config>:4:13: error: `lease_ttl` must be at least 2s"),
            "{e}"
        );
        assert!(
            e.contains("<config>:5:1: error: unknown key `nod` in [cluster]"),
            "{e}"
        );
        assert!(e.contains("did you mean `node`?"), "{e}");
        assert!(
            e.contains("<config>:8:12: error: `replicas` must be between 1 and 1000"),
            "{e}"
        );
    }

    #[test]
    fn api_keys_need_a_cluster_key() {
        let text = format!("api_keys = [\"k\"]\n[cluster]\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains("needs `cluster_key` when `api_keys` are set"),
            "{e}"
        );
    }

    /// A file in a fresh temp dir with `mode`.
    fn file(dir: &tempfile::TempDir, name: &str, mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(name);
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn etcd_tls_and_user_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key, pw) = (
            file(&dir, "ca.pem", 0o644),
            file(&dir, "c.pem", 0o644),
            file(&dir, "c.key", 0o600),
            file(&dir, "pw", 0o640),
        );
        let text = format!(
            "[cluster]\netcd = [\"https://127.0.0.1:2379\"]\netcd_ca = {ca:?}\n\
             etcd_cert = {cert:?}\netcd_key = {key:?}\netcd_user = \"node\"\n\
             etcd_password_file = {pw:?}\n{MODEL}"
        );
        let cl = parse(&text).unwrap().cluster.unwrap();
        let tls = cl.etcd_tls.unwrap();
        assert_eq!(tls.ca.display().to_string(), ca);
        assert_eq!(tls.client.unwrap().1.display().to_string(), key);
        let auth = cl.etcd_auth.unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.as_str()),
            ("node", "secret")
        );
        assert!(
            !format!("{auth:?}").contains("secret"),
            "the password is not in Debug"
        );

        // A world-readable key, a cert without its key, TLS files with http://, a user
        // without a password: each an error at its position.
        let open = file(&dir, "open.key", 0o644);
        let text = format!(
            "[cluster]\netcd = [\"https://127.0.0.1:2379\"]\netcd_ca = {ca:?}\n\
             etcd_key = {open:?}\netcd_user = \"node\"\n{MODEL}"
        );
        let e = parse(&text).unwrap_err();
        assert!(e.contains("<config>:4:12: error: `etcd_key`"), "{e}");
        assert!(e.contains("is readable by every user (mode 644)"), "{e}");
        assert!(e.contains("chmod 600"), "{e}");
        assert!(
            e.contains("<config>:4:12: error: `etcd_key` needs `etcd_cert`"),
            "{e}"
        );
        assert!(
            e.contains("<config>:5:13: error: `etcd_user` needs a password"),
            "{e}"
        );
        let text = format!("[cluster]\netcd_ca = {ca:?}\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("<config>:2:11: error: TLS to etcd is configured but the `etcd` endpoints are http://"), "{e}");
        let text = format!("[cluster]\netcd = [\"https://127.0.0.1:2379\"]\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains("<config>:2:9: error: https:// etcd endpoints need `etcd_ca`"),
            "{e}"
        );
        let text = format!("[cluster]\netcd_password = \"x\"\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains("<config>:2:17: error: an etcd password needs `etcd_user`"),
            "{e}"
        );
    }

    #[test]
    fn placeholder_keys_are_refused() {
        for key in [
            "change-me-cluster-key-0123456789",
            "<output of openssl rand -hex 32>",
            "\u{2026}openssl rand -hex 32\u{2026}",
        ] {
            let text = format!("[cluster]\ncluster_key = {key:?}\n{MODEL}");
            let e = parse(&text).unwrap_err();
            assert!(e.contains("<config>:2:15: error: `cluster_key`"), "{e}");
            assert!(e.contains("is a placeholder"), "{e}");
            assert!(e.contains("openssl rand -hex 32"), "{e}");
        }
        let text = format!("api_keys = [\"CHANGEME\"]\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains("<config>:1:13: error: the key \"CHANGEME\" in `api_keys` is a placeholder"),
            "{e}"
        );
    }

    #[test]
    fn wildcard_listen_needs_advertise() {
        let text = format!("listen = \"0.0.0.0:8080\"\nallow_insecure = true\n[cluster]\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("needs `advertise`"), "{e}");
    }
}
