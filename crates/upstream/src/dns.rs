//! The DNS cache: upstream host names are resolved here, never by a blocking `getaddrinfo`.
//!
//! Every lookup is bounded by `dns_timeout`. An answer lives for its record TTL clamped to
//! `dns_min_ttl`..`dns_max_ttl`; NXDOMAIN (or a name without addresses) is remembered for
//! `dns_nxdomain_ttl`. When the resolver fails or times out, the last good answer is served
//! again (counted in `stale_served` and logged) and retried after `dns_min_ttl`, so a resolver
//! that is rate-limiting or down never takes the pooler with it. A caller whose connect to a
//! cached address failed asks for [`DnsCache::re_resolve`], which skips the cache.
//!
//! This module never holds its lock across an await.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// DNS settings, from `[pooler]`.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// `dns_timeout` at start, for the resolver's own per-query timeout; each lookup is bounded
    /// by the caller's current `dns_timeout`.
    pub timeout: Option<Duration>,
    /// `dns_min_ttl`: answers are kept at least this long, and a failing resolver is asked again
    /// after this long.
    pub min_ttl: Duration,
    /// `dns_max_ttl`: answers are kept at most this long, whatever their TTL.
    pub max_ttl: Duration,
    /// `dns_nxdomain_ttl`: how long "no such name" is remembered; zero asks every time.
    pub nxdomain_ttl: Duration,
    /// `dns_nameservers`: ask these (UDP, then TCP) instead of the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            timeout: Some(Duration::from_secs(5)),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(15),
            nxdomain_ttl: Duration::from_secs(15),
            nameservers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error("host \"{host}\" not found (NXDOMAIN or no addresses)")]
    NotFound { host: String },
    #[error("dns_timeout ({timeout:?}) expired resolving \"{host}\"")]
    Timeout { host: String, timeout: Duration },
    #[error("could not resolve host \"{host}\": {reason}")]
    Failed { host: String, reason: String },
}

/// An answer, and whether it came from the cache (a failed connect is then worth a re-lookup).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub addrs: Vec<IpAddr>,
    pub cached: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Empty for a negative entry.
    addrs: Vec<IpAddr>,
    expires: Instant,
    last_error: Option<String>,
}

/// One cached name, for `SHOW DNS_HOSTS`-like views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEntrySnapshot {
    pub host: String,
    pub addrs: Vec<IpAddr>,
    pub ttl_left: Duration,
    pub last_error: Option<String>,
}

pub struct DnsCache {
    settings: DnsSettings,
    /// Built on first use, inside the runtime; `None` when the system config cannot be read
    /// (then lookups go to the system resolver on a blocking thread, still bounded).
    resolver: OnceLock<Option<TokioResolver>>,
    entries: Mutex<HashMap<String, Entry>>,
    pub lookups: AtomicU64,
    pub failures: AtomicU64,
    /// Lookups that failed and were answered with the last good answer instead.
    pub stale_served: AtomicU64,
}

enum LookupError {
    NotFound,
    Timeout(Duration),
    Failed(String),
}

