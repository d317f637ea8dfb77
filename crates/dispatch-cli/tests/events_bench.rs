//! `dispatch bench events` as a smoke test. A test binary of its own: its load would slow
//! the fault matrix's `/readyz` bound if the two ran side by side (tests of one binary run
//! in parallel, binaries one after another).

use assert_cmd::cargo::CommandCargoExt;

/// `dispatch bench events`: ingest, delivery and a 3× overload; every accepted event is
/// delivered and every answer is a 202 or a 429.
#[test]
fn the_events_bench_delivers_every_accepted_event() {
    let out = std::process::Command::cargo_bin("dispatch")
        .unwrap()
        .args([
            "bench",
            "events",
            "--duration",
            "1s",
            "--pending-limit",
            "50",
            "--isolation",
            "none",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{r}");
    for p in phases {
        assert!(p["accepted"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["undelivered"], 0, "{p}");
        for status in p["statuses"].as_object().unwrap().keys() {
            assert!(status == "202" || status == "429", "{p}");
        }
    }
}
