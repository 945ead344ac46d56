//! The set of pools: one [`ServerPool`] per (database, server user) and what they share — the
//! hosts with their storm controls and the DNS cache, the caps `max_db_connections` and
//! `max_server_connections` — plus what operators switch on them: pause and the reconnect
//! epoch, and `reconfigure` on RELOAD. Readers get deadpool-free [`PoolStatus`]es; PAUSE,
//! WAIT_CLOSE and the like wait on [`Changes`] rather than polling.
//!
//! The caller keeps its own per-pool data beside each pool (`T`, which gives access to the
//! pool through `AsRef`); this module never looks into it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use stats::PoolStats;
use tokio::sync::Semaphore;

use crate::changes::Changes;
use crate::dns::{DnsCache, DnsSettings};
use crate::failover::HostList;
use crate::fleet::{Fleet, FleetSettings, FleetStatus};
use crate::host::{Hosts, StormSettings};
use crate::pool::{Limits, PoolSizes, ServerPool};
use crate::reserve::ReserveSettings;
use crate::role::{LoadBalanceHosts, TargetSessionAttrs};
use crate::settings::{ServerSettings, ServerTarget};

/// Which pool: the client-facing database name and the server user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub db: String,
    pub user: String,
}

/// How to open a pool, from the caller's route for its database.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub target: ServerTarget,
    /// Every host to try, in order; `target.host`/`port` when empty.
    pub hosts: Vec<(String, u16)>,
    pub attrs: TargetSessionAttrs,
    pub load_balance: LoadBalanceHosts,
    pub size: usize,
    pub min_size: usize,
    /// Cap on server connections to this database across all its pools.
    pub max_db_connections: Option<usize>,
    /// Cap on server connections of this pool's user across all its pools.
    pub max_user_connections: Option<usize>,
    pub reserve: ReserveSettings,
    /// `fleet_budget` and friends: the database's slots are shared with other processes.
    pub fleet: Option<FleetSettings>,
}

/// What [`PoolSet::reconfigure`] does with one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconfigure {
    /// Keep serving, at this size, minimum and reserve.
    Keep {
        size: usize,
        min_size: usize,
        reserve: ReserveSettings,
    },
    /// Retire it: its servers close as released, and the next login opens a fresh pool.
    Retire,
}

/// Which databases are paused: all of them, or some by name.
#[derive(Debug, Default)]
pub struct Paused {
    pub all: bool,
    pub databases: HashSet<String>,
}

impl Paused {
    pub fn is_paused(&self, db: &str) -> bool {
        self.all || self.databases.contains(db)
    }
}

pub struct PoolSet<T> {
    hosts: Hosts,
    /// `server_login_retry`: spacing of host searches while none matches.
    retry: Duration,
    /// `max_server_connections`.
    total_limit: Option<Arc<Semaphore>>,
    /// `max_db_connections`, per database.
    db_limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// `max_user_connections`, per server user; made when the user's first pool opens.
    user_limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Fleet budgets, per database; each has its control task, started with the database's
    /// first pool.
    fleets: Mutex<HashMap<String, Arc<Fleet>>>,
    /// Settings for pools opened from now on (reconfigure updates the open ones).
    settings: RwLock<Arc<ServerSettings>>,
    /// database → server user → pool. Nested so that a login looks its pool up by `&str`,
    /// without building a key.
    pools: Mutex<HashMap<String, HashMap<String, Arc<T>>>>,
    paused: Mutex<Paused>,
    /// Signalled by every pool when a server is released or closed.
    changes: Arc<Changes>,
}