impl DnsCache {
    pub fn new(settings: DnsSettings) -> DnsCache {
        DnsCache {
            settings,
            resolver: OnceLock::new(),
            entries: Mutex::new(HashMap::new()),
            lookups: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        match self.entries.lock() {
            Ok(e) => e,
            Err(p) => p.into_inner(),
        }
    }

    /// The addresses of `host`: from the cache while fresh, else looked up.
    /// `timeout` is `dns_timeout` as the caller has it now (RELOAD may change it).
    pub async fn resolve(
        &self,
        host: &str,
        timeout: Option<Duration>,
    ) -> Result<Resolved, DnsError> {
        let now = Instant::now();
        let previous = {
            let entries = self.entries();
            match entries.get(host) {
                Some(e) if e.expires > now => {
                    return if e.addrs.is_empty() {
                        Err(DnsError::NotFound {
                            host: host.to_owned(),
                        })
                    } else {
                        Ok(Resolved {
                            addrs: e.addrs.clone(),
                            cached: true,
                        })
                    };
                }
                Some(e) if !e.addrs.is_empty() => Some(e.addrs.clone()),
                _ => None,
            }
        };
        self.lookup_and_store(host, previous, timeout).await
    }

    /// Looks `host` up now, whatever the cache holds (a connect to a cached address failed).
    pub async fn re_resolve(
        &self,
        host: &str,
        timeout: Option<Duration>,
    ) -> Result<Resolved, DnsError> {
        let previous = self
            .entries()
            .get(host)
            .filter(|e| !e.addrs.is_empty())
            .map(|e| e.addrs.clone());
        self.lookup_and_store(host, previous, timeout).await
    }

    pub fn snapshot(&self) -> Vec<DnsEntrySnapshot> {
        let now = Instant::now();
        let mut out: Vec<_> = self
            .entries()
            .iter()
            .map(|(host, e)| DnsEntrySnapshot {
                host: host.clone(),
                addrs: e.addrs.clone(),
                ttl_left: e.expires.saturating_duration_since(now),
                last_error: e.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }

    async fn lookup_and_store(
        &self,
        host: &str,
        previous: Option<Vec<IpAddr>>,
        timeout: Option<Duration>,
    ) -> Result<Resolved, DnsError> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let s = &self.settings;
        let result = self.lookup(host, timeout).await;
        let now = Instant::now();
        let (entry, outcome) = match result {
            Ok((addrs, valid_until)) if !addrs.is_empty() => {
                let ttl = valid_until
                    .saturating_duration_since(now)
                    .clamp(s.min_ttl, s.max_ttl.max(s.min_ttl));
                let entry = Entry {
                    addrs: addrs.clone(),
                    expires: now + ttl,
                    last_error: None,
                };
                (
                    Some(entry),
                    Ok(Resolved {
                        addrs,
                        cached: false,
                    }),
                )
            }
            Ok(_) | Err(LookupError::NotFound) => {
                let entry = (!s.nxdomain_ttl.is_zero()).then(|| Entry {
                    addrs: Vec::new(),
                    expires: now + s.nxdomain_ttl,
                    last_error: Some("NXDOMAIN".into()),
                });
                tracing::warn!(host, "DNS: no such host (cached for dns_nxdomain_ttl)");
                (
                    entry,
                    Err(DnsError::NotFound {
                        host: host.to_owned(),
                    }),
                )
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let err = match e {
                    LookupError::Timeout(timeout) => DnsError::Timeout {
                        host: host.to_owned(),
                        timeout,
                    },
                    LookupError::Failed(reason) => DnsError::Failed {
                        host: host.to_owned(),
                        reason,
                    },
                    LookupError::NotFound => DnsError::NotFound {
                        host: host.to_owned(),
                    },
                };
                match previous {
                    Some(addrs) => {
                        self.stale_served.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(host, error = %err, addrs = ?addrs,
                            "DNS lookup failed; serving the last good answer");
                        let entry = Entry {
                            addrs: addrs.clone(),
                            expires: now + s.min_ttl,
                            last_error: Some(err.to_string()),
                        };
                        (
                            Some(entry),
                            Ok(Resolved {
                                addrs,
                                cached: true,
                            }),
                        )
                    }
                    None => {
                        tracing::warn!(host, error = %err, "DNS lookup failed");
                        (None, Err(err))
                    }
                }
            }
        };
        let mut entries = self.entries();
        match entry {
            Some(e) => {
                entries.insert(host.to_owned(), e);
            }
            None => {
                if let Some(e) = entries.get_mut(host) {
                    e.last_error = outcome.as_ref().err().map(|e| e.to_string());
                }
            }
        }
        outcome
    }

    /// One lookup, bounded by `dns_timeout`: addresses and when the answer stops being valid.
    ///
    /// Run on the control runtime (`timer::on_control`): the resolver makes its own timers and
    /// background tasks, and a shard has no timer wheel; its sockets then stay on one runtime
    /// whichever shard asked first.
    async fn lookup(
        &self,
        host: &str,
        timeout: Option<Duration>,
    ) -> Result<(Vec<IpAddr>, Instant), LookupError> {
        let resolver = self
            .resolver
            .get_or_init(|| build_resolver(&self.settings))
            .clone();
        let host = host.to_owned();
        let max_ttl = self.settings.max_ttl;
        let work = async move {
            match resolver {
                Some(r) => match r.lookup_ip(host).await {
                    Ok(l) => Ok((l.iter().collect(), l.valid_until())),
                    Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                        Err(LookupError::NotFound)
                    }
                    Err(e) => Err(LookupError::Failed(e.to_string())),
                },
                None => match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(addrs) => Ok((addrs.map(|a| a.ip()).collect(), Instant::now() + max_ttl)),
                    Err(e) => Err(LookupError::Failed(e.to_string())),
                },
            }
        };
        let bounded = async move {
            match timeout {
                Some(t) => crate::timer::timeout(t, work)
                    .await
                    .unwrap_or(Err(LookupError::Timeout(t))),
                None => work.await,
            }
        };
        crate::timer::on_control(bounded)
            .await
            .unwrap_or_else(|| Err(LookupError::Failed("shutting down".into())))
    }
}

