//! `auth_query` (PgBouncer's, with `auth_user` and `auth_dbname`): the secret of a user who is
//! not in the auth_file is looked up in the database, by running `auth_query` as `auth_user` on
//! a small pool of its own ([`upstream::LookupPool`]), and cached.
//!
//! The cache is what keeps a storm of logins from becoming a storm of queries: an answer is
//! kept for `auth_cache_ttl` (a password change is picked up after at most that long), "no such
//! user or no password" for `auth_negative_cache_ttl` (so a flood of made-up names costs one
//! query per name per that time), concurrent logins of one user wait for one query
//! (single-flight), and the cache holds at most `auth_cache_max_entries` users. A failed lookup
//! (database down, bad query, auth_query_timeout) is never cached: the logins that waited for
//! it fail together, the next one tries again.
//!
//! This module never logs or shows a secret, and never tells a client whether a user exists.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::auth::Secret;
use stats::GlobalStats;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use upstream::{LookupPool, ServerTarget};

use crate::settings::{DatabaseRoute, ProxySettings};

/// PgBouncer's default: the user's row of `pg_shadow` (which needs a superuser auth_user; the
/// SECURITY DEFINER function pattern avoids that).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

/// A database's `auth_user`, `auth_query` and `auth_dbname` (its own, else the pooler's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthQueryRoute {
    /// Who runs the query; its own secret comes from the auth_file (or the database's
    /// `password` when the database's `user` is this user).
    pub user: String,
    pub query: String,
    /// The `[databases]` entry to run it on; `None`: the database the client asked for.
    pub dbname: Option<String>,
}

/// How lookups are bounded and how long their answers are kept. Pooler-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLookupSettings {
    /// `auth_cache_ttl`: how long a secret found is used without asking again.
    pub cache_ttl: Duration,
    /// `auth_negative_cache_ttl`: how long "no such user / no password" is remembered.
    pub negative_cache_ttl: Duration,
    /// `auth_cache_max_entries`: users remembered at most (answers and lookups in flight).
    pub cache_max_entries: usize,
    /// `auth_query_timeout`: one lookup, from waiting for a lookup connection to the answer.
    pub timeout: Option<Duration>,
    /// `auth_pool_size`: server connections per (database, auth_user) lookup pool.
    pub pool_size: usize,
}

impl Default for AuthLookupSettings {
    fn default() -> Self {
        AuthLookupSettings {
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(10),
            cache_max_entries: 10_000,
            timeout: Some(Duration::from_secs(5)),
            pool_size: 2,
        }
    }
}

/// A client whose password check fails against a cached secret at least this old has its
/// entry dropped, so that a password changed in the database works on the next try instead
/// of after the whole TTL; younger entries are kept, so wrong guesses cannot turn into more
/// than one query per user per this long.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// What a lookup found.
#[derive(Clone)]
pub(crate) enum Answer {
    Secret(Arc<Secret>),
    /// No row, a NULL or empty password: the login fails like a wrong password.
    NoSecret,
    /// The lookup itself failed; the text says why (for the log, never the client).
    Failed(Arc<str>),
}

/// How a [`SecretCache::get`] was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// From an answer already there.
    Cached,
    /// By waiting for a lookup another login started.
    Joined,
    /// By running the lookup.
    LookedUp,
}

/// Where a user's secret is looked up: the lookup pool's database, auth_user and query.
type Source = Arc<str>;

#[derive(Default)]
struct Slot {
    answer: OnceCell<(Answer, Instant)>,
}

impl Slot {
    /// May a new login use this slot (its answer, or the lookup in flight)? A slot whose
    /// lookup was abandoned (the login that ran it left) stays usable: the next login runs it.
    fn usable(&self, now: Instant, s: &AuthLookupSettings) -> bool {
        match self.answer.get() {
            None => true,
            Some((Answer::Secret(_), at)) => now.duration_since(*at) < s.cache_ttl,
            Some((Answer::NoSecret, at)) => now.duration_since(*at) < s.negative_cache_ttl,
            Some((Answer::Failed(_), _)) => false,
        }
    }
}

