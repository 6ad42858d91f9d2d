//! The reshard job: one control-plane task that drives a `JobState` through its phases
//! against the servers, persisting the state after every phase so a restarted proxy
//! resumes where it was. Phases are idempotent (they check before they create), which
//! is what makes resuming safe.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::plan::quote_name;
use super::server::{self, Node, ServerError};
use super::{JobState, Phase, Status};
use crate::config::Config;
use crate::control::monitor::MonitorNode;
use crate::frontend::Frontend;
use crate::shard_map::ShardMap;

/// How often the copy phase looks at progress.
const POLL: Duration = Duration::from_millis(100);
/// How often the copy logs its progress.
const PROGRESS_LOG: Duration = Duration::from_secs(5);
/// A failed step is retried this often before the job fails.
const STEP_RETRIES: u32 = 20;
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Publishes a routing topology built from a map, with per-shard read floors (WAL
/// positions a replica must have replayed before it serves reads of that shard).
pub trait Publish: Send + Sync {
    fn publish(&self, map: &ShardMap, floors: &BTreeMap<String, u64>);
}

pub struct JobContext {
    pub fe: Arc<Frontend>,
    pub config: Config,
    pub publisher: Arc<dyn Publish>,
}

enum Stop {
    Cancelled,
    Failed(String),
}

impl From<ServerError> for Stop {
    fn from(e: ServerError) -> Stop {
        Stop::Failed(e.to_string())
    }
}

/// Starts (or resumes) a job in the background.
pub fn spawn(ctx: JobContext, state: JobState) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = watch::channel(false);
    ctx.fe.reshard.set_cancel(Some(tx));
    if !state.switched {
        let targets: Vec<String> = state.plan.pairs().into_iter().map(|p| p.1).collect();
        ctx.fe.reshard.gate.arm(&state.plan.sources(), &targets);
    }
    let pairs = state.plan.pairs();
    ctx.fe.reshard.set_status(Status {
        job: state.id,
        phase: state.phase.as_str().into(),
        sources: join(pairs.iter().map(|p| p.0.as_str())),
        targets: join(pairs.iter().map(|p| p.1.as_str())),
        started_at: state.started_at,
        ..Status::default()
    });
    let fe = ctx.fe.clone();
    let maps = Maps::parse(&state, &ctx.config.shard_map);
    let task = tokio::spawn(async move {
        let mut job = Job {
            ctx,
            state,
            cancel: rx,
            snapshots: BTreeMap::new(),
            armed_at: BTreeMap::new(),
            maps,
        };
        job.run().await;
    });
    fe.reshard.set_task(task.abort_handle());
    task
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = names.collect();
    v.sort();
    v.dedup();
    v.join(",")
}

/// One (source, target) pair at the cutover: object name, shard names, control
/// connections, and the sequences to carry over.
type Link = (String, String, String, Node, Node, Vec<String>);

/// The maps a job moves between, and the one routing follows until its cutover.
struct Maps {
    old: ShardMap,
    new: ShardMap,
    interim: ShardMap,
}

impl Maps {
    fn parse(state: &JobState, source: &std::path::Path) -> Result<Maps, String> {
        let parse = |text: &str| ShardMap::from_yaml_str(text, source).map_err(|e| e.to_string());
        let (old, new) = (parse(&state.old_map)?, parse(&state.new_map)?);
        let interim = super::plan::interim_map(&old, &new);
        Ok(Maps { old, new, interim })
    }
}

struct Job {
    ctx: JobContext,
    state: JobState,
    cancel: watch::Receiver<bool>,
    /// Per target, a transaction whose snapshot was taken at the cutover (verify
    /// compares the moved rows as they were then).
    snapshots: BTreeMap<String, Node>,
    /// Per source, the server's clock when the gate was armed: transactions older
    /// than that carry no ticket and are waited for through `pg_stat_activity`.
    armed_at: BTreeMap<String, String>,
    /// The job's maps, parsed once from its state.
    maps: Result<Maps, String>,
}