fn build_resolver(s: &DnsSettings) -> Option<TokioResolver> {
    let mut builder = if s.nameservers.is_empty() {
        match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system DNS configuration; using the system resolver");
                return None;
            }
        }
    } else {
        let servers = s
            .nameservers
            .iter()
            .map(|a| {
                let conn = |protocol| {
                    let mut c = ConnectionConfig::new(protocol);
                    c.port = a.port();
                    c
                };
                NameServerConfig::new(
                    a.ip(),
                    true,
                    vec![conn(ProtocolConfig::Udp), conn(ProtocolConfig::Tcp)],
                )
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(ResolverOpts::default())
    };
    let opts = builder.options_mut();
    // Breakwater keeps its own cache, with its own clamps and stale answers.
    opts.cache_size = 0;
    if let Some(t) = s.timeout {
        opts.timeout = t;
    }
    match builder.build() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the DNS resolver; using the system resolver");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use testkit::{DnsAnswer, DnsServer};

    use super::*;

    const NAME: &str = "pg.unit.test";

    fn cache(server: &DnsServer, min: u64, max: u64) -> DnsCache {
        DnsCache::new(DnsSettings {
            timeout: Some(Duration::from_millis(300)),
            min_ttl: Duration::from_millis(min),
            max_ttl: Duration::from_millis(max),
            nxdomain_ttl: Duration::from_millis(400),
            nameservers: vec![server.addr()],
        })
    }

    const T: Option<Duration> = Some(Duration::from_millis(300));

    #[tokio::test]
    async fn ttls_are_clamped_between_dns_min_ttl_and_dns_max_ttl() {
        let server = DnsServer::start().unwrap();
        let one = Ipv4Addr::new(10, 0, 0, 1);
        // TTL 0 is raised to dns_min_ttl: a second resolve within it asks nobody.
        server.set(NAME, DnsAnswer::A(vec![one], 0));
        let c = cache(&server, 500, 800);
        let r = c.resolve(NAME, T).await.unwrap();
        assert_eq!((r.addrs, r.cached), (vec![IpAddr::V4(one)], false));
        let asked = server.queries();
        let r = c.resolve(NAME, T).await.unwrap();
        assert!(r.cached);
        assert_eq!(server.queries(), asked);
        // TTL 300 s is cut to dns_max_ttl: after it the name is asked again.
        server.set(NAME, DnsAnswer::A(vec![one], 300));
        tokio::time::sleep(Duration::from_millis(600)).await;
        c.resolve(NAME, T).await.unwrap();
        let asked = server.queries();
        let ttl = c.snapshot()[0].ttl_left;
        assert!(ttl <= Duration::from_millis(800), "{ttl:?}");
        tokio::time::sleep(Duration::from_millis(900)).await;
        let r = c.resolve(NAME, T).await.unwrap();
        assert!(!r.cached);
        assert!(server.queries() > asked);
    }

    #[tokio::test]
    async fn a_silent_resolver_gets_the_last_good_answer_and_nxdomain_is_remembered() {
        let server = DnsServer::start().unwrap();
        let one = Ipv4Addr::new(10, 0, 0, 1);
        server.set(NAME, DnsAnswer::A(vec![one], 0));
        let c = cache(&server, 200, 200);
        c.resolve(NAME, T).await.unwrap();
        server.set(NAME, DnsAnswer::Silent);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let started = Instant::now();
        let r = c.resolve(NAME, T).await.unwrap();
        assert_eq!(r.addrs, vec![IpAddr::V4(one)]);
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "bounded by dns_timeout"
        );
        assert_eq!(c.stale_served.load(Ordering::Relaxed), 1);
        assert!(c.snapshot()[0].last_error.is_some());

        // A name never seen and not answered: a timeout error, not a hang.
        let err = c.resolve("other.unit.test", T).await;
        assert!(err.is_err());

        // NXDOMAIN is cached for dns_nxdomain_ttl.
        server.set(NAME, DnsAnswer::NxDomain);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            c.resolve(NAME, T).await,
            Err(DnsError::NotFound { .. })
        ));
        server.set(NAME, DnsAnswer::A(vec![one], 0));
        let asked = server.queries();
        assert!(matches!(
            c.resolve(NAME, T).await,
            Err(DnsError::NotFound { .. })
        ));
        assert_eq!(server.queries(), asked, "NXDOMAIN came from the cache");
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(c.resolve(NAME, T).await.is_ok());
    }
}
