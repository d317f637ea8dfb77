//! Versions on the serving side (issue 23): which build a call goes to (`hello`, `hello@3`,
//! `hello@prod`), the versions deployed beside a function's current build (on first call, or
//! when an alias names them), aliases in memory (the gateway reads them on every call), and
//! promotions that move an alias's traffic step by step.
//!
//! A version deployed beside the current build is known to the backend as `hello@3`
//! ([`deploy_name`]), a name no function can have: the local backend keeps a pool for it, the
//! Kubernetes backend a Deployment of its own. The current build is served under the function's
//! name as before, so a call without `@` costs one byte scan more than it did.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dispatch_core::versions::{
    AliasSpec, FunctionVersion, Promotion, Selector, Target, TrafficTarget, deploy_name,
    split_deploy_name,
};
use dispatch_core::{Kind, Object, Phase, RunStatus};
use parking_lot::{Mutex, RwLock};

use crate::controller::{Key, Planned, ReconcileError, Unplanned, plan, set_status, status};
use crate::invoke::CallError;
use crate::state::{AppState, Deployed, StateError};

/// The header whose value keeps a caller on one version of an alias (sticky traffic).
pub const AFFINITY_HEADER: &str = "x-dispatch-affinity";
/// The cookie that does the same for browsers.
pub const AFFINITY_COOKIE: &str = "dispatch-affinity";

