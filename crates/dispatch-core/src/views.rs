//! Records shown as resources are (`dispatch get run ID -o json|yaml`, job executions too):
//! `apiVersion`, `kind`, `metadata` (`name`, `namespace`, `creationTimestamp`), `spec` (what
//! was asked) and `status` (what happened), like every other `get KIND NAME`. The API keeps
//! answering the flat records; this is their printed shape.

use serde_json::{Map, Value};

use crate::jobs::JobExecution;
use crate::resource::{API_VERSION, DISPATCHER_API_VERSION};
use crate::run::Run;

/// `record` (a flat JSON object) as a resource: `name` becomes `metadata.name`, `spec` moves
/// its fields (from → to) into `spec`, `renames` renames what stays in `status`.
fn as_resource(
    api_version: &str,
    kind: &str,
    record: Value,
    name: &str,
    spec: &[(&str, &str)],
    renames: &[(&str, &str)],
) -> Value {
    let Value::Object(mut m) = record else {
        return record;
    };
    let mut metadata = Map::new();
    for (from, to) in [
        (name, "name"),
        ("namespace", "namespace"),
        ("createdAt", "creationTimestamp"),
    ] {
        if let Some(v) = m.remove(from) {
            metadata.insert(to.to_string(), v);
        }
    }
    let mut spec_map = Map::new();
    for (from, to) in spec {
        if let Some(v) = m.remove(*from) {
            spec_map.insert(to.to_string(), v);
        }
    }
    for (from, to) in renames {
        if let Some(v) = m.remove(*from) {
            m.insert(to.to_string(), v);
        }
    }
    serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata,
        "spec": spec_map,
        "status": m,
    })
}

impl Run {
    /// The run as a `Run` resource: spec = function, trigger, input and how it was asked
    /// (async, event, httpContext); status = phase (its status), output, logs, error,
    /// attempts, timings and the rest.
    pub fn to_resource(&self) -> Value {
        as_resource(
            API_VERSION,
            "Run",
            serde_json::to_value(self).unwrap_or_default(),
            "id",
            &[
                ("function", "function"),
                ("trigger", "trigger"),
                ("input", "input"),
                ("async", "async"),
                ("event", "event"),
                ("httpContext", "httpContext"),
            ],
            &[("status", "phase")],
        )
    }
}

impl JobExecution {
    /// The execution as dispatcher's `JobExecution` resource: spec = `jobTemplateName` and
    /// `payload` (dispatcher's fields) and the rendered job; status = phase, reason, attempts,
    /// exit code, logs and times.
    pub fn to_resource(&self) -> Value {
        as_resource(
            DISPATCHER_API_VERSION,
            "JobExecution",
            serde_json::to_value(self).unwrap_or_default(),
            "uuid",
            &[
                ("name", "jobTemplateName"),
                ("payload", "payload"),
                ("rendered", "rendered"),
            ],
            &[],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Trigger;

    #[test]
    fn a_run_reads_like_a_resource() {
        let input = serde_json::value::to_raw_value(&serde_json::json!({"name": "x"})).unwrap();
        let mut run = Run::new(
            "01J".into(),
            "team",
            "hello",
            Trigger::Exec,
            input,
            jiff::Timestamp::UNIX_EPOCH,
        );
        run.attempts = 2;
        let v = run.to_resource();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], "Run");
        assert_eq!(v["metadata"]["name"], "01J");
        assert_eq!(v["metadata"]["namespace"], "team");
        assert_eq!(v["metadata"]["creationTimestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(v["spec"]["function"], "hello");
        assert_eq!(v["spec"]["input"]["name"], "x");
        assert_eq!(v["status"]["phase"], run.status.to_string());
        assert_eq!(v["status"]["attempts"], 2);
        assert!(v["status"].get("id").is_none() && v.get("id").is_none());
    }
}