/// Answers per (source, user): TTLs, single-flight, a bound on entries. No I/O of its own.
#[derive(Default)]
pub(crate) struct SecretCache {
    slots: Mutex<HashMap<(Source, String), Arc<Slot>>>,
}

impl SecretCache {
    /// The answer for `user`, running `lookup` only when no usable answer or lookup in flight
    /// exists. Waiting for another login's lookup is bounded by that lookup's own timeout.
    pub(crate) async fn get<F, Fut>(
        &self,
        source: &Source,
        user: &str,
        settings: &AuthLookupSettings,
        lookup: F,
    ) -> (Answer, Served)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer>,
    {
        let slot = self.slot(source, user, settings, Instant::now());
        if let Some((answer, _)) = slot.answer.get() {
            return (answer.clone(), Served::Cached);
        }
        let mut ran = false;
        let (answer, _) = slot
            .answer
            .get_or_init(|| {
                ran = true;
                async move { (lookup().await, Instant::now()) }
            })
            .await;
        let served = if ran {
            Served::LookedUp
        } else {
            Served::Joined
        };
        (answer.clone(), served)
    }

    fn slot(
        &self,
        source: &Source,
        user: &str,
        settings: &AuthLookupSettings,
        now: Instant,
    ) -> Arc<Slot> {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let key = (source.clone(), user.to_owned());
        if let Some(slot) = slots.get(&key).filter(|s| s.usable(now, settings)) {
            return slot.clone();
        }
        if !slots.contains_key(&key) && slots.len() >= settings.cache_max_entries.max(1) {
            evict(&mut slots, now, settings);
        }
        let slot = Arc::new(Slot::default());
        slots.insert(key, slot.clone());
        slot
    }

    /// Drops `user`'s answer if it is at least `older_than` old (see [`RECHECK_AFTER`]).
    /// Whether it was dropped.
    pub(crate) fn forget_if_older(
        &self,
        source: &Source,
        user: &str,
        older_than: Duration,
    ) -> bool {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let key = (source.clone(), user.to_owned());
        let old = slots
            .get(&key)
            .and_then(|s| s.answer.get())
            .is_some_and(|(_, at)| at.elapsed() >= older_than);
        if old {
            slots.remove(&key);
        }
        old
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn clear(&self) {
        if let Ok(mut s) = self.slots.lock() {
            s.clear();
        }
    }
}

/// Makes room for one entry: the expired ones go; if none has, the oldest answer (a lookup in
/// flight is not oldest: its waiters keep their slot whether or not it is listed).
fn evict(
    slots: &mut HashMap<(Source, String), Arc<Slot>>,
    now: Instant,
    settings: &AuthLookupSettings,
) {
    slots.retain(|_, s| s.usable(now, settings));
    if slots.len() < settings.cache_max_entries.max(1) {
        return;
    }
    let oldest = slots
        .iter()
        .min_by_key(|(_, s)| s.answer.get().map(|(_, at)| *at).unwrap_or(now))
        .map(|(k, _)| k.clone());
    if let Some(k) = oldest {
        slots.remove(&k);
    }
}

/// A lookup that found no answer, for the client: 08006, and nothing about why (the log has
/// that).
#[derive(Debug)]
pub(crate) struct LookupFailed;

/// What a login got from auth_query.
pub(crate) struct Looked {
    pub secret: Option<Arc<Secret>>,
    /// Where it came from, to drop it again if the password check fails.
    pub source: Source,
}

/// The cache and the lookup pools, shared by all logins.
#[derive(Default)]
pub(crate) struct AuthLookups {
    cache: SecretCache,
    pools: Mutex<HashMap<Source, Arc<LookupPool>>>,
}

impl AuthLookups {
    /// `user`'s secret for a login to `route` (which has an auth_query), from the cache or the
    /// database.
    pub(crate) async fn secret(
        &self,
        shared: &crate::Shared,
        settings: &ProxySettings,
        route: &DatabaseRoute,
        user: &str,
    ) -> Result<Looked, LookupFailed> {
        let Some(aq) = route.auth_query.as_ref() else {
            return Err(LookupFailed);
        };
        let auth_route = match &aq.dbname {
            None => std::borrow::Cow::Borrowed(route),
            Some(d) => match settings.resolve(d) {
                Some(r) => r,
                None => {
                    GlobalStats::bump(&shared.stats.auth_query_failures);
                    tracing::warn!(auth_dbname = %d, "auth_query: auth_dbname is not in [databases]");
                    return Err(LookupFailed);
                }
            },
        };
        let source: Source = format!(
            "{}\0{}\0{}\0{:?}\0{}",
            auth_route.name, auth_route.dbname, aq.user, auth_route.hosts, aq.query
        )
        .into();
        let limits = &settings.auth_lookup;
        let (answer, served) = self
            .cache
            .get(&source, user, limits, || {
                let pool = self.pool(shared, settings, &auth_route, aq, &source);
                lookup(pool, user, settings.server.clone(), limits.timeout)
            })
            .await;
        let counter = match served {
            Served::LookedUp => &shared.stats.auth_query_lookups,
            Served::Cached | Served::Joined => &shared.stats.auth_query_cache_hits,
        };
        GlobalStats::bump(counter);
        match answer {
            Answer::Secret(secret) => Ok(Looked {
                secret: Some(secret),
                source,
            }),
            Answer::NoSecret => Ok(Looked {
                secret: None,
                source,
            }),
            Answer::Failed(why) => {
                // Logged once per lookup, where it ran; every login that shared it counts.
                if served == Served::LookedUp {
                    tracing::warn!(user, database = %auth_route.name, auth_user = %aq.user, "auth_query lookup failed: {why}");
                }
                GlobalStats::bump(&shared.stats.auth_query_failures);
                // A pool that never got a connection goes, so names that never work (a
                // database the "*" entry serves but the server lacks) leave nothing behind.
                self.drop_pool_if_unused(&source);
                Err(LookupFailed)
            }
        }
    }