/// The caller's affinity key: the `X-Dispatch-Affinity` header, else the `dispatch-affinity`
/// cookie. Read only for calls to an alias.
pub fn affinity_of(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(AFFINITY_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == AFFINITY_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Why a call cannot go to the version it names.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(
        "function {function:?} has no version {version}: `dispatch get versions {function}` lists the ones kept"
    )]
    NoVersion { function: String, version: u32 },
    #[error(
        "function {function:?} has no alias {alias:?}: create it (dispatch create alias {function} {alias} --version N)"
    )]
    NoAlias { function: String, alias: String },
    #[error("version {version} of function {function:?} cannot be served: {reason}")]
    Unavailable {
        function: String,
        version: u32,
        reason: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<ReconcileError> for VersionError {
    fn from(e: ReconcileError) -> Self {
        match e {
            ReconcileError::State(s) => VersionError::State(s),
            ReconcileError::Invalid(v) => {
                VersionError::State(StateError::internal("reading a version's settings", v))
            }
        }
    }
}

type Aliases = HashMap<String, HashMap<String, Arc<AliasSpec>>>;
/// (namespace, name): an alias's stored name, or a version's deploy name.
type NsName = (String, String);
type Running = (Promotion, tokio::task::JoinHandle<()>);

/// What the server keeps in memory of versions and aliases.
#[derive(Default)]
pub struct Versions {
    /// Namespace → stored alias name (`hello.prod`) → its spec.
    aliases: RwLock<Aliases>,
    /// One deploy at a time of each version (namespace, `hello@3`).
    deploying: Mutex<HashMap<NsName, Arc<tokio::sync::Mutex<()>>>>,
    /// Promotions under way: (namespace, alias) → the promotion and its task.
    promotions: Mutex<HashMap<NsName, Running>>,
}

impl Versions {
    pub fn alias(&self, ns: &str, function: &str, alias: &str) -> Option<Arc<AliasSpec>> {
        let name = dispatch_core::versions::alias_object_name(function, alias);
        self.aliases.read().get(ns)?.get(&name).cloned()
    }

    fn set_alias(&self, ns: &str, name: &str, spec: Option<AliasSpec>) {
        let mut all = self.aliases.write();
        match spec {
            Some(s) => {
                all.entry(ns.to_string())
                    .or_default()
                    .insert(name.to_string(), Arc::new(s));
            }
            None => {
                if let Some(m) = all.get_mut(ns) {
                    m.remove(name);
                }
            }
        }
    }
}

/// The point in `0..100` a call lands on: the affinity key's hash (the same key, the same
/// version while the weights stay), else a random one.
fn point(alias: &str, affinity: Option<&str>) -> u32 {
    match affinity.filter(|k| !k.is_empty()) {
        Some(key) => {
            // FNV-1a: stable across servers and restarts (a sticky key must land on the same
            // version on every server), and keyed by the alias so that one key is not on the
            // "new" side of every alias at once.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in alias.bytes().chain([0]).chain(key.bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            (h % 100) as u32
        }
        None => fastrand::u32(0..100),
    }
}

/// The version an alias sends this call to. The alias is read from memory; one not there yet
/// (just after a start, before the controller reached it) is read from the store.
pub async fn pick(
    state: &AppState,
    ns: &str,
    function: &str,
    alias: &str,
    affinity: Option<&str>,
) -> Result<u32, VersionError> {
    let name = dispatch_core::versions::alias_object_name(function, alias);
    let no_alias = || VersionError::NoAlias {
        function: function.to_string(),
        alias: alias.to_string(),
    };
    let spec = match state.versions.alias(ns, function, alias) {
        Some(s) => s,
        None => {
            let stored = state
                .get(ns, Kind::Alias, &name)
                .await?
                .ok_or_else(no_alias)?;
            let spec: AliasSpec = stored.typed_spec().map_err(|_| no_alias())?;
            Arc::new(spec)
        }
    };
    spec.pick(point(&name, affinity)).ok_or_else(no_alias)
}

/// The version a target names now: `None` for the current build, else its number (an alias
/// picks one by weight, sticky with an affinity key).
pub async fn version_of(
    state: &AppState,
    ns: &str,
    target: &Target,
    affinity: Option<&str>,
) -> Result<Option<u32>, VersionError> {
    match &target.selector {
        Selector::Latest => Ok(None),
        Selector::Version(n) => Ok(Some(*n)),
        Selector::Alias(a) => pick(state, ns, &target.function, a, affinity)
            .await
            .map(Some),
    }
}

/// The build that serves a call to `target` (`hello`, `hello@3`, `hello@prod`): the function's
/// current build, or a version deployed beside it (deployed now if it is not yet).
pub async fn resolve(
    state: &AppState,
    ns: &str,
    target: &str,
    affinity: Option<&str>,
) -> Result<(Arc<Deployed>, String), CallError> {
    if !target.contains('@') {
        return match state.deployed(ns, target) {
            Some(d) => Ok((d, target.to_string())),
            None => Err(crate::invoke::not_ready(state, ns, target).await),
        };
    }
    let t = Target::parse(target).map_err(CallError::Invalid)?;
    match version_of(state, ns, &t, affinity).await? {
        None => match state.deployed(ns, &t.function) {
            Some(d) => Ok((d, t.function)),
            None => Err(crate::invoke::not_ready(state, ns, &t.function).await),
        },
        Some(v) => Ok((deployment(state, ns, &t.function, v).await?, t.function)),
    }
}

/// Version `v` of `function` as served now: the current build when it is that version, else
/// its deploy beside it, if there is one.
fn serving(state: &AppState, ns: &str, function: &str, v: u32) -> Option<Arc<Deployed>> {
    state
        .deployed(ns, function)
        .filter(|d| d.version == Some(v))
        .or_else(|| state.deployed(ns, &deploy_name(function, v)))
}

/// Version `v` of `function`, deployed: as [`serving`], else deployed beside the current build
/// now, once, from the version's recorded spec.
pub async fn deployment(
    state: &AppState,
    ns: &str,
    function: &str,
    v: u32,
) -> Result<Arc<Deployed>, VersionError> {
    if let Some(d) = serving(state, ns, function, v) {
        return Ok(d);
    }
    let name = deploy_name(function, v);
    let lock = state
        .versions
        .deploying
        .lock()
        .entry((ns.to_string(), name.clone()))
        .or_default()
        .clone();
    let _one = lock.lock().await;
    if let Some(d) = state.deployed(ns, &name) {
        return Ok(d);
    }
    let deployed = deploy_version(state, ns, function, v).await;
    state
        .versions
        .deploying
        .lock()
        .remove(&(ns.to_string(), name.clone()));
    let d = deployed?;
    state.set_deployed(ns, &name, Some(d));
    state
        .deployed(ns, &name)
        .ok_or_else(|| VersionError::Unavailable {
            function: function.to_string(),
            version: v,
            reason: "removed while it was being deployed".into(),
        })
}

async fn deploy_version(
    state: &AppState,
    ns: &str,
    function: &str,
    v: u32,
) -> Result<Deployed, VersionError> {
    let unavailable = |reason: String| VersionError::Unavailable {
        function: function.to_string(),
        version: v,
        reason,
    };
    let Some(f) = state.get(ns, Kind::Function, function).await? else {
        return Err(VersionError::NoVersion {
            function: function.to_string(),
            version: v,
        });
    };
    let version = versions_of(state, ns, function)
        .await?
        .into_iter()
        .find(|x| x.version == v)
        .ok_or_else(|| VersionError::NoVersion {
            function: function.to_string(),
            version: v,
        })?;
    let mut o = f;
    o.spec = version.spec.clone();
    let planned: Planned = match plan(state, &o, false).await? {
        Ok(p) => p,
        Err(Unplanned::Failed(r) | Unplanned::Waiting(r)) => return Err(unavailable(r)),
    };
    if planned.digest != version.digest {
        return Err(unavailable(format!(
            "what it was built from changed since (its image {:?} was rebuilt): roll back to it \
             (dispatch rollback {function} --to {v}) to build it again as a new version",
            planned.spec.image
        )));
    }
    let mut deploy = planned.deploy.clone();
    deploy.name = deploy_name(function, v);
    let handle = state
        .backend
        .deploy_function(deploy)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    tracing::info!(
        function,
        namespace = ns,
        version = v,
        "deployed a version beside the current build"
    );
    Ok(planned.deployed(handle, Some(v)))
}

/// Refuses a version the function does not keep (an async run naming it would never run).
pub async fn check_version(
    state: &AppState,
    ns: &str,
    function: &str,
    v: u32,
) -> Result<(), VersionError> {
    if serving(state, ns, function, v).is_some() {
        return Ok(());
    }
    if versions_of(state, ns, function)
        .await?
        .iter()
        .any(|x| x.version == v)
    {
        return Ok(());
    }
    Err(VersionError::NoVersion {
        function: function.to_string(),
        version: v,
    })
}

/// A function's versions, newest first.
pub async fn versions_of(
    state: &AppState,
    ns: &str,
    function: &str,
) -> Result<Vec<FunctionVersion>, StateError> {
    let (n, f) = (ns.to_string(), function.to_string());
    state.db(move |s| s.list_versions(&n, &f)).await
}

/// Stops the deploy of version `v` beside `function` (it became the current build, or is no
/// longer kept).
pub async fn undeploy(state: &AppState, ns: &str, function: &str, v: u32) {
    let name = deploy_name(function, v);
    if state.deployed(ns, &name).is_some() {
        state.set_deployed(ns, &name, None);
        state.backend.remove_function(ns, &name).await;
    }
}

/// A deleted function: every version deployed beside it goes too.
pub async fn forget_function(state: &AppState, ns: &str, function: &str) {
    for name in state.deployed_names(ns) {
        if let (f, Some(v)) = split_deploy_name(&name)
            && f == function
        {
            undeploy(state, ns, function, v).await;
        }
    }
}

/// A deleted alias: out of the gateway's table, its promotion stopped.
pub fn forget_alias(state: &AppState, ns: &str, name: &str) {
    state.versions.set_alias(ns, name, None);
    stop_promotion(state, ns, name);
}

/// Records the build just deployed as the function's version (a new number for a new digest)
/// and keeps the newest `spec.keepVersions` and those an alias, an endpoint, a subscription or
/// an event driver names; versions no longer kept stop being served beside it.
pub(crate) async fn record(state: &AppState, o: &Object, planned: &Planned) -> Option<u32> {
    let (ns, function) = (o.namespace(), o.name());
    let version = FunctionVersion {
        namespace: ns.to_string(),
        function: function.to_string(),
        version: 0,
        digest: planned.digest.clone(),
        spec: o.spec.clone(),
        generation: o.metadata.generation,
        created_at: jiff::Timestamp::now(),
        created_by: o.metadata.updated_by.clone(),
    };
    let keep = planned.spec.keep_versions();
    let pinned = match pinned(state, ns, function).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                function,
                namespace = ns,
                "reading what names the function's versions: {e}"
            );
            return None;
        }
    };
    let recorded = state
        .db(move |s| s.record_version(&version, keep, &pinned))
        .await;
    match recorded {
        Ok(n) => {
            if let Ok(kept) = versions_of(state, ns, function).await {
                for name in state.deployed_names(ns) {
                    if let (f, Some(v)) = split_deploy_name(&name)
                        && f == function
                        && !kept.iter().any(|k| k.version == v)
                    {
                        undeploy(state, ns, function, v).await;
                    }
                }
            }
            Some(n)
        }
        Err(e) => {
            tracing::warn!(
                function,
                namespace = ns,
                "recording the function's version: {e}"
            );
            None
        }
    }
}