impl Job {
    async fn run(&mut self) {
        tracing::info!(
            job = self.state.id,
            phase = self.state.phase.as_str(),
            "reshard job running"
        );
        while !self.state.phase.is_final() {
            let phase = self.state.phase;
            self.ctx
                .fe
                .reshard
                .update(|s| s.phase = phase.as_str().into());
            match self.step_with_retries(phase).await {
                Ok(next) => {
                    tracing::info!(
                        job = self.state.id,
                        from = phase.as_str(),
                        to = next.as_str(),
                        "reshard phase done"
                    );
                    self.state.phase = next;
                    self.persist();
                }
                Err(Stop::Cancelled) => {
                    self.undo().await;
                }
                Err(Stop::Failed(message)) if !self.state.switched => {
                    // Never switch without the data: give up cleanly, on the old map.
                    tracing::error!(job = self.state.id, phase = phase.as_str(), %message, "reshard job gave up; undoing it");
                    self.undo().await;
                    if self.state.phase == Phase::Cancelled {
                        self.state.error =
                            Some(format!("gave up in {}: {message}", phase.as_str()));
                    }
                }
                Err(Stop::Failed(message)) => {
                    tracing::error!(job = self.state.id, phase = phase.as_str(), %message, "reshard job failed");
                    self.state.error = Some(format!("{}: {message}", phase.as_str()));
                    self.state.phase = Phase::Failed;
                    self.persist();
                }
            }
        }
        let (phase, error) = (self.state.phase, self.state.error.clone());
        self.ctx.fe.reshard.update(|s| {
            s.phase = phase.as_str().into();
            s.error = error;
        });
        self.ctx.fe.reshard.gate.disarm();
        self.ctx.fe.reshard.set_cancel(None);
        if phase != Phase::Failed {
            super::remove_state(&super::state_path(&self.ctx.config));
        }
        tracing::info!(
            job = self.state.id,
            phase = phase.as_str(),
            "reshard job ended"
        );
    }

    async fn step_with_retries(&mut self, phase: Phase) -> Result<Phase, Stop> {
        let mut attempt = 0;
        loop {
            self.check_cancel()?;
            let result = match phase {
                Phase::Schema => self.schema().await,
                Phase::Copy => self.copy().await,
                Phase::Cutover => self.cutover().await,
                Phase::Verify => self.verify().await,
                Phase::Cleanup => self.cleanup().await,
                done => return Ok(done),
            };
            match result {
                Err(Stop::Failed(message)) if attempt < STEP_RETRIES && phase != Phase::Verify => {
                    attempt += 1;
                    tracing::warn!(job = self.state.id, phase = phase.as_str(), attempt, %message, "reshard step failed; retrying");
                    self.ctx.fe.reshard.update(|s| s.error = Some(message));
                    self.sleep(RETRY_DELAY).await?;
                }
                other => return other,
            }
        }
    }

