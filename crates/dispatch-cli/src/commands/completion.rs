//! `dispatch completion bash|zsh|fish`: shell completion scripts (clap's, plus the names of
//! what exists on the server where a command takes KIND NAME).

use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;
use clap_complete::Shell;

/// Print a shell completion script: `source <(dispatch completion bash)`; where a command
/// takes KIND NAME (get, describe, delete, logs, cancel, update) names come from the server
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
        script.extend_from_slice(names_hook(shell).as_bytes());
        crate::output::write_stdout(&script)?;
        Ok(ExitCode::SUCCESS)
    }
}

/// The subcommands whose second word is a resource name (`dispatch get function NAME`).
const NAMED: &str = "get describe delete logs cancel update";

/// What each shell adds to clap's script: the names of what exists on the server where a
/// command takes `KIND NAME`, from `dispatch __complete-names KIND`.
fn names_hook(shell: Shell) -> String {
    match shell {
        Shell::Zsh => format!(
            r#"
# Resource names from the server where a command takes KIND NAME.
_dispatch_with_names() {{
  if (( CURRENT == 4 )) && [[ " {NAMED} " == *" ${{words[2]}} "* ]]; then
    local -a names
    names=(${{(f)"$(dispatch __complete-names ${{words[3]}} 2>/dev/null)"}})
    compadd -a names
  else
    _dispatch "$@"
  fi
}}
compdef _dispatch_with_names dispatch
"#
        ),
        Shell::Fish => format!(
            r#"
# Resource names from the server where a command takes KIND NAME.
complete -c dispatch -n 'test (count (commandline -opc)) -eq 3; and contains -- (commandline -opc)[2] {NAMED}' -f -a '(dispatch __complete-names (commandline -opc)[3] 2>/dev/null)'
"#
        ),
        _ => format!(
            r#"
# Resource names from the server where a command takes KIND NAME.
_dispatch_with_names() {{
    if [[ $COMP_CWORD -eq 3 && " {NAMED} " == *" ${{COMP_WORDS[1]}} "* ]]; then
        local cur="${{COMP_WORDS[COMP_CWORD]}}"
        COMPREPLY=($(compgen -W "$(dispatch __complete-names "${{COMP_WORDS[2]}}" 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _dispatch "$@"
}}
complete -F _dispatch_with_names -o bashdefault -o default dispatch
"#
        ),
    }
}

/// Names of what exists of a kind, one a line, for the completion scripts (hidden): nothing
/// when the server cannot be asked within a second or two (a shell must not hang).
#[derive(Debug, clap::Args)]
pub struct CompleteNames {
    pub kind: String,
}

impl CompleteNames {
    pub async fn run(self, global: &crate::Global) -> Result<ExitCode> {
        let names = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let ctx = crate::Ctx::resolve(global).ok()?;
            names_of(&ctx.client, &self.kind).await
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let mut text = names.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::output::write_stdout(text.as_bytes())?;
        Ok(ExitCode::SUCCESS)
    }
}

async fn names_of(c: &dispatch_client::Client, kind: &str) -> Option<Vec<String>> {
    use super::Target;
    let field = |items: Vec<serde_json::Value>, key: &str| -> Vec<String> {
        items
            .iter()
            .filter_map(|v| v[key].as_str().map(str::to_string))
            .collect()
    };
    Some(match super::parse_target(kind).ok()? {
        Target::Resource(k) => c
            .list(k)
            .await
            .ok()?
            .into_iter()
            .map(|o| o.metadata.name)
            .collect(),
        Target::Runs => {
            let q = dispatch_client::RunQuery {
                limit: Some(50),
                ..Default::default()
            };
            c.list_runs(&q)
                .await
                .ok()?
                .into_iter()
                .map(|r| r.id)
                .collect()
        }
        Target::JobExecutions => c
            .list_jobs(None)
            .await
            .ok()?
            .into_iter()
            .map(|j| j.uuid)
            .collect(),
        Target::Tokens => field(c.list_tokens().await.ok()?, "name"),
        Target::Namespaces => field(c.list_namespaces().await.ok()?, "name"),
        // `get versions FUNCTION` completes a function's name.
        Target::Versions => c
            .list(dispatch_core::Kind::Function)
            .await
            .ok()?
            .into_iter()
            .map(|o| o.metadata.name)
            .collect(),
        Target::PulledImages => c
            .pulled_images()
            .await
            .ok()?
            .iter()
            .flat_map(|i| i["references"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect(),
        Target::Events | Target::Audit => Vec::new(),
    })
}