/// Versions of `function` named by number: by its aliases, or by an endpoint, a subscription
/// or an event driver (`hello@3`), as stored.
async fn pinned(state: &AppState, ns: &str, function: &str) -> Result<Vec<u32>, StateError> {
    let mut out = Vec::new();
    for kind in [
        Kind::Endpoint,
        Kind::Subscription,
        Kind::EventDriver,
        Kind::Alias,
    ] {
        let n = ns.to_string();
        for o in state.res(move |s| s.list(Some(&n), kind)).await? {
            out.extend(o.pinned_versions(function));
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// An alias changed: the gateway's table follows, the versions it names are deployed (so that
/// its first calls are warm), and its promotion runs or stops.
pub(crate) async fn reconcile_alias(
    state: &Arc<AppState>,
    key: &Key,
) -> Result<(), ReconcileError> {
    let (ns, name) = (key.namespace.as_str(), key.name.as_str());
    let Some(o) = state.get(ns, Kind::Alias, name).await? else {
        forget_alias(state, ns, name);
        return Ok(());
    };
    let spec: AliasSpec = match o.typed_spec() {
        Ok(s) => s,
        Err(e) => return set_status(state, &o, status(Phase::Error, e.message, None, &o)).await,
    };
    state.versions.set_alias(ns, name, Some(spec.clone()));
    match &spec.promotion {
        Some(p) => start_promotion(state, ns, name, p),
        None => stop_promotion(state, ns, name),
    }
    let mut failed = Vec::new();
    for v in spec.versions() {
        if let Err(e) = deployment(state, ns, &spec.function, v).await {
            failed.push(e.to_string());
        }
    }
    let mut reason = traffic_text(&spec.traffic);
    if let Some(p) = &spec.promotion {
        reason.push_str(&format!(
            "; promoting to {} ({}% every {}, stops above {}% errors)",
            p.to, p.step, p.every, p.max_error_rate
        ));
    }
    if !failed.is_empty() {
        return set_status(state, &o, status(Phase::Error, failed.join("; "), None, &o)).await;
    }
    // A promotion's last word (ended or stopped) stays until the next change.
    if spec.promotion.is_none()
        && o.status.reason.starts_with("promotion")
        && o.status.phase == Some(Phase::Ready)
    {
        reason = o.status.reason.clone();
    }
    set_status(state, &o, status(Phase::Ready, reason, None, &o)).await
}

/// `3=90,4=10`
pub fn traffic_text(traffic: &[TrafficTarget]) -> String {
    traffic
        .iter()
        .map(|t| format!("{}={}", t.version, t.percent))
        .collect::<Vec<_>>()
        .join(",")
}

fn stop_promotion(state: &AppState, ns: &str, name: &str) {
    if let Some((_, task)) = state
        .versions
        .promotions
        .lock()
        .remove(&(ns.to_string(), name.to_string()))
    {
        task.abort();
    }
}

fn start_promotion(state: &Arc<AppState>, ns: &str, name: &str, p: &Promotion) {
    let key = (ns.to_string(), name.to_string());
    let mut all = state.versions.promotions.lock();
    if let Some((running, task)) = all.get(&key)
        && running == p
        && !task.is_finished()
    {
        return;
    }
    if let Some((_, task)) = all.remove(&key) {
        task.abort();
    }
    let every =
        dispatch_core::duration::parse_duration(&p.every).unwrap_or(Duration::from_secs(60));
    let st = Arc::downgrade(state);
    let (n, a) = key.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let Some(state) = st.upgrade() else { return };
            if !crate::replicas::leadership(&state).is_none_or(|rx| *rx.borrow()) {
                continue; // another server leads the installation: it promotes
            }
            match promotion_step(&state, &n, &a).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(alias = %a, namespace = %n, "promotion step: {e}"),
            }
        }
    });
    all.insert(key, (p.clone(), task));
}

