//! What the Kubernetes tests share.

/// A job execution of template `sample` whose Job runs `echo hi` once.
pub fn execution() -> dispatch_core::JobExecution {
    use dispatch_core::{JobExecution, JobPhase, Logs};
    let rendered = serde_json::json!({"spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
        "containers": [{"name": "main", "image": "alpine:3", "command": ["echo", "hi"]}]}}}});
    JobExecution {
        uuid: "0193c1f2-8e4b-7a00-8000-123456789abc".into(),
        name: "sample".into(),
        namespace: "default".into(),
        phase: JobPhase::Waiting,
        reason: String::new(),
        payload: "hi".into(),
        rendered,
        images: vec![],
        runtime: dispatch_core::jobs::JobRuntime::Host,
        attempts: 0,
        exit_code: None,
        logs: Logs::default(),
        created_at: "2026-11-23T10:00:00Z".parse().unwrap(),
        started_at: None,
        finished_at: None,
        expires_at: None,
        replica: None,
        trace: None,
    }
}