    fn check_cancel(&self) -> Result<(), Stop> {
        if *self.cancel.borrow() && !self.state.switched {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Sleeps, or stops early on a cancel.
    async fn sleep(&mut self, d: Duration) -> Result<(), Stop> {
        let _ = tokio::time::timeout(d, self.cancel.wait_for(|c| *c)).await;
        self.check_cancel()
    }

    fn persist(&self) {
        let path = super::state_path(&self.ctx.config);
        if let Err(error) = super::save_state(&path, &self.state) {
            tracing::error!(%error, "cannot persist the reshard job state");
        }
    }

    fn maps(&self) -> Result<&Maps, Stop> {
        self.maps.as_ref().map_err(|e| Stop::Failed(e.clone()))
    }

    /// The primary of `shard` as a control connection target.
    fn primary(&self, shard: &str) -> Result<MonitorNode, Stop> {
        let map = &self.maps()?.interim;
        let spec = map
            .shards
            .get(shard)
            .ok_or_else(|| Stop::Failed(format!("shard {shard} is in neither map")))?;
        crate::app::monitor_nodes(&self.ctx.config, map, spec)
            .into_iter()
            .next()
            .ok_or_else(|| Stop::Failed(format!("shard {shard} has no primary")))
    }

    async fn connect(&self, shard: &str) -> Result<Node, Stop> {
        let spec = self.primary(shard)?;
        Ok(server::connect(&spec, self.ctx.config.pool.connect_timeout).await?)
    }

    /// Phase 1: the moved tables on each target, from the source's `pg_dump`.
    async fn schema(&mut self) -> Result<Phase, Stop> {
        for (source, target) in self.state.plan.pairs() {
            let tables: Vec<String> = self
                .state
                .plan
                .filters(&source, &target)
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            let tgt = self.connect(&target).await?;
            let mut missing = Vec::new();
            for table in &tables {
                let sql = format!("SELECT to_regclass({}) IS NULL", literal(table));
                if tgt.scalar(&sql).await?.as_deref() == Some("t") {
                    missing.push(table.clone());
                }
            }
            if missing.is_empty() {
                continue;
            }
            tracing::info!(job = self.state.id, %target, tables = ?missing, "creating moved tables on the target");
            let ddl = server::dump_schema(&self.primary(&source)?, &missing).await?;
            tgt.exec(&ddl).await?;
            self.state
                .created
                .entry(target.clone())
                .or_default()
                .extend(missing);
            self.persist();
        }
        Ok(Phase::Copy)
    }

    /// Phase 2: publication (with the membership row filter) on the source, a
    /// subscription with `copy_data` on the target; done when every table is synced
    /// and a fence row reaches the target within `reshard.catch_up` (the lag, measured
    /// as time: replication slot positions move only with the subscriber's feedback).
    async fn copy(&mut self) -> Result<Phase, Stop> {
        let pairs = self.state.plan.pairs();
        let mut links = Vec::new();
        let mut estimate = (0u64, 0u64);
        for (i, (source, target)) in pairs.iter().enumerate() {
            let name = self.state.object_name(i);
            let src = self.connect(source).await?;
            let tgt = self.connect(target).await?;
            let filters = self.state.plan.filters(source, target);
            let fence = format!("public.{name}");
            let create = format!("CREATE TABLE IF NOT EXISTS {fence} (n int8 PRIMARY KEY)");
            src.exec(&create).await?;
            tgt.exec(&create).await?;
            self.ensure_identity(&src, source, &filters).await?;
            let exists = format!("SELECT count(*) FROM pg_publication WHERE pubname = '{name}'");
            if src.int(&exists).await? == 0 {
                let mut items: Vec<String> = filters
                    .iter()
                    .map(|(t, f)| format!("{} WHERE ({f})", quote_name(t)))
                    .collect();
                items.push(fence.clone());
                src.exec(&format!(
                    "CREATE PUBLICATION {name} FOR TABLE {}",
                    items.join(", ")
                ))
                .await?;
            }
            // Inserts the target had before (its own rows): not part of the copy.
            let baseline = copied_rows(&tgt, &filters).await?;
            let exists = format!("SELECT count(*) FROM pg_subscription WHERE subname = '{name}'");
            if tgt.int(&exists).await? == 0 {
                let sql = format!(
                    "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name} WITH (copy_data = true)",
                    literal(&src.conninfo())
                );
                tgt.exec(&sql).await?;
            }
            for (table, filter) in &filters {
                // Fresh statistics make the estimate (and `shardgate plan`'s) worth reading.
                src.exec(&format!("ANALYZE {}", quote_name(table))).await?;
                let share = self.state.plan.hash_share(source, target, table);
                let (rows, bytes) = estimate_rows(&src, table, filter, share).await?;
                estimate.0 += rows;
                estimate.1 += bytes;
            }
            links.push((name, src, tgt, filters, baseline));
        }
        let started = Instant::now();
        self.ctx.fe.reshard.update(|s| {
            s.rows_estimate = estimate.0;
            s.bytes_estimate = estimate.1;
        });
        let mut logged = Instant::now();
        loop {
            self.check_cancel()?;
            let mut ready = true;
            let (mut rows, mut lag) = (0u64, 0u64);
            for (name, src, tgt, filters, baseline) in &links {
                let pending = format!(
                    "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                     WHERE s.subname = '{name}' AND r.srsubstate <> 'r'"
                );
                ready &= tgt.int(&pending).await? == 0;
                rows += copied_rows(tgt, filters).await?.saturating_sub(*baseline);
                let slot = format!(
                    "SELECT coalesce((pg_current_wal_lsn() - confirmed_flush_lsn)::int8, 0) \
                     FROM pg_replication_slots WHERE slot_name = '{name}'"
                );
                lag += src.int(&slot).await?.max(0) as u64;
            }
            let secs = started.elapsed().as_secs_f64().max(0.001);
            self.ctx.fe.reshard.update(|s| {
                s.rows_copied = rows;
                s.rate = rows as f64 / secs;
                s.lag_bytes = Some(lag);
                s.bytes_copied = (s.bytes_estimate * rows.min(s.rows_estimate))
                    .checked_div(s.rows_estimate)
                    .unwrap_or(0);
                s.eta_seconds = (s.rate > 0.0)
                    .then(|| (s.rows_estimate.saturating_sub(rows) as f64 / s.rate) as u64);
            });
            if logged.elapsed() >= PROGRESS_LOG {
                logged = Instant::now();
                tracing::info!(
                    job = self.state.id,
                    rows,
                    estimate = estimate.0,
                    lag_bytes = lag,
                    synced = ready,
                    "reshard copy progress"
                );
            }
            if ready {
                let mut caught_up = true;
                for (name, src, tgt, ..) in &links {
                    caught_up &= fence(src, tgt, name, self.ctx.config.reshard.catch_up).await?;
                }
                if caught_up {
                    return Ok(Phase::Cutover);
                }
            }
            self.sleep(POLL).await?;
        }
    }

    /// A publication row filter on a column outside the replica identity makes the
    /// source refuse UPDATE and DELETE: such tables get `REPLICA IDENTITY FULL` for the
    /// job (restored at clean-up).
    async fn ensure_identity(
        &mut self,
        src: &Node,
        source: &str,
        filters: &[(String, String)],
    ) -> Result<(), Stop> {
        for m in &self.state.plan.moves.clone() {
            for (table, column) in &m.tables {
                if !filters.iter().any(|(t, _)| t == table) {
                    continue;
                }
                let done = self
                    .state
                    .identities
                    .get(source)
                    .is_some_and(|v| v.iter().any(|(t, _)| t == table));
                if done {
                    continue;
                }
                let sql = format!(
                    "SELECT c.relreplident::text, \
                       (SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                        WHERE i.indrelid = c.oid AND a.attname = {col} \
                          AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END), \
                       (SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
                     FROM pg_class c WHERE c.oid = {tbl}::regclass",
                    col = literal(column),
                    tbl = literal(table)
                );
                let row = src.rows(&sql).await?.into_iter().next().unwrap_or_default();
                let ident = row.first().cloned().flatten().unwrap_or_default();
                let covered = row.get(1).cloned().flatten().unwrap_or_default() != "0";
                if ident == "f" || covered {
                    continue;
                }
                let restore = match ident.as_str() {
                    "n" => "NOTHING".to_owned(),
                    "i" => format!(
                        "USING INDEX {}",
                        row.get(2).cloned().flatten().unwrap_or_default()
                    ),
                    _ => "DEFAULT".to_owned(),
                };
                src.exec(&format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL",
                    quote_name(table)
                ))
                .await?;
                self.state
                    .identities
                    .entry(source.to_owned())
                    .or_default()
                    .push((table.clone(), restore));
                self.persist();
            }
        }
        Ok(())
    }

    /// Phase 3: hold new transactions on the sources, wait for the running ones, prove
    /// the targets have every change (a fence row), then switch routing. Any step past
    /// `reshard.max_pause` gives up this attempt: traffic resumes on the old map and
    /// the cutover is tried again later.
    async fn cutover(&mut self) -> Result<Phase, Stop> {
        let mut backoff = Duration::from_secs(1);
        loop {
            self.check_cancel()?;
            self.ctx.fe.reshard.update(|s| s.cutover_attempts += 1);
            match self.try_cutover().await {
                Ok(true) => return Ok(Phase::Verify),
                Ok(false) => {}
                Err(Stop::Failed(message)) => {
                    tracing::warn!(job = self.state.id, %message, "cutover attempt failed");
                    self.ctx.fe.reshard.update(|s| s.error = Some(message));
                }
                Err(stop) => return Err(stop),
            }
            self.sleep(backoff).await?;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn try_cutover(&mut self) -> Result<bool, Stop> {
        let pairs = self.state.plan.pairs();
        let mut links = Vec::new();
        for (i, (source, target)) in pairs.iter().enumerate() {
            let src = self.connect(source).await?;
            let tgt = self.connect(target).await?;
            let sequences = sequences(&src, &self.state.plan.filters(source, target)).await?;
            if !self.armed_at.contains_key(source) {
                let now = src.scalar("SELECT now()::text").await?.unwrap_or_default();
                self.armed_at.insert(source.clone(), now);
            }
            links.push((
                self.state.object_name(i),
                source.clone(),
                target.clone(),
                src,
                tgt,
                sequences,
            ));
        }
        let mut snapshots = BTreeMap::new();
        for (_, _, target, ..) in &links {
            if !snapshots.contains_key(target) {
                let node = self.connect(target).await?;
                node.exec(
                    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET extra_float_digits = 3",
                )
                .await?;
                snapshots.insert(target.clone(), node);
            }
        }
        let fe = self.ctx.fe.clone();
        let gate = &fe.reshard.gate;
        let budget = self.ctx.config.reshard.max_pause;
        let started = Instant::now();
        let deadline = started + budget;
        gate.close();
        let result = async {
            if !self.drained(&links, deadline).await? {
                return Ok::<_, Stop>(None);
            }
            for (name, _, _, src, tgt, _) in &links {
                let left = deadline.saturating_duration_since(Instant::now());
                if !fence(src, tgt, name, left).await? {
                    return Ok(None);
                }
            }
            for (_, _, _, src, tgt, seqs) in &links {
                sync_sequences(src, tgt, seqs).await?;
            }
            let mut floors = BTreeMap::new();
            for (target, node) in &snapshots {
                node.exec("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
                    .await?;
                floors.insert(target.clone(), node.lsn().await?);
            }
            for (name, _, _, _, tgt, _) in &links {
                tgt.exec(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
                    .await?;
            }
            Ok(Some(floors))
        }
        .await;
        let floors = match result {
            Ok(Some(floors)) => floors,
            Ok(None) => {
                gate.open();
                tracing::warn!(job = self.state.id, ?budget, "cutover: the targets did not catch up within reshard.max_pause; resumed on the old map, retrying later");
                return Ok(false);
            }
            Err(stop) => {
                gate.open();
                return Err(stop);
            }
        };
        // Persist before publishing: a restart from here on routes by the new map.
        self.state.switched = true;
        self.state.cutover_lsn = floors.clone();
        self.state.phase = Phase::Verify;
        self.persist();
        let new = &self.maps()?.new;
        self.ctx.publisher.publish(new, &floors);
        let version = new.version;
        gate.open();
        gate.disarm();
        let paused = started.elapsed();
        self.snapshots = snapshots;
        self.ctx
            .fe
            .reshard
            .update(|s| s.pause_ms = Some(paused.as_millis() as u64));
        tracing::info!(
            job = self.state.id,
            version,
            pause_ms = paused.as_millis() as u64,
            "reshard cutover: routing follows the new map"
        );
        Ok(true)
    }

    /// Waits until no transaction runs on a source: none that carries a ticket, and
    /// none older than the gate (those started before the job and carry none).
    async fn drained(&self, links: &[Link], deadline: Instant) -> Result<bool, Stop> {
        loop {
            let mut busy = self.ctx.fe.reshard.gate.inflight() > 0;
            if !busy {
                for (_, source, _, src, ..) in links {
                    let armed = self.armed_at.get(source).cloned().unwrap_or_default();
                    let sql = format!(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                         AND xact_start < {}::timestamptz AND state <> 'idle'",
                        literal(&armed)
                    );
                    busy |= src.int(&sql).await? > 0;
                }
            }
            if !busy {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Phase 4: row counts and checksums of the moved rows, source against the
    /// target's snapshot from the cutover.
    async fn verify(&mut self) -> Result<Phase, Stop> {
        let mut report = Vec::new();
        let mut mismatch = Vec::new();
        for (source, target) in self.state.plan.pairs() {
            let src = self.connect(&source).await?;
            src.exec("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET extra_float_digits = 3")
                .await?;
            let Some(tgt) = self.snapshots.get(&target) else {
                report.push(format!("{source}->{target}: skipped (the proxy restarted after the cutover; the cutover snapshot is gone)"));
                continue;
            };
            for (table, filter) in self.state.plan.filters(&source, &target) {
                let cols = src
                    .scalar(&format!(
                        "SELECT string_agg(quote_ident(attname), ',' ORDER BY attnum) FROM pg_attribute \
                         WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped",
                        literal(&table)
                    ))
                    .await?
                    .unwrap_or_default();
                let sql = format!(
                    "SELECT count(*)::text || '/' || coalesce(sum(hashtext(ROW({cols})::text)::int8), 0)::text \
                     FROM {} WHERE {filter}",
                    quote_name(&table)
                );
                let a = src.scalar(&sql).await?.unwrap_or_default();
                let b = tgt.scalar(&sql).await?.unwrap_or_default();
                let rows = a.split('/').next().unwrap_or("0").to_owned();
                if a == b {
                    report.push(format!("{table} {source}->{target}: {rows} rows match"));
                } else {
                    mismatch.push(format!(
                        "{table} {source}->{target}: source {a}, target {b} (rows/checksum)"
                    ));
                }
            }
        }
        for (_, node) in std::mem::take(&mut self.snapshots) {
            let _ = node.exec("COMMIT").await;
        }
        if !mismatch.is_empty() {
            let text = format!("mismatch: {}", mismatch.join("; "));
            self.state.verify = Some(text.clone());
            self.ctx
                .fe
                .reshard
                .update(|s| s.verify = Some(text.clone()));
            return Err(Stop::Failed(format!(
                "{text}; clean-up not started: the source still has the rows"
            )));
        }
        let text = format!("ok: {}", report.join("; "));
        self.state.verify = Some(text.clone());
        self.ctx.fe.reshard.update(|s| s.verify = Some(text));
        Ok(Phase::Cleanup)
    }

    /// Phase 5: subscription (and its slot), publication, fence tables and replica
    /// identities go; then the moved rows leave the sources in batches.
    async fn cleanup(&mut self) -> Result<Phase, Stop> {
        self.drop_replication().await?;
        let batch = self.ctx.config.reshard.delete_batch;
        for (source, target) in self.state.plan.pairs() {
            let src = self.connect(&source).await?;
            let filters = self.state.plan.filters(&source, &target);
            delete_in_batches(&src, &filters, batch).await?;
        }
        Ok(Phase::Done)
    }

    /// Drops what the copy created on the servers (all `IF EXISTS`: safe to repeat).
    async fn drop_replication(&mut self) -> Result<(), Stop> {
        for (i, (source, target)) in self.state.plan.pairs().iter().enumerate() {
            let name = self.state.object_name(i);
            let src = self.connect(source).await?;
            let tgt = self.connect(target).await?;
            let exists = format!("SELECT count(*) FROM pg_subscription WHERE subname = '{name}'");
            if tgt.int(&exists).await? > 0 {
                tgt.exec(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
                    .await?;
                // Dropping the subscription drops its slot on the source too.
                tgt.exec(&format!("DROP SUBSCRIPTION {name}")).await?;
            }
            src.exec(&format!("DROP PUBLICATION IF EXISTS {name}"))
                .await?;
            src.exec(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name LIKE '{name}%' AND NOT active"
            ))
            .await?;
            src.exec(&format!("DROP TABLE IF EXISTS public.{name}"))
                .await?;
            tgt.exec(&format!("DROP TABLE IF EXISTS public.{name}"))
                .await?;
            if let Some(tables) = self.state.identities.get(source).cloned() {
                for (table, restore) in tables {
                    src.exec(&format!(
                        "ALTER TABLE {} REPLICA IDENTITY {restore}",
                        quote_name(&table)
                    ))
                    .await?;
                }
                self.state.identities.remove(source);
                self.persist();
            }
        }
        Ok(())
    }

    /// `RESHARD CANCEL` before the cutover: everything the job made goes, the targets
    /// lose the copied rows, routing and the map file go back to the old ownership.
    async fn undo(&mut self) {
        tracing::info!(job = self.state.id, "reshard job cancelled; undoing");
        self.ctx.fe.reshard.gate.disarm();
        let mut attempt = 0;
        let result = loop {
            let result = self.undo_servers().await;
            match result {
                Err(Stop::Failed(message)) if attempt < STEP_RETRIES => {
                    attempt += 1;
                    tracing::warn!(%message, attempt, "reshard cancel: retrying");
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                other => break other,
            }
        };
        if let Err(Stop::Failed(message)) = result {
            self.state.error = Some(format!("cancel: {message}"));
            self.state.phase = Phase::Failed;
            self.persist();
            return;
        }
        if let Ok(Maps { old, new, .. }) = self.maps() {
            let mut restored = old.clone();
            restored.version = new.version + 1;
            restored.source = self.ctx.config.shard_map.clone();
            self.ctx.publisher.publish(&restored, &BTreeMap::new());
            if let Err(error) = restored.write_file(&self.ctx.config.shard_map, new.version) {
                tracing::error!(%error, "reshard cancel: cannot write the old map back to the map file");
            }
        }
        self.state.phase = Phase::Cancelled;
    }

    async fn undo_servers(&mut self) -> Result<(), Stop> {
        self.drop_replication().await?;
        for (source, target) in self.state.plan.pairs() {
            let tgt = self.connect(&target).await?;
            let created = self.state.created.get(&target).cloned().unwrap_or_default();
            let filters = self.state.plan.filters(&source, &target);
            let copied: Vec<_> = filters
                .into_iter()
                .filter(|(t, _)| !created.contains(t))
                .collect();
            delete_in_batches(&tgt, &copied, self.ctx.config.reshard.delete_batch).await?;
        }
        for (target, tables) in self.state.created.clone() {
            let tgt = self.connect(&target).await?;
            let names: Vec<String> = tables.iter().map(|t| quote_name(t)).collect();
            tgt.exec(&format!(
                "DROP TABLE IF EXISTS {} CASCADE",
                names.join(", ")
            ))
            .await?;
            self.state.created.remove(&target);
            self.persist();
        }
        Ok(())
    }
}

/// Inserts a fence row on the source and waits until the target has applied it: the
/// target then has every change the source committed before it (logical replication
/// applies in commit order).
async fn fence(src: &Node, tgt: &Node, name: &str, within: Duration) -> Result<bool, Stop> {
    let marker: i64 = rand::random::<i64>() & i64::MAX;
    // Flushed at commit even where synchronous_commit is off: the WAL sender sends
    // only flushed WAL, and the cutover waits for this row.
    src.exec(&format!(
        "BEGIN; SET LOCAL synchronous_commit = local; \
         INSERT INTO public.{name} (n) VALUES ({marker}); COMMIT"
    ))
    .await?;
    let check = format!("SELECT count(*) FROM public.{name} WHERE n = {marker}");
    let deadline = Instant::now() + within;
    loop {
        if tgt.int(&check).await? > 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Rows the target has of the moved tables (inserted so far, including a COPY under way).
async fn copied_rows(tgt: &Node, filters: &[(String, String)]) -> Result<u64, Stop> {
    let oids: Vec<String> = filters
        .iter()
        .map(|(t, _)| format!("to_regclass({})", literal(t)))
        .collect();
    let sql = format!(
        "SELECT (SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relid IN ({0}))::int8 \
              + (SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy WHERE relid IN ({0}))::int8",
        oids.join(", ")
    );
    Ok(tgt.int(&sql).await?.max(0) as u64)
}

/// The planner's estimate of the moved rows of one table, and their bytes.
pub async fn estimate_rows(
    src: &Node,
    table: &str,
    filter: &str,
    hash_share: Option<f64>,
) -> Result<(u64, u64), ServerError> {
    if let Some(share) = hash_share {
        // The planner has no statistics for a hash expression: the table's row count
        // and average row size times the share of buckets.
        // A table never analysed has no row count (-1): counted instead.
        let sql = format!(
            "SELECT n, CASE WHEN n > 0 THEN pg_relation_size({t}::regclass) / n ELSE 0 END \
             FROM (SELECT CASE WHEN reltuples >= 0 THEN reltuples::int8 \
                   ELSE (SELECT count(*) FROM {name}) END AS n \
                   FROM pg_class WHERE oid = {t}::regclass) c",
            t = literal(table),
            name = quote_name(table)
        );
        let row = src.rows(&sql).await?.into_iter().next().unwrap_or_default();
        let num = |i: usize| -> f64 {
            row.get(i)
                .cloned()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let rows = (num(0) * share) as u64;
        return Ok((rows, rows * num(1) as u64));
    }
    let sql = format!(
        "EXPLAIN (FORMAT JSON) SELECT * FROM {} WHERE {filter}",
        quote_name(table)
    );
    let text = src.scalar(&sql).await?.unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let plan = &json[0]["Plan"];
    let rows = plan["Plan Rows"].as_f64().unwrap_or(0.0) as u64;
    let width = plan["Plan Width"].as_f64().unwrap_or(0.0) as u64;
    Ok((rows, rows * width))
}

/// Sequences owned by the moved tables (serial and identity columns).
async fn sequences(src: &Node, filters: &[(String, String)]) -> Result<Vec<String>, Stop> {
    let mut out = Vec::new();
    for (table, _) in filters {
        let sql = format!(
            "SELECT s FROM (SELECT pg_get_serial_sequence({t}, attname) AS s FROM pg_attribute \
             WHERE attrelid = {t}::regclass AND attnum > 0 AND NOT attisdropped) x WHERE s IS NOT NULL",
            t = literal(table)
        );
        for row in src.rows(&sql).await? {
            if let Some(Some(seq)) = row.into_iter().next() {
                out.push(seq);
            }
        }
    }
    Ok(out)
}

/// Sets each target sequence past the source's value (never backwards).
async fn sync_sequences(src: &Node, tgt: &Node, seqs: &[String]) -> Result<(), Stop> {
    for seq in seqs {
        let value = src.int(&format!("SELECT last_value FROM {seq}")).await?;
        tgt.exec(&format!(
            "SELECT setval({l}, greatest({value}, (SELECT last_value FROM {seq})))",
            l = literal(seq)
        ))
        .await?;
    }
    Ok(())
}

/// Deletes the rows matching each filter, `batch` rows per statement. Tables are
/// retried in later passes when a foreign key makes one wait for another.
async fn delete_in_batches(
    node: &Node,
    filters: &[(String, String)],
    batch: usize,
) -> Result<(), Stop> {
    let mut left: Vec<&(String, String)> = filters.iter().rev().collect();
    let mut passes = 0;
    while !left.is_empty() {
        passes += 1;
        let mut blocked = Vec::new();
        let mut last_error = None;
        for item @ (table, filter) in left {
            let sql = format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {filter} LIMIT {batch}))",
                t = quote_name(table)
            );
            loop {
                let deleted = node.client.execute(sql.as_str(), &[]).await;
                match deleted {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) =>
                    {
                        last_error = Some(format!("{table}: {e}"));
                        blocked.push(item);
                        break;
                    }
                    Err(e) => {
                        return Err(Stop::Failed(format!(
                            "{}: delete from {table}: {e}",
                            node.addr()
                        )))
                    }
                }
            }
        }
        if !blocked.is_empty() && (passes > filters.len() + 1) {
            return Err(Stop::Failed(last_error.unwrap_or_default()));
        }
        left = blocked;
    }
    Ok(())
}

fn literal(text: &str) -> String {
    crate::backend::params::quote_literal(text)
}
