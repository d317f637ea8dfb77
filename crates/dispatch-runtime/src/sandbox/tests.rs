//! Unit tests of the sandbox's settings and parsing.

use super::*;

#[test]
fn isolation_and_layers_parse_with_clear_errors() {
    assert_eq!("none".parse::<Isolation>().unwrap(), Isolation::None);
    assert!("off".parse::<Isolation>().unwrap_err().contains("sandbox"));
    let l: Lowered = "landlock, cgroups".parse().unwrap();
    assert!(l.landlock && l.cgroups && !l.seccomp);
    assert_eq!("".parse::<Lowered>().unwrap(), Lowered::default());
    assert!(
        "pid"
            .parse::<Lowered>()
            .unwrap_err()
            .contains("landlock, seccomp and cgroups")
    );
    assert_eq!(cgroup::human_bytes(256 * MIB), "256Mi");
    assert_eq!(cgroup::human_bytes(3 << 30), "3Gi");
    assert_eq!(cgroup::human_bytes(100), "100 bytes");
}

#[test]
fn the_seccomp_filters_compile_for_this_architecture() {
    let f = walls::filters().unwrap();
    assert_eq!(f.len(), 2);
    assert!(f.iter().all(|p| !p.is_empty()));
}

#[test]
fn a_plan_round_trips_as_the_launcher_reads_it() {
    let plan = Plan {
        root: "/data/sandbox/root".into(),
        binds: vec![Bind {
            src: "/usr".into(),
            dst: "/usr".into(),
            rw: false,
        }],
        tmp_bytes: 64 * MIB,
        network: false,
        identity: Identity::Uid {
            uid: UID_BASE,
            gid: UID_BASE,
        },
        cgroups: vec![],
        cwd: "/".into(),
        env_path: "/usr/bin".into(),
        hostname: "dispatch".into(),
        landlock: true,
        seccomp: true,
    };
    let json = serde_json::to_string(&plan).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back.identity, plan.identity);
    assert_eq!(back.binds, plan.binds);
}
