//! Run records read across the stores that hold them: durable (async) runs live in the
//! record store, sync calls' history in its own file (see [`crate::Stores`]). Readers see one
//! set: a run is looked up in each, lists merge by id (ULIDs sort by creation time), usage
//! adds up per namespace, and deletes reach both.

use std::collections::BTreeMap;

use dispatch_core::Run;
use dispatch_store::{RunFilter, RunUsage};

use crate::AppState;
use crate::state::StateError;

impl AppState {
    /// One run by id, from whichever store holds it.
    pub async fn get_run(&self, ns: &str, id: &str) -> Result<Option<Run>, StateError> {
        let (ns, id) = (ns.to_string(), id.to_string());
        self.first_in_run_stores(move |s| s.get_run(&ns, &id)).await
    }

    /// Runs of a namespace, newest first, at most the filter's limit (default 100), from
    /// every store that holds runs. Keyset pages (`after`) work across them because each
    /// store applies the same bound to the same ids.
    pub async fn list_runs(&self, ns: &str, filter: RunFilter) -> Result<Vec<Run>, StateError> {
        let limit = filter.limit.unwrap_or(100);
        let ns = ns.to_string();
        let lists = self
            .each_run_store(move |s| s.list_runs(&ns, &filter))
            .await?;
        Ok(newest_first(lists, limit))
    }

    /// What every namespace's run records take, all stores added up.
    pub async fn run_usage(&self) -> Result<Vec<RunUsage>, StateError> {
        let all = self.each_run_store(|s| s.run_usage()).await?;
        Ok(add_up(all.into_iter().flatten()))
    }

    /// Deletes finished runs (of a function, of a status) from every store; the count.
    pub async fn purge_runs(
        &self,
        ns: &str,
        function: Option<String>,
        status: Option<dispatch_core::RunStatus>,
    ) -> Result<u64, StateError> {
        let ns = ns.to_string();
        let counts = self
            .each_run_store(move |s| s.purge_runs(&ns, function.as_deref(), status))
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// Deletes every run of a function from every store; the count.
    pub async fn delete_runs_of(&self, ns: &str, function: &str) -> Result<u64, StateError> {
        let (ns, function) = (ns.to_string(), function.to_string());
        let counts = self
            .each_run_store(move |s| s.delete_runs_of(&ns, &function))
            .await?;
        Ok(counts.into_iter().sum())
    }
}

/// Lists that are each newest first, merged newest first and cut at `limit`.
fn newest_first(lists: Vec<Vec<Run>>, limit: usize) -> Vec<Run> {
    let mut all: Vec<Run> = lists.into_iter().flatten().collect();
    if all.len() > 1 {
        all.sort_by(|a, b| b.id.cmp(&a.id));
    }
    all.truncate(limit);
    all
}

/// Usage rows of several stores, one row per namespace.
fn add_up(rows: impl Iterator<Item = RunUsage>) -> Vec<RunUsage> {
    let mut by_ns = BTreeMap::<String, RunUsage>::new();
    for u in rows {
        let sum = by_ns.entry(u.namespace.clone()).or_insert(RunUsage {
            namespace: u.namespace.clone(),
            ..RunUsage::default()
        });
        sum.runs += u.runs;
        sum.finished += u.finished;
        sum.bytes += u.bytes;
    }
    by_ns.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str) -> Run {
        let input = serde_json::value::RawValue::from_string("null".into()).unwrap();
        Run::new(
            id.into(),
            "ns",
            "f",
            dispatch_core::Trigger::Exec,
            input,
            jiff::Timestamp::UNIX_EPOCH,
        )
    }

    #[test]
    fn merged_lists_stay_newest_first_and_keep_the_limit() {
        let durable = vec![run("05"), run("03"), run("01")];
        let history = vec![run("06"), run("04"), run("02")];
        let ids: Vec<String> = newest_first(vec![durable, history], 4)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["06", "05", "04", "03"]);
    }

    #[test]
    fn usage_adds_up_per_namespace() {
        let row = |ns: &str, runs, bytes| RunUsage {
            namespace: ns.into(),
            runs,
            finished: runs,
            bytes,
        };
        let sum = add_up(vec![row("a", 1, 10), row("b", 2, 20), row("a", 3, 30)].into_iter());
        assert_eq!(sum, vec![row("a", 4, 40), row("b", 2, 20)]);
    }
}
