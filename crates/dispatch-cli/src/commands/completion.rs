//! `dispatch completion bash|zsh|fish`: shell completion scripts.

use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;
use clap_complete::Shell;

/// Print a shell completion script: `source <(dispatch completion bash)`
#[derive(Debug, clap::Args)]
pub struct Completion {
    #[arg(value_parser = ["bash", "zsh", "fish"])]
    pub shell: String,
}

impl Completion {
    pub fn run(self) -> Result<ExitCode> {
        let shell = match self.shell.as_str() {
            "zsh" => Shell::Zsh,
            "fish" => Shell::Fish,
            _ => Shell::Bash,
        };
        let mut cmd = crate::Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "dispatch", &mut script);
        crate::output::write_stdout(&script)?;
        Ok(ExitCode::SUCCESS)
    }
}
