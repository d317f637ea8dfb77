//! The last two walls a sandboxed process gets before it execs (DESIGN §9): Landlock (file
//! access only beneath the paths the plan shows; signals and abstract Unix sockets only within
//! the sandbox) and a seccomp deny list (mount, ptrace, bpf, kexec, keyctl, module loading,
//! new namespaces, …: `EPERM`). Both are applied by the launcher's child after `no_new_privs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use super::Plan;

/// The Landlock ABI whose rights we ask for (ABI 6 adds the signal and abstract-socket
/// scopes; this kernel has 7).
const LANDLOCK_ABI: ABI = ABI::V6;

/// Applies Landlock: read and execute beneath the plan's read-only paths, the system
/// directories, `/proc` and `/dev`; everything beneath `/tmp`, `/dev/shm` and the writable
/// binds; no signals or abstract sockets beyond the sandbox. Every right must be enforced.
pub fn landlock(plan: &Plan) -> Result<(), String> {
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut read: Vec<PathBuf> = vec!["/proc".into(), "/dev".into()];
    let mut write: Vec<PathBuf> = vec!["/tmp".into(), "/dev/shm".into()];
    for b in &plan.binds {
        if std::fs::symlink_metadata(&b.dst).is_ok_and(|m| !m.file_type().is_symlink()) {
            if b.rw {
                write.push(b.dst.clone());
            } else {
                read.push(b.dst.clone());
            }
        }
    }
    let devices: Vec<PathBuf> = super::launch::DEVICES
        .iter()
        .map(|d| PathBuf::from("/dev").join(d))
        .filter(|p| p.exists())
        .collect();
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(err)?
        .scope(Scope::Signal | Scope::AbstractUnixSocket)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(&read, AccessFs::from_read(LANDLOCK_ABI)))
        .map_err(err)?
        .add_rules(path_beneath_rules(&write, AccessFs::from_all(LANDLOCK_ABI)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &devices,
            AccessFs::from_read(LANDLOCK_ABI) | AccessFs::WriteFile,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(format!(
            "landlock: not fully enforced by this kernel ({:?})",
            status.ruleset
        ));
    }
    Ok(())
}

/// The name and number of a system call.
macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), libc::$name)),*]
    };
}

/// System calls a function never needs and an attacker wants, by name (for OCI bundles of
/// the container tier) and number.
pub fn denied_calls() -> Vec<(&'static str, i64)> {
    let strip = |(n, nr): (&'static str, i64)| (n.trim_start_matches("SYS_"), nr);
    let mut v: Vec<(&'static str, i64)> = sys!(
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_unshare,
        SYS_setns,
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_reboot,
        SYS_swapon,
        SYS_swapoff,
        SYS_syslog,
        SYS_acct,
        SYS_settimeofday,
        SYS_clock_settime,
        SYS_clock_adjtime,
        SYS_adjtimex,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_quotactl,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount_setattr,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_vhangup,
    )
    .into_iter()
    .map(strip)
    .collect();
    #[cfg(target_arch = "x86_64")]
    v.extend(
        sys!(SYS_iopl, SYS_ioperm, SYS_lookup_dcookie)
            .into_iter()
            .map(strip),
    );
    v
}

fn denied() -> Vec<i64> {
    denied_calls().into_iter().map(|(_, nr)| nr).collect()
}

/// Namespace flags that `clone` may not carry (a new user namespace would give back
/// capabilities inside it).
pub const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> Result<TargetArch, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        "riscv64" => Ok(TargetArch::riscv64),
        other => Err(format!("seccomp: no filter for architecture {other}")),
    }
}

/// The deny-list programs: the listed calls fail with `EPERM`, `clone` with a namespace flag
/// too, and `clone3` with `ENOSYS` (its flags live in memory a filter cannot read; C
/// libraries fall back to `clone`). Two programs: the kernel runs every installed filter and
/// takes the strictest answer.
pub fn filters() -> Result<Vec<seccompiler::BpfProgram>, String> {
    let err = |e: seccompiler::BackendError| format!("seccomp: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied().into_iter().map(|n| (n, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&f| {
            let f = f as u64;
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let program = |rules, errno: i32| -> Result<seccompiler::BpfProgram, String> {
        let f = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch()?,
        )
        .map_err(err)?;
        f.try_into().map_err(err)
    };
    Ok(vec![
        program(rules, libc::EPERM)?,
        program(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            libc::ENOSYS,
        )?,
    ])
}

/// Installs the filters on the calling thread (inherited by everything it execs and forks).
pub fn seccomp() -> Result<(), String> {
    for p in filters()? {
        seccompiler::apply_filter(&p).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}