/// A new version's calls and failures since a time, from its run records.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorRate {
    pub calls: u64,
    pub failed: u64,
}

impl ErrorRate {
    pub fn percent(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.failed as f64 * 100.0 / self.calls as f64
        }
    }
}

/// Most run records one measurement reads.
const MEASURE_LIMIT: usize = 20_000;

/// Counts the finished runs version `v` of `function` served since `since`. A function that
/// samples its successes counts each sampled one for 1/rate calls; one that keeps no successes
/// cannot be measured (an error).
pub async fn error_rate(
    state: &AppState,
    ns: &str,
    function: &str,
    v: u32,
    since: jiff::Timestamp,
) -> Result<ErrorRate, String> {
    let policy = state
        .deployed(ns, function)
        .map(|d| d.history)
        .unwrap_or_default();
    let success_weight = match policy.history {
        dispatch_core::History::All => 1.0,
        dispatch_core::History::Sample if policy.sample_rate > 0.0 => 1.0 / policy.sample_rate,
        _ => {
            return Err(format!(
                "function {function:?} keeps no record of its successful calls (spec.history {:?}): \
                 the error rate cannot be measured; set spec.history to all or sample",
                policy.history
            ));
        }
    };
    let mut filter = dispatch_store::RunFilter {
        function: Some(function.to_string()),
        since: Some(since),
        limit: Some(1000),
        ..Default::default()
    };
    let (mut ok, mut failed, mut read) = (0u64, 0u64, 0usize);
    loop {
        let page = state
            .list_runs(ns, filter.clone())
            .await
            .map_err(|e| e.to_string())?;
        read += page.len();
        for r in &page {
            if r.version != Some(v) || !r.status.is_final() || r.status == RunStatus::Cancelled {
                continue;
            }
            if r.status == RunStatus::Succeeded {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        match page.last() {
            Some(last) if page.len() == 1000 && read < MEASURE_LIMIT => {
                filter.after = Some(last.id.clone())
            }
            _ => break,
        }
    }
    Ok(ErrorRate {
        calls: (ok as f64 * success_weight).round() as u64 + failed,
        failed,
    })
}

/// One step of a promotion: judge the new version's error rate, then move `step` percent more
/// to it, or (past the threshold) put the traffic back as it was. `false`: it is over.
async fn promotion_step(state: &Arc<AppState>, ns: &str, name: &str) -> Result<bool, String> {
    let Some(mut o) = state
        .get(ns, Kind::Alias, name)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(false);
    };
    let mut spec: AliasSpec = o.typed_spec().map_err(|e| e.message)?;
    let Some(p) = spec.promotion.clone() else {
        return Ok(false);
    };
    let since = p.started_at.unwrap_or_else(jiff::Timestamp::now);
    let share = spec
        .traffic
        .iter()
        .find(|t| t.version == p.to)
        .map_or(0, |t| t.percent);
    let (reason, done) = match error_rate(state, ns, &spec.function, p.to, since).await {
        Err(why) => {
            spec.traffic = if p.from.is_empty() {
                spec.traffic.clone()
            } else {
                p.from.clone()
            };
            (
                format!(
                    "promotion to {} stopped: {why}; traffic back to {}",
                    p.to,
                    traffic_text(&spec.traffic)
                ),
                true,
            )
        }
        Ok(rate) if rate.calls >= u64::from(p.min_calls) && rate.percent() > p.max_error_rate => {
            spec.traffic = p.from.clone();
            (
                format!(
                    "promotion to {} stopped at {share}%: {:.1}% errors ({} of {} calls) > {}%; traffic back to {}",
                    p.to,
                    rate.percent(),
                    rate.failed,
                    rate.calls,
                    p.max_error_rate,
                    traffic_text(&spec.traffic)
                ),
                true,
            )
        }
        Ok(rate) => {
            let next = (share + p.step).min(100);
            spec.traffic = shift(&spec.traffic, p.to, next);
            if next == 100 {
                (
                    format!(
                        "promotion to {} done: 100% ({:.1}% errors, {} of {} calls)",
                        p.to,
                        rate.percent(),
                        rate.failed,
                        rate.calls
                    ),
                    true,
                )
            } else {
                (String::new(), false)
            }
        }
    };
    if done {
        spec.promotion = None;
        // How it ended is in the status before the promotion leaves the spec: whoever sees it
        // gone (`promote --wait`) reads the outcome, never the reason of a step before.
        tracing::info!(alias = name, namespace = ns, "{reason}");
        let (n, a, st) = (
            ns.to_string(),
            name.to_string(),
            status(Phase::Ready, reason, None, &o),
        );
        let generation = o.metadata.generation;
        o = state
            .res(move |s| s.update_status(&n, Kind::Alias, &a, st))
            .await
            .map_err(|e| e.to_string())?;
        if o.metadata.generation != generation {
            return Ok(true); // written meanwhile: the next step reads it again
        }
    }
    o.spec = serde_json::to_value(&spec).map_err(|e| e.to_string())?;
    let stored = state
        .res(move |s| s.update(o))
        .await
        .map_err(|e| e.to_string())?;
    crate::resources::stored_changed(state, &stored)
        .await
        .map_err(|e| e.to_string())?;
    Ok(!done)
}

/// `traffic` with `to` at `share` percent, the others scaled to the rest (largest remainders,
/// so that the sum stays 100).
pub fn shift(traffic: &[TrafficTarget], to: u32, share: u32) -> Vec<TrafficTarget> {
    let others: Vec<&TrafficTarget> = traffic.iter().filter(|t| t.version != to).collect();
    let total: u32 = others.iter().map(|t| t.percent).sum();
    let rest = 100 - share;
    let mut out: Vec<TrafficTarget> = Vec::new();
    if rest > 0 && total > 0 {
        let mut parts: Vec<(u32, u32, u32)> = others
            .iter()
            .map(|t| {
                let exact = t.percent * rest;
                (t.version, exact / total, exact % total)
            })
            .collect();
        let mut left = rest - parts.iter().map(|p| p.1).sum::<u32>();
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(parts[i].2));
        for i in order {
            if left == 0 {
                break;
            }
            parts[i].1 += 1;
            left -= 1;
        }
        out.extend(
            parts
                .into_iter()
                .filter(|p| p.1 > 0)
                .map(|(version, percent, _)| TrafficTarget { version, percent }),
        );
    }
    if share > 0 {
        out.push(TrafficTarget {
            version: to,
            percent: share,
        });
    }
    out.sort_by_key(|t| t.version);
    out
}

