//! The fleet budget: every Breakwater pointed at one database shares `fleet_budget` server
//! connections through PostgreSQL session advisory locks, one lock per slot, held on one control
//! connection per process per database. A slot is the right to one server connection; locally
//! it is a permit of a semaphore that every pool of the database takes before it connects (one
//! more of the pool's [`Limits`](crate::pool::Limits)).
//!
//! Keys: the two-int form `pg_try_advisory_lock(k1, k2)`, so they cannot collide with an
//! application's one-bigint locks; `k1` is [`fleet_key`] (FNV-1a of `breakwater fleet:` and the
//! server-side database name, top bit cleared), `k2` the slot number `0..fleet_budget`.
//! Advisory locks are per database, so two databases never share slots.
//!
//! [`FleetPlan`] is the pure part (how many slots to want, when to take and give back) and is
//! tested on paused time; [`Fleet::run`] is the I/O shell around it. Invariant while connected:
//! the semaphore never grants more permits than the process holds locks — a slot is taken
//! before its permit is added and its permit forgotten before its lock is released. A process
//! that loses its control connection loses its locks with it (PostgreSQL ends them with the
//! session), so it shrinks to `fleet_min_share` the moment the connection closes (the control
//! task watches it between ticks) until it is back; that share is then used without a lock,
//! which is the one way the fleet may exceed its budget (by the min shares of the processes
//! cut off). Before each reconnect the share is given back, as at start, so a process coming
//! back adds its control connection and then only servers it holds locks for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::conn::ServerConn;
use crate::pool::ServerPool;

/// `fleet_budget`, `fleet_min_share`, `fleet_release_delay` of one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSettings {
    pub budget: usize,
    pub min_share: usize,
    pub release_delay: Duration,
}

/// Most slots taken in one step: a process that wants many takes them over a few ticks, and
/// fifty processes starting together spread their lock queries (each tick is jittered too).
pub const MAX_TAKE_STEP: usize = 4;

/// What the control loop should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Take(usize),
    Release(usize),
    Hold,
}

/// The sans-IO decision: given the slots held and what the pools need now (servers checked out
/// or being opened, plus clients waiting), take slots at once (bounded per step) and give back
/// what has not been needed for `release_delay`, never going under the minimum share.
#[derive(Debug)]
pub struct FleetPlan {
    settings: FleetSettings,
    /// Since when the process has held more than it needed, and the most it wanted meanwhile.
    surplus: Option<(Instant, usize)>,
}

impl FleetPlan {
    pub fn new(settings: FleetSettings) -> FleetPlan {
        FleetPlan {
            settings,
            surplus: None,
        }
    }

    /// Slots wanted for `need`: at least the minimum share, at most the budget.
    pub fn wanted(&self, need: usize) -> usize {
        let s = &self.settings;
        need.max(s.min_share).min(s.budget)
    }

    /// `others_short`: another process holds less than its minimum share (the fleet is full).
    /// Then a process over its own share stops growing and gives back a slot a tick, busy or
    /// not (a busy one's slot comes free when its transaction ends), until none is short.
    pub fn step(&mut self, now: Instant, held: usize, need: usize, others_short: bool) -> Step {
        let want = self.wanted(need);
        let min_share = self.settings.min_share;
        if others_short {
            self.surplus = None;
            return match held.cmp(&min_share.min(want)) {
                std::cmp::Ordering::Greater if held > min_share => Step::Release(1),
                std::cmp::Ordering::Less => {
                    Step::Take((min_share.min(want) - held).min(MAX_TAKE_STEP))
                }
                _ => Step::Hold,
            };
        }
        if held < want {
            self.surplus = None;
            return Step::Take((want - held).min(MAX_TAKE_STEP));
        }
        if held == want {
            self.surplus = None;
            return Step::Hold;
        }
        let (since, peak) = self.surplus.get_or_insert((now, want));
        *peak = (*peak).max(want);
        if now.saturating_duration_since(*since) < self.settings.release_delay {
            return Step::Hold;
        }
        let keep = *peak;
        self.surplus = None;
        Step::Release(held - keep)
    }
}