fn lock<U>(m: &Mutex<U>) -> MutexGuard<'_, U> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl<T: AsRef<ServerPool>> PoolSet<T> {
    pub fn new(
        storm: StormSettings,
        dns: DnsSettings,
        max_server_connections: Option<usize>,
        settings: ServerSettings,
    ) -> PoolSet<T> {
        PoolSet {
            retry: storm.retry_base,
            hosts: Hosts::new(storm).with_dns(Arc::new(DnsCache::new(dns))),
            total_limit: max_server_connections.map(|n| Arc::new(Semaphore::new(n))),
            db_limits: Mutex::new(HashMap::new()),
            user_limits: Mutex::new(HashMap::new()),
            fleets: Mutex::new(HashMap::new()),
            settings: RwLock::new(Arc::new(settings)),
            pools: Mutex::new(HashMap::new()),
            paused: Mutex::new(Paused::default()),
            changes: Arc::default(),
        }
    }

    pub fn get(&self, db: &str, user: &str) -> Option<Arc<T>> {
        lock(&self.pools)
            .get(db)
            .and_then(|users| users.get(user))
            .cloned()
    }

    /// The pool for (`db`, `user`), opened from `spec()` on first use; `wrap` adds the
    /// caller's data to a new pool.
    pub fn get_or_open(
        &self,
        db: &str,
        user: &str,
        spec: impl FnOnce() -> PoolSpec,
        wrap: impl FnOnce(Arc<ServerPool>) -> T,
    ) -> Arc<T> {
        let mut pools = lock(&self.pools);
        if let Some(e) = pools.get(db).and_then(|users| users.get(user)) {
            return e.clone();
        }
        let pool = self.open(spec());
        pool.set_paused(lock(&self.paused).is_paused(db));
        let entry = Arc::new(wrap(pool));
        pools
            .entry(db.to_owned())
            .or_default()
            .insert(user.to_owned(), entry.clone());
        entry
    }

    fn open(&self, spec: PoolSpec) -> Arc<ServerPool> {
        let mut limits = Limits::default();
        if let Some(n) = spec.max_db_connections {
            limits.0.push(
                lock(&self.db_limits)
                    .entry(spec.target.database.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(n)))
                    .clone(),
            );
        }
        if let Some(n) = spec.max_user_connections {
            limits.0.push(
                lock(&self.user_limits)
                    .entry(spec.target.user.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(n)))
                    .clone(),
            );
        }
        if let Some(total) = &self.total_limit {
            limits.0.push(total.clone());
        }
        let fleet = spec
            .fleet
            .map(|settings| self.fleet(&spec.target.database, &spec.target.dbname, settings));
        if let Some(f) = &fleet {
            limits.0.push(f.semaphore());
        }
        let mut hosts = spec.hosts.iter().map(|(h, p)| self.hosts.get(h, *p));
        let first = hosts
            .next()
            .unwrap_or_else(|| self.hosts.get(&spec.target.host, spec.target.port));
        let hosts = Arc::new(HostList::new(
            first,
            hosts.collect(),
            spec.attrs,
            spec.load_balance,
            self.retry,
        ));
        let stats = Arc::new(PoolStats::new(&spec.target.database, &spec.target.user));
        let reserve = spec.reserve;
        let pool = ServerPool::new(
            spec.target,
            (*self.settings()).clone(),
            PoolSizes {
                size: spec.size,
                min_size: spec.min_size,
            },
            hosts,
            limits,
            stats,
            self.changes.clone(),
        );
        pool.set_reserve(reserve);
        if let Some(f) = fleet {
            f.add_pool(&pool);
            pool.set_fleet(f);
        }
        pool
    }

    /// The fleet of `database`, started on first use (the settings of the
    /// first pool opened for it hold; `fleet_*` keys change on restart only).
    fn fleet(&self, database: &str, dbname: &str, settings: FleetSettings) -> Arc<Fleet> {
        lock(&self.fleets)
            .entry(database.to_owned())
            .or_insert_with(|| {
                let fleet = Fleet::new(database, dbname, settings);
                tokio::spawn(fleet.clone().run());
                fleet
            })
            .clone()
    }

    /// Every fleet's slots, for SHOW FLEET and the metrics.
    pub fn fleets(&self) -> Vec<FleetStatus> {
        crate::fleet::statuses(&lock(&self.fleets))
    }

    fn settings(&self) -> Arc<ServerSettings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Forgets the pool for (`db`, `user`): the next login opens a fresh one. The caller
    /// closes it.
    pub fn remove(&self, db: &str, user: &str) -> Option<Arc<T>> {
        let mut pools = lock(&self.pools);
        let users = pools.get_mut(db)?;
        let gone = users.remove(user);
        if users.is_empty() {
            pools.remove(db);
        }
        gone
    }

    /// Every pool.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.of(None)
    }

    /// The pools of `db` (every pool with `None`).
    pub fn of(&self, db: Option<&str>) -> Vec<Arc<T>> {
        let pools = lock(&self.pools);
        match db {
            Some(d) => pools
                .get(d)
                .map(|users| users.values().cloned().collect())
                .unwrap_or_default(),
            None => pools
                .values()
                .flat_map(|users| users.values().cloned())
                .collect(),
        }
    }

    /// Changes which databases are paused (`change` may refuse by returning an error), then
    /// applies the result to every pool: checkouts of a paused pool wait at its gate.
    pub fn update_pause<R>(&self, change: impl FnOnce(&mut Paused) -> R) -> R {
        let result = {
            let mut paused = lock(&self.paused);
            change(&mut paused)
        };
        let paused = lock(&self.paused);
        for p in self.all() {
            let pool = (*p).as_ref();
            pool.set_paused(paused.is_paused(&pool.database));
        }
        result
    }

    /// Is `db` paused (with `None`: is everything paused)?
    pub fn is_paused(&self, db: Option<&str>) -> bool {
        let paused = lock(&self.paused);
        match db {
            Some(d) => paused.is_paused(d),
            None => paused.all,
        }
    }

    /// Retires every server connection of `db` (all with `None`) open now: idle ones close at
    /// once, busy ones when released.
    pub fn reconnect(&self, db: Option<&str>) {
        for p in self.of(db) {
            (*p).as_ref().reconnect();
        }
    }

    /// Applies new server settings to every pool, and `decide`s for each whether it keeps
    /// serving (resized) or retires. Pauses of databases that are gone are forgotten.
    pub fn reconfigure(
        &self,
        settings: ServerSettings,
        decide: impl Fn(&T) -> Reconfigure,
        database_exists: impl Fn(&str) -> bool,
    ) {
        match self.settings.write() {
            Ok(mut s) => *s = Arc::new(settings.clone()),
            Err(p) => *p.into_inner() = Arc::new(settings.clone()),
        }
        {
            let mut pools = lock(&self.pools);
            for users in pools.values_mut() {
                users.retain(|_, e| {
                    let pool = (**e).as_ref();
                    match decide(e) {
                        Reconfigure::Keep {
                            size,
                            min_size,
                            reserve,
                        } => {
                            pool.set_reserve(reserve);
                            pool.resize(size);
                            pool.set_min_size(min_size);
                            pool.set_settings(settings.clone());
                            true
                        }
                        Reconfigure::Retire => {
                            pool.reconnect();
                            false
                        }
                    }
                });
            }
            pools.retain(|_, users| !users.is_empty());
        }
        lock(&self.paused).databases.retain(|d| database_exists(d));
    }

    /// Every pool's status, deadpool-free, for the admin console and the metrics exporter.
    pub fn snapshot(&self) -> Vec<(PoolKey, PoolStatus)> {
        self.all()
            .iter()
            .map(|p| {
                let pool = (**p).as_ref();
                (
                    PoolKey {
                        db: pool.database.clone(),
                        user: pool.user.clone(),
                    },
                    pool.status(),
                )
            })
            .collect()
    }

    /// Returns once no server of `db` (any database with `None`) is checked out (PAUSE).
    pub async fn wait_released(&self, db: Option<&str>) {
        self.changes
            .wait_until(|| {
                self.of(db)
                    .iter()
                    .all(|p| (**p).as_ref().status().active == 0)
            })
            .await;
    }

    /// Returns once every server connection of `db` (any with `None`) opened before the last
    /// reconnect is closed (WAIT_CLOSE).
    pub async fn wait_closed(&self, db: Option<&str>) {
        self.changes
            .wait_until(|| {
                self.of(db)
                    .iter()
                    .all(|p| (**p).as_ref().stale_count() == 0)
            })
            .await;
    }

    /// The upstream hosts: storm controls, DNS cache, failure drills.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// Closes every pool: idle connections now, busy ones when released.
    pub fn close_all(&self) {
        for p in self.all() {
            (*p).as_ref().close();
        }
    }
}