    /// The maintenance tick: lookup connections idle past server_idle_timeout (or past
    /// server_lifetime) close, and pools left with none go (automatic databases come and go).
    pub(crate) fn close_idle(&self, server: &upstream::ServerSettings) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|_, pool| !pool.close_idle(server));
        }
    }

    fn drop_pool_if_unused(&self, source: &Source) {
        if let Ok(mut pools) = self.pools.lock() {
            if pools.get(source).is_some_and(|p| p.idle_count() == 0) {
                pools.remove(source);
            }
        }
    }

    /// After a failed password check against a looked-up secret (see [`RECHECK_AFTER`]).
    /// Whether the answer was dropped, so that a lookup now would ask the database again.
    pub(crate) fn password_check_failed(&self, looked: &Looked, user: &str) -> bool {
        self.cache
            .forget_if_older(&looked.source, user, RECHECK_AFTER)
    }

    /// RELOAD: answers and pools were made under the old settings (auth_user's password,
    /// hosts, the query); the next login starts afresh.
    pub(crate) fn clear(&self) {
        self.cache.clear();
        if let Ok(mut p) = self.pools.lock() {
            p.clear();
        }
    }

    fn pool(
        &self,
        shared: &crate::Shared,
        settings: &ProxySettings,
        auth_route: &DatabaseRoute,
        aq: &AuthQueryRoute,
        source: &Source,
    ) -> Arc<LookupPool> {
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if let Some(p) = pools.get(source) {
            return p.clone();
        }
        let target = ServerTarget {
            database: auth_route.name.clone(),
            host: auth_route.host.clone(),
            port: auth_route.port,
            dbname: auth_route.dbname.clone(),
            user: aq.user.clone(),
            credential: auth_user_credential(settings, auth_route, &aq.user),
            require_auth: auth_route.require_auth.clone(),
            // The lookup runs one query of its own: it needs no client's preparation.
            startup_params: auth_route.startup_params.clone(),
            connect_query: None,
            // An RDS IAM database logs its auth_user in with a token too.
            server_auth: auth_route.server_auth.clone(),
        };
        let hosts = auth_route
            .hosts
            .iter()
            .map(|(h, p)| shared.pools.hosts().get(h, *p))
            .collect();
        let pool = Arc::new(LookupPool::new(
            target,
            hosts,
            aq.query.clone(),
            settings.auth_lookup.pool_size,
        ));
        pools.insert(source.clone(), pool.clone());
        pool
    }
}

