//! `[cluster]` (fleet mode) and the per-model `replicas`/`nodes` keys.

use std::net::SocketAddr;
use std::time::Duration;

use super::super::tree::{Kind, Node};
use super::{Parser, Sp};
use crate::config::{
    ClusterConfig, CLUSTER_KEYS, DEFAULT_CLUSTER_NAME, DEFAULT_ETCD, DEFAULT_LEASE_TTL,
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
    let Some(rest) = s.strip_prefix("http://") else {
        return false;
    };
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

    /// The `[cluster]` table; `None` after reporting its problems.
    pub(super) fn cluster(
        &mut self,
        n: &Node,
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
                        if !valid_http_url(&e.v) {
                            self.err_help(
                                e.at,
                                format!("etcd endpoint {:?} is not an http://host:port URL", e.v),
                                format!("e.g. etcd = [{DEFAULT_ETCD:?}]"),
                            );
                        }
                    }
                    etcd = Some(list.into_iter().map(|e| e.v).collect::<Vec<_>>());
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
                 on every node, e.g. cluster_key = \"<output of openssl rand -hex 32>\"",
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
                "<config>:2:9: error: etcd endpoint \"127.0.0.1:2379\" is not an http://host:port URL"
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

    #[test]
    fn wildcard_listen_needs_advertise() {
        let text = format!("listen = \"0.0.0.0:8080\"\nallow_insecure = true\n[cluster]\n{MODEL}");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("needs `advertise`"), "{e}");
    }
}