/// One pool's state for readers: servers in use and idle, clients waiting, and the switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    /// The pool's size (`pool_size`).
    pub max_size: usize,
    /// `reserve_pool_size`.
    pub reserve_size: usize,
    /// Connections beyond `pool_size` the reserve lets the pool have now.
    pub reserve_in_use: usize,
    /// Server connections open (checked out or idle).
    pub size: usize,
    /// Server connections checked out by clients.
    pub active: usize,
    /// Server connections idle in the pool.
    pub idle: usize,
    /// Checkouts queued for a server.
    pub waiting: usize,
    pub min_size: usize,
    pub paused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry(Arc<ServerPool>);

    impl AsRef<ServerPool> for Entry {
        fn as_ref(&self) -> &ServerPool {
            &self.0
        }
    }

    fn set() -> PoolSet<Entry> {
        PoolSet::new(
            StormSettings::default(),
            DnsSettings::default(),
            Some(10),
            ServerSettings::default(),
        )
    }

    fn open(set: &PoolSet<Entry>, db: &str, user: &str) -> Arc<Entry> {
        let spec = || PoolSpec {
            target: ServerTarget {
                database: db.into(),
                host: "127.0.0.1".into(),
                port: 5432,
                dbname: db.into(),
                user: user.into(),
                credential: None,
                require_auth: Default::default(),
                startup_params: Vec::new(),
                connect_query: None,
                server_auth: Default::default(),
            },
            hosts: Vec::new(),
            attrs: TargetSessionAttrs::Any,
            load_balance: LoadBalanceHosts::Disable,
            size: 2,
            min_size: 0,
            max_db_connections: None,
            max_user_connections: None,
            reserve: ReserveSettings::default(),
            fleet: None,
        };
        set.get_or_open(db, user, spec, Entry)
    }

    #[tokio::test]
    async fn one_pool_per_database_and_user_opened_once() {
        let s = set();
        let a = open(&s, "app", "u");
        assert!(Arc::ptr_eq(&a, &open(&s, "app", "u")));
        open(&s, "app", "v");
        open(&s, "other", "u");
        assert_eq!(s.of(Some("app")).len(), 2);
        assert_eq!(s.all().len(), 3);
        assert!(s.get("other", "v").is_none());
        let status = s.snapshot();
        assert_eq!(status.len(), 3);
        assert!(status
            .iter()
            .all(|(_, st)| st.max_size == 2 && st.size == 0 && st.active == 0));
    }

    #[tokio::test]
    async fn a_paused_database_gates_its_pools_including_ones_opened_later() {
        let s = set();
        let app = open(&s, "app", "u");
        let other = open(&s, "other", "u");
        s.update_pause(|p| p.databases.insert("app".into()));
        assert!(app.0.is_paused() && !other.0.is_paused());
        assert!(open(&s, "app", "late").0.is_paused(), "opened while paused");
        assert!(s.is_paused(Some("app")) && !s.is_paused(None));
        s.update_pause(|p| p.all = true);
        assert!(other.0.is_paused() && s.is_paused(None));
        s.update_pause(|p| {
            p.all = false;
            p.databases.clear();
        });
        assert!(!app.0.is_paused() && !other.0.is_paused());
    }

    #[tokio::test]
    async fn reconfigure_resizes_the_kept_pools_and_forgets_the_retired() {
        let s = set();
        open(&s, "app", "u");
        let gone = open(&s, "gone", "u");
        s.update_pause(|p| p.databases.insert("gone".into()));
        s.reconfigure(
            ServerSettings::default(),
            |e| match e.0.database.as_str() {
                "app" => Reconfigure::Keep {
                    size: 5,
                    min_size: 1,
                    reserve: ReserveSettings::default(),
                },
                _ => Reconfigure::Retire,
            },
            |db| db == "app",
        );
        let kept = s.snapshot();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (
                kept[0].0.db.as_str(),
                kept[0].1.max_size,
                kept[0].1.min_size
            ),
            ("app", 5, 1)
        );
        assert!(
            !s.is_paused(Some("gone")),
            "the pause of a removed database"
        );
        assert!(!Arc::ptr_eq(&gone, &open(&s, "gone", "u")), "a fresh pool");
    }

    #[tokio::test]
    async fn waits_for_release_and_close_end_at_once_when_nothing_is_out() {
        let s = set();
        open(&s, "app", "u");
        tokio::time::timeout(Duration::from_secs(5), async {
            s.wait_released(None).await;
            s.wait_closed(Some("app")).await;
        })
        .await
        .expect("nothing to wait for");
    }
}