/// How auth_user logs in: the database's `password` when the database logs in as auth_user,
/// else its auth_file entry (a password, or an md5 hash for an md5 server). A SCRAM verifier
/// alone cannot log in, as in PgBouncer.
fn auth_user_credential(
    settings: &ProxySettings,
    route: &DatabaseRoute,
    auth_user: &str,
) -> Option<proto::auth::ServerCredential> {
    use proto::auth::ServerCredential;
    if route.user.as_deref() == Some(auth_user) {
        if let Some(p) = &route.password {
            return Some(ServerCredential::Password(p.clone()));
        }
    }
    match settings.userlist.get(auth_user)? {
        Secret::Plain(p) if !p.is_empty() => Some(ServerCredential::Password(p.clone())),
        Secret::Md5(hash) => Some(ServerCredential::Md5Hash(*hash)),
        _ => None,
    }
}

/// One lookup on the pool, bounded by auth_query_timeout, its text read as a secret.
async fn lookup(
    pool: Arc<LookupPool>,
    user: &str,
    server: upstream::ServerSettings,
    timeout: Option<Duration>,
) -> Answer {
    let query = pool.lookup(user, &server);
    let result = match timeout {
        Some(t) => match upstream::timer::timeout(t, query).await {
            Ok(r) => r,
            Err(_) => {
                return Answer::Failed(
                    format!("auth_query_timeout ({}) expired", crate::fmt_duration(t)).into(),
                )
            }
        },
        None => query.await,
    };
    match result {
        Ok(None) => Answer::NoSecret,
        Ok(Some(stored)) if stored.is_empty() => Answer::NoSecret,
        Ok(Some(stored)) => match Secret::from_stored(stored) {
            Some(secret) => Answer::Secret(Arc::new(secret)),
            None => Answer::Failed(
                "auth_query returned a password that starts like an md5 hash or a SCRAM \
                 verifier but is not one"
                    .into(),
            ),
        },
        Err(e) => Answer::Failed(e.to_string().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings() -> AuthLookupSettings {
        AuthLookupSettings {
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(10),
            cache_max_entries: 3,
            timeout: Some(Duration::from_secs(5)),
            pool_size: 2,
        }
    }

    fn source() -> Source {
        Arc::from("app")
    }

    fn secret(p: &str) -> Answer {
        Answer::Secret(Arc::new(Secret::Plain(p.into())))
    }

    fn password(a: &Answer) -> Option<String> {
        match a {
            Answer::Secret(s) => match &**s {
                Secret::Plain(p) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Looks `user` up through `cache`, counting the lookups run in `runs`; the lookup answers
    /// `answer` after `delay`.
    async fn get(
        cache: &SecretCache,
        user: &str,
        runs: &AtomicUsize,
        delay: Duration,
        answer: Answer,
    ) -> (Answer, Served) {
        cache
            .get(&source(), user, &settings(), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                answer
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_secret_is_kept_for_the_cache_ttl_and_then_looked_up_again() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        let (a, served) = get(&cache, "u", &runs, Duration::ZERO, secret("one")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("one"), Served::LookedUp)
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        let (a, served) = get(&cache, "u", &runs, Duration::ZERO, secret("two")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("one"), Served::Cached)
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let (a, served) = get(&cache, "u", &runs, Duration::ZERO, secret("two")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("two"), Served::LookedUp)
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn no_such_user_is_kept_for_the_shorter_negative_ttl() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        get(&cache, "ghost", &runs, Duration::ZERO, Answer::NoSecret).await;
        tokio::time::advance(Duration::from_secs(9)).await;
        let (a, served) = get(&cache, "ghost", &runs, Duration::ZERO, secret("x")).await;
        assert!(matches!(a, Answer::NoSecret));
        assert_eq!(served, Served::Cached);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (a, served) = get(&cache, "ghost", &runs, Duration::ZERO, secret("x")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("x"), Served::LookedUp)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_is_not_kept() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        let failed = Answer::Failed(Arc::from("down"));
        let (a, _) = get(&cache, "u", &runs, Duration::ZERO, failed).await;
        assert!(matches!(a, Answer::Failed(_)));
        let (a, served) = get(&cache, "u", &runs, Duration::ZERO, secret("p")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("p"), Served::LookedUp)
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_logins_of_one_user_share_one_lookup() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        let gets = (0..50).map(|_| get(&cache, "u", &runs, Duration::from_secs(1), secret("p")));
        let results = futures_util::future::join_all(gets).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(results
            .iter()
            .all(|(a, _)| password(a).as_deref() == Some("p")));
        let looked_up = results
            .iter()
            .filter(|(_, s)| *s == Served::LookedUp)
            .count();
        assert_eq!(looked_up, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn logins_that_shared_a_failed_lookup_fail_together() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        let failed = Answer::Failed(Arc::from("auth_query_timeout (5s) expired"));
        let gets = (0..20).map(|_| get(&cache, "u", &runs, Duration::from_secs(5), failed.clone()));
        let results = futures_util::future::join_all(gets).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(a, _)| matches!(a, Answer::Failed(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_abandoned_by_its_login_is_taken_over_by_a_waiting_one() {
        let cache = Arc::new(SecretCache::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let first = {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                get(&cache, "u", &runs, Duration::from_secs(10), secret("p")).await
            })
        };
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                get(&cache, "u", &runs, Duration::from_secs(1), secret("p")).await
            })
        };
        tokio::time::advance(Duration::from_millis(10)).await;
        first.abort();
        let (a, served) = second.await.unwrap();
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("p"), Served::LookedUp)
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_never_holds_more_than_its_bound_and_drops_the_oldest() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        for user in ["a", "b", "c", "d", "e"] {
            get(&cache, user, &runs, Duration::ZERO, secret(user)).await;
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(cache.len() <= 3, "{} entries", cache.len());
        }
        // "e", "d" and "c" are kept; "a" went first.
        let (_, served) = get(&cache, "c", &runs, Duration::ZERO, secret("c")).await;
        assert_eq!(served, Served::Cached);
        let (_, served) = get(&cache, "a", &runs, Duration::ZERO, secret("a")).await;
        assert_eq!(served, Served::LookedUp);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_make_room_before_live_ones_go() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        get(&cache, "gone", &runs, Duration::ZERO, Answer::NoSecret).await;
        get(&cache, "a", &runs, Duration::ZERO, secret("a")).await;
        get(&cache, "b", &runs, Duration::ZERO, secret("b")).await;
        // The negative answer expires; a fourth user replaces it, not "a".
        tokio::time::advance(Duration::from_secs(11)).await;
        get(&cache, "c", &runs, Duration::ZERO, secret("c")).await;
        let (_, served) = get(&cache, "a", &runs, Duration::ZERO, secret("a")).await;
        assert_eq!(served, Served::Cached);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_password_check_drops_only_an_answer_old_enough() {
        let cache = SecretCache::default();
        let runs = AtomicUsize::new(0);
        get(&cache, "u", &runs, Duration::ZERO, secret("old")).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!cache.forget_if_older(&source(), "u", RECHECK_AFTER));
        let (_, served) = get(&cache, "u", &runs, Duration::ZERO, secret("new")).await;
        assert_eq!(served, Served::Cached, "a young answer is kept");
        tokio::time::advance(RECHECK_AFTER).await;
        assert!(cache.forget_if_older(&source(), "u", RECHECK_AFTER));
        let (a, served) = get(&cache, "u", &runs, Duration::ZERO, secret("new")).await;
        assert_eq!(
            (password(&a).as_deref(), served),
            (Some("new"), Served::LookedUp)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn users_of_different_sources_are_cached_apart() {
        let cache = SecretCache::default();
        let s = settings();
        let (a, _) = cache
            .get(&Arc::from("one"), "u", &s, || async { secret("1") })
            .await;
        let (b, served) = cache
            .get(&Arc::from("two"), "u", &s, || async { secret("2") })
            .await;
        assert_eq!(password(&a).as_deref(), Some("1"));
        assert_eq!(
            (password(&b).as_deref(), served),
            (Some("2"), Served::LookedUp)
        );
    }
}
