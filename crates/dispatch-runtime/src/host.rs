//! What this host offers the runtime: programs on its PATH (interpreters, npm). A leaf
//! module: the sandbox, builds and the local backend read it, it reads none of them.

use std::path::PathBuf;

/// Looks `name` up on PATH (or takes it as a path when it has a `/`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