/// The advisory-lock namespace (`k1`) of a database's fleet: 32-bit FNV-1a of
/// `breakwater fleet:<dbname>`, top bit cleared so it reads the same as `pg_locks.classid`.
pub fn fleet_key(dbname: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in b"breakwater fleet:".iter().chain(dbname.as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

/// One database's fleet state as SHOW FLEET and the metrics see it.
pub type FleetStatus = stats::FleetSnapshot;

/// One database's fleet: the slot semaphore its pools share and the control loop's state.
pub struct Fleet {
    settings: FleetSettings,
    key: i32,
    semaphore: Arc<Semaphore>,
    pools: Mutex<Vec<Weak<ServerPool>>>,
    status: Mutex<FleetStatus>,
    /// Permits the control task wants back and found no idle server for: the next servers
    /// reused give theirs ([`Fleet::claim_slot`]).
    debt: AtomicUsize,
    /// Permits claimed that way since the control task last looked.
    claimed: AtomicUsize,
}

fn lock<U>(m: &Mutex<U>) -> std::sync::MutexGuard<'_, U> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The `k2` of the shared lock a process holds while it is below its minimum share: the others
/// see it in pg_locks and give slots back. Outside the slot numbers `0..fleet_budget`.
const SHORT_KEY: i32 = i32::MAX;

/// How long one control query may take before the connection is given up as lost.
const CONTROL_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the fleet's total (and who is short) is read from pg_locks; also the control
/// connection's liveness check when nothing else is sent.
const TOTAL_EVERY: Duration = Duration::from_millis(500);
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// How long a reconnect waits for busy servers holding unlocked permits to come back.
const GIVE_BACK_WAIT: Duration = Duration::from_secs(2);

impl Fleet {
    /// A fleet that may open no connection until its control connection has taken slots
    /// (or failed to connect, when it falls back to `min_share` without locks): a process
    /// starting while the fleet is full must not add to it.
    /// `database` is the pool's name for it, `dbname` the server's (which the key hashes, so
    /// sidecars that name the database differently still share its slots).
    pub fn new(database: &str, dbname: &str, settings: FleetSettings) -> Arc<Fleet> {
        let key = fleet_key(dbname);
        Arc::new(Fleet {
            settings,
            key,
            semaphore: Arc::new(Semaphore::new(0)),
            pools: Mutex::new(Vec::new()),
            debt: AtomicUsize::new(0),
            claimed: AtomicUsize::new(0),
            status: Mutex::new(FleetStatus {
                database: database.to_owned(),
                budget: settings.budget,
                min_share: settings.min_share,
                wanted: settings.min_share,
                key,
                ..FleetStatus::default()
            }),
        })
    }

    /// Takes this fleet's permit out of a server's permits for good, if the fleet wants one
    /// back; the server is then closed. Called as an idle server is about to be reused.
    pub(crate) fn claim_slot(&self, permits: &mut Vec<OwnedSemaphorePermit>) -> bool {
        let claimed = self
            .debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        if !claimed {
            return false;
        }
        match permits
            .iter()
            .position(|p| Arc::ptr_eq(p.semaphore(), &self.semaphore))
        {
            Some(i) => {
                permits.swap_remove(i).forget();
                self.claimed.fetch_add(1, Ordering::SeqCst);
                true
            }
            None => {
                self.debt.fetch_add(1, Ordering::SeqCst);
                false
            }
        }
    }

    pub fn semaphore(&self) -> Arc<Semaphore> {
        self.semaphore.clone()
    }

    pub fn settings(&self) -> FleetSettings {
        self.settings
    }

    pub fn add_pool(&self, pool: &Arc<ServerPool>) {
        let mut pools = lock(&self.pools);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    pub fn status(&self) -> FleetStatus {
        lock(&self.status).clone()
    }

    fn pools(&self) -> Vec<Arc<ServerPool>> {
        lock(&self.pools).iter().filter_map(Weak::upgrade).collect()
    }

    /// Servers checked out or being opened plus clients waiting, over the database's pools,
    /// capped by their sizes.
    fn need(&self) -> usize {
        self.pools()
            .iter()
            .map(|p| {
                let s = p.status();
                (s.active + s.waiting).min(s.max_size)
            })
            .sum()
    }

    /// The control loop; runs for the life of the process.
    pub async fn run(self: Arc<Self>) {
        // Fifty sidecars started together do not all ask at once.
        let first = rand::thread_rng().gen_range(0..500u64);
        crate::timer::sleep(Duration::from_millis(first)).await;
        let mut control = Control {
            fleet: self.clone(),
            allowed: 0,
            held: Vec::new(),
            unlocking: Vec::new(),
            short: false,
            owed: 0,
            plan: FleetPlan::new(self.settings),
        };
        let mut backoff = RECONNECT_MIN;
        loop {
            // Connect as at start, with no permit in use: the control connection is one more
            // backend, and the min share used without locks must not be in use beside it.
            control.give_back_unlocked().await;
            match control.connect().await {
                Some(conn) => {
                    backoff = RECONNECT_MIN;
                    control.serve(conn).await;
                    tracing::warn!(database = %self.status().database,
                        "fleet control connection lost; down to fleet_min_share until it is back");
                }
                None => {
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
            // Slots went with the session: back to the minimum share, unlocked.
            control.held.clear();
            control.unlocking.clear();
            control.short = false;
            control.set_allowed(self.settings.min_share);
            control.publish(false, None);
            let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
            let until = Instant::now() + wait;
            // Keep paying the shrink debt while waiting to reconnect.
            while Instant::now() < until {
                control.settle_claims();
                control.unlocking.clear();
                control.set_allowed(self.settings.min_share);
                control.publish_debt();
                crate::timer::sleep(Duration::from_millis(100).min(wait)).await;
            }
        }
    }
}

/// The control loop's own state.
struct Control {
    fleet: Arc<Fleet>,
    /// Permits granted to the semaphore (in use by servers or not), minus those forgotten.
    allowed: usize,
    /// Slot numbers locked on the control connection.
    held: Vec<i32>,
    /// Slots whose permits were forgotten (their servers closed) at the last tick, unlocked
    /// at the next: a closed server's backend takes a moment to exit, and until it has, the
    /// slot is still in use as far as the database is concerned.
    unlocking: Vec<i32>,
    /// Holding the shared `SHORT_KEY` lock: below the minimum share.
    short: bool,
    /// Permits wanted back this tick that no idle server could give.
    owed: usize,
    plan: FleetPlan,
}

impl Control {
    async fn connect(&mut self) -> Option<ServerConn> {
        let pool = self.fleet.pools().into_iter().next()?;
        match crate::timer::timeout(Duration::from_secs(30), pool.open_control()).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::warn!(database = %pool.database, error = %e, "fleet control connection failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn query(conn: &mut ServerConn, sql: &str) -> Option<String> {
        match crate::timer::timeout(CONTROL_QUERY_TIMEOUT, conn.query_first_row(sql)).await {
            Ok(Ok(row)) => Some(row.into_iter().next().flatten().unwrap_or_default()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "fleet control query failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Runs on one control connection until it fails.
    async fn serve(&mut self, mut conn: ServerConn) {
        let key = self.fleet.key;
        let budget = self.fleet.settings.budget;
        let mut total = None;
        let mut others_short = false;
        let mut total_at = Instant::now() - TOTAL_EVERY;
        loop {
            if !self.unlocking.is_empty() {
                let list = self
                    .unlocking
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let sql = format!(
                    "SELECT count(*) FROM unnest('{{{list}}}'::int[]) s \
                     WHERE pg_advisory_unlock({key}, s)"
                );
                if Self::query(&mut conn, &sql).await.is_none() {
                    conn.terminate();
                    return;
                }
                tracing::debug!(
                    released = self.unlocking.len(),
                    held = self.held.len(),
                    "fleet slots released"
                );
                self.unlocking.clear();
            }
            self.settle_claims();
            let now = Instant::now();
            match self
                .plan
                .step(now, self.held.len(), self.fleet.need(), others_short)
            {
                Step::Take(n) => {
                    let offset = rand::thread_rng().gen_range(0..budget.max(1));
                    let held = self
                        .held
                        .iter()
                        .map(i32::to_string)
                        .collect::<Vec<_>>()
                        .join(",");
                    // A slot already held would lock again (locks nest): the CASE keeps the
                    // order of the tests, so a held slot is never asked for.
                    let sql = format!(
                        "SELECT coalesce(string_agg(s::text, ','), '') FROM (\
                           SELECT s FROM (SELECT ((g + {offset}) % {budget})::int AS s \
                                          FROM generate_series(0, {budget} - 1) g) slots \
                           WHERE CASE WHEN s = ANY('{{{held}}}'::int[]) THEN false \
                                      ELSE pg_try_advisory_lock({key}, s) END \
                           LIMIT {n}) taken"
                    );
                    let Some(got) = Self::query(&mut conn, &sql).await else {
                        conn.terminate();
                        return;
                    };
                    let got: Vec<i32> = got.split(',').filter_map(|s| s.parse().ok()).collect();
                    self.held.extend(&got);
                    if !got.is_empty() {
                        tracing::debug!(
                            taken = got.len(),
                            held = self.held.len(),
                            "fleet slots taken"
                        );
                    }
                }
                Step::Release(n) => {
                    // Permits first: only a slot no server uses may be given back; its lock
                    // goes at the next tick (see `unlocking`).
                    let freed = self.forget(n);
                    let slots = (0..freed).filter_map(|_| self.held.pop());
                    self.unlocking.extend(slots);
                }
                Step::Hold => {}
            }
            // Grow or shrink the semaphore to the slots held.
            self.set_allowed(self.held.len());
            self.publish_debt();
            // Say so while under the minimum share, so that others make room.
            let short = self.held.len() < self.fleet.settings.min_share;
            if short != self.short {
                let f = if short {
                    "pg_try_advisory_lock_shared"
                } else {
                    "pg_advisory_unlock_shared"
                };
                let sql = format!("SELECT {f}({key}, {SHORT_KEY})::text");
                if Self::query(&mut conn, &sql).await.is_none() {
                    conn.terminate();
                    return;
                }
                self.short = short;
            }
            if now.saturating_duration_since(total_at) >= TOTAL_EVERY {
                let sql = format!(
                    "SELECT (count(*) FILTER (WHERE objid::bigint < {budget}))::text || ',' || \
                            (count(*) FILTER (WHERE objid::bigint = {SHORT_KEY} \
                                              AND pid <> pg_backend_pid()))::text \
                     FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND classid::bigint = {key} AND objsubid = 2"
                );
                let Some(row) = Self::query(&mut conn, &sql).await else {
                    conn.terminate();
                    return;
                };
                let mut parts = row.split(',').map(|n| n.parse::<usize>().ok());
                total = parts.next().flatten();
                others_short = parts.next().flatten().is_some_and(|n| n > 0);
                total_at = now;
            }
            self.publish(true, total);
            // Jittered ticks: 100–200 ms.
            let tick = rand::thread_rng().gen_range(100..200u64);
            if !Self::idle_for(&mut conn, Duration::from_millis(tick)).await {
                conn.terminate();
                return;
            }
        }
    }

    /// Waits out a tick watching the idle control connection. False if it closed: the slots'
    /// locks went with the session at that moment (a server shutting down sends FATAL and
    /// closes), so their permits must go now, not at the next query, before the pools open
    /// servers with them once the database is back.
    async fn idle_for(conn: &mut ServerConn, tick: Duration) -> bool {
        let until = Instant::now() + tick;
        loop {
            tokio::select! {
                () = crate::timer::sleep_until(until) => return true,
                // What arrives stays in the buffer for the next query to read; a FATAL is
                // followed by the close, which ends the wait.
                read = conn.read() => if read.is_err() {
                    return false;
                },
            }
        }
    }

    /// Takes every permit out of use before a (re)connect: unused ones and idle servers at
    /// once, busy servers as they come back, for at most [`GIVE_BACK_WAIT`] (past it, a
    /// server in a long transaction is the fleet's overshoot until its first tick).
    async fn give_back_unlocked(&mut self) {
        let until = Instant::now() + GIVE_BACK_WAIT;
        loop {
            self.settle_claims();
            self.set_allowed(0);
            self.publish_debt();
            if self.allowed == 0 || Instant::now() >= until {
                return;
            }
            crate::timer::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets the permits the pools may use: more at once; fewer as soon as permits are free
    /// (idle servers are closed for them; a server in use keeps its permit until it is back).
    /// Called every tick, so a shrink that could not finish goes on.
    fn set_allowed(&mut self, target: usize) {
        if target > self.allowed {
            self.fleet.semaphore.add_permits(target - self.allowed);
            self.allowed = target;
        } else if target < self.allowed {
            self.forget(self.allowed - target);
        }
    }

    /// Takes up to `n` permits out of use for good: unused ones first, then by closing as
    /// many idle servers (their permits come back as they drop). Returns how many.
    fn forget(&mut self, n: usize) -> usize {
        let mut done = self.take_free(n);
        if done < n {
            for pool in self.fleet.pools() {
                let closed = pool.close_idle_for_fleet(n - done);
                done += self.take_free(closed.min(n - done));
                if done == n {
                    break;
                }
            }
        }
        self.allowed -= done;
        // The rest come back as busy servers are reused (`Fleet::claim_slot`).
        self.owed += n - done;
        done
    }

    /// Starts a tick: counts the permits servers gave back since the last one (their slots'
    /// locks go at the next tick, like any released slot) and forgets what was owed; the tick
    /// works out what it still wants back.
    fn settle_claims(&mut self) {
        let claimed = self.fleet.claimed.swap(0, Ordering::SeqCst);
        self.allowed = self.allowed.saturating_sub(claimed);
        let slots: Vec<i32> = (0..claimed).filter_map(|_| self.held.pop()).collect();
        self.unlocking.extend(slots);
        self.owed = 0;
    }

    /// Ends a tick: what the servers should give back from now on.
    fn publish_debt(&self) {
        self.fleet.debt.store(self.owed, Ordering::SeqCst);
    }

    fn take_free(&self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            match self.fleet.semaphore.try_acquire() {
                Ok(p) => {
                    p.forget();
                    done += 1;
                }
                Err(_) => break,
            }
        }
        done
    }

    fn publish(&self, connected: bool, fleet_total: Option<usize>) {
        let need = self.fleet.need();
        let mut s = lock(&self.fleet.status);
        s.held = self.held.len();
        s.wanted = self.plan.wanted(need);
        s.allowed = self.allowed;
        s.fleet_total = fleet_total;
        s.connected = connected;
    }
}

/// Statuses of several fleets, for readers.
pub fn statuses(fleets: &HashMap<String, Arc<Fleet>>) -> Vec<FleetStatus> {
    let mut all: Vec<_> = fleets.values().map(|f| f.status()).collect();
    all.sort_by(|a, b| a.database.cmp(&b.database));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(budget: usize, min_share: usize, delay_ms: u64) -> FleetPlan {
        FleetPlan::new(FleetSettings {
            budget,
            min_share,
            release_delay: Duration::from_millis(delay_ms),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_taken_at_once_in_bounded_steps_up_to_the_budget() {
        let mut p = plan(12, 2, 1000);
        let now = Instant::now();
        // The minimum share even with no clients.
        assert_eq!(p.step(now, 0, 0, false), Step::Take(2));
        assert_eq!(p.step(now, 2, 0, false), Step::Hold);
        // Ten waiting: four at a time.
        assert_eq!(p.step(now, 2, 10, false), Step::Take(4));
        assert_eq!(p.step(now, 6, 10, false), Step::Take(4));
        assert_eq!(p.step(now, 10, 10, false), Step::Hold);
        // Never more than the budget.
        assert_eq!(p.step(now, 10, 50, false), Step::Take(2));
        assert_eq!(p.step(now, 12, 50, false), Step::Hold);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_unused_for_the_release_delay_go_back_down_to_the_peak_need_and_the_min_share() {
        let mut p = plan(12, 2, 1000);
        let t0 = Instant::now();
        assert_eq!(p.step(t0, 10, 0, false), Step::Hold);
        // Not before the delay...
        assert_eq!(
            p.step(t0 + Duration::from_millis(500), 10, 5, false),
            Step::Hold
        );
        assert_eq!(
            p.step(t0 + Duration::from_millis(999), 10, 1, false),
            Step::Hold
        );
        // ...then down to the most wanted meanwhile (5), not to the need now (1).
        assert_eq!(
            p.step(t0 + Duration::from_millis(1000), 10, 1, false),
            Step::Release(5)
        );
        // The next release waits a full delay again, and stops at the min share.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(p.step(t1, 5, 0, false), Step::Hold);
        assert_eq!(
            p.step(t1 + Duration::from_millis(1000), 5, 0, false),
            Step::Release(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn demand_returning_during_the_delay_cancels_the_release() {
        let mut p = plan(12, 1, 1000);
        let t0 = Instant::now();
        assert_eq!(p.step(t0, 8, 2, false), Step::Hold);
        assert_eq!(
            p.step(t0 + Duration::from_millis(600), 8, 8, false),
            Step::Hold
        );
        // The surplus clock starts again from here.
        assert_eq!(
            p.step(t0 + Duration::from_millis(700), 8, 2, false),
            Step::Hold
        );
        assert_eq!(
            p.step(t0 + Duration::from_millis(1600), 8, 2, false),
            Step::Hold
        );
        assert_eq!(
            p.step(t0 + Duration::from_millis(1700), 8, 2, false),
            Step::Release(6)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_over_its_share_gives_back_a_slot_a_tick_while_another_is_short() {
        let mut p = plan(12, 2, 60_000);
        let now = Instant::now();
        // Busy (need 10) but another process is short: one slot a tick, down to the share.
        assert_eq!(p.step(now, 10, 10, true), Step::Release(1));
        assert_eq!(p.step(now, 3, 10, true), Step::Release(1));
        assert_eq!(p.step(now, 2, 10, true), Step::Hold);
        // Not growing meanwhile; a process under its own share still takes it.
        assert_eq!(p.step(now, 1, 10, true), Step::Take(1));
        // Once nobody is short, it grows again.
        assert_eq!(p.step(now, 2, 10, false), Step::Take(4));
    }

    #[test]
    fn the_key_is_stable_positive_and_differs_by_database() {
        assert_eq!(fleet_key("app"), fleet_key("app"));
        assert_ne!(fleet_key("app"), fleet_key("app2"));
        assert!(fleet_key("app") >= 0);
        // Pinned: a change would split a fleet running two versions during a rollout.
        assert_eq!(fleet_key("app"), 1_882_262_282);
    }
}