/// Fills what the server decides of an alias being written: a promotion's start and the
/// traffic it began from (kept from the stored alias when the same promotion goes on).
pub(crate) fn admit_alias(spec: &mut AliasSpec, stored: Option<&AliasSpec>) {
    let Some(p) = &mut spec.promotion else {
        return;
    };
    if let Some(sp) = stored
        .and_then(|s| s.promotion.as_ref())
        .filter(|sp| sp.to == p.to)
    {
        p.started_at = p.started_at.or(sp.started_at);
        if p.from.is_empty() {
            p.from = sp.from.clone();
        }
    }
    p.started_at.get_or_insert_with(jiff::Timestamp::now);
    if p.from.is_empty() {
        p.from = stored.map_or_else(|| spec.traffic.clone(), |s| s.traffic.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(u32, u32)]) -> Vec<TrafficTarget> {
        pairs
            .iter()
            .map(|&(version, percent)| TrafficTarget { version, percent })
            .collect()
    }

    #[test]
    fn shifting_keeps_the_sum_and_the_others_proportions() {
        assert_eq!(shift(&t(&[(3, 100)]), 4, 10), t(&[(3, 90), (4, 10)]));
        assert_eq!(
            shift(&t(&[(3, 90), (4, 10)]), 4, 20),
            t(&[(3, 80), (4, 20)])
        );
        assert_eq!(shift(&t(&[(3, 90), (4, 10)]), 4, 100), t(&[(4, 100)]));
        assert_eq!(
            shift(&t(&[(1, 50), (2, 50)]), 3, 33),
            t(&[(1, 34), (2, 33), (3, 33)])
        );
        for share in 0..=100 {
            let s = shift(&t(&[(1, 33), (2, 67)]), 5, share);
            assert_eq!(
                s.iter().map(|x| x.percent).sum::<u32>(),
                100,
                "{share}: {s:?}"
            );
        }
    }

    #[test]
    fn a_sticky_key_lands_on_one_point_and_keys_spread() {
        assert_eq!(
            point("hello.prod", Some("user-1")),
            point("hello.prod", Some("user-1"))
        );
        let mut hist = [0u32; 10];
        for i in 0..10_000 {
            hist[(point("hello.prod", Some(&format!("user-{i}"))) / 10) as usize] += 1;
        }
        assert!(hist.iter().all(|&n| (800..1200).contains(&n)), "{hist:?}");
    }

    #[test]
    fn a_promotion_keeps_its_start_when_written_again() {
        let mut stored = AliasSpec {
            function: "hello".into(),
            traffic: t(&[(3, 100)]),
            ..Default::default()
        };
        let promo = Promotion {
            to: 4,
            step: 10,
            every: "1m".into(),
            max_error_rate: 1.0,
            min_calls: 20,
            started_at: None,
            from: vec![],
        };
        let mut first = AliasSpec {
            promotion: Some(promo.clone()),
            ..stored.clone()
        };
        admit_alias(&mut first, Some(&stored));
        let p = first.promotion.clone().unwrap();
        assert_eq!(p.from, t(&[(3, 100)]));
        assert!(p.started_at.is_some());
        stored = first.clone();
        stored.traffic = t(&[(3, 90), (4, 10)]);
        let mut again = AliasSpec {
            promotion: Some(promo),
            ..stored.clone()
        };
        admit_alias(&mut again, Some(&stored));
        assert_eq!(again.promotion.unwrap(), p, "the same promotion goes on");
    }
}
