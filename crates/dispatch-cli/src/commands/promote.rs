//! `dispatch promote FUNCTION --alias A --to N [--step 10% --every 1m --until-errors 1%]`:
//! writes a promotion on the alias; the server moves `--step` more of its traffic to version N
//! every `--every` and, when N's error rate in its run records passes `--until-errors`, puts
//! the traffic back as it was. `--wait` follows it to its end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use dispatch_core::Kind;
use dispatch_core::versions::{AliasSpec, Promotion, alias_object_name};

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Move an alias's traffic to a version step by step, rolled back on errors
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    dispatch create alias hello prod --version 3\n  \
    dispatch promote hello --alias prod --to 4 --step 10% --every 1m --until-errors 1%\n  \
    dispatch get alias hello.prod       # TRAFFIC and the promotion's progress\n  \
    dispatch promote hello --alias prod --to 4 --wait   # follow it; exits 1 if it was rolled back")]
pub struct Promote {
    /// The function
    pub function: String,
    /// The alias whose traffic moves
    #[arg(long)]
    pub alias: String,
    /// The version traffic moves to
    #[arg(long)]
    pub to: u32,
    /// Share added per step, in percent (e.g. 10%)
    #[arg(long, default_value = "10%")]
    pub step: String,
    /// Time between steps (e.g. 30s, 1m; at least 1s)
    #[arg(long, default_value = "1m")]
    pub every: String,
    /// Error rate of the new version (percent of its calls since the promotion began) past
    /// which the promotion stops and the traffic goes back
    #[arg(long = "until-errors", default_value = "1%")]
    pub until_errors: String,
    /// Calls the new version must have answered before its error rate is judged
    #[arg(long, default_value_t = 20)]
    pub min_calls: u32,
    /// Wait until the promotion ends (exit 1 when it was rolled back)
    #[arg(long)]
    pub wait: bool,
    /// Output format
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

fn percent(flag: &str, v: &str) -> Result<f64> {
    match v.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => bail!("{flag} {v:?} is not a percentage between 0% and 100% (e.g. 10%)"),
    }
}

impl Promote {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let step = percent("--step", &self.step)?;
        if step < 1.0 || step.fract() != 0.0 {
            bail!(
                "--step {:?} must be a whole percentage from 1% to 100%",
                self.step
            );
        }
        let max_error_rate = percent("--until-errors", &self.until_errors)?;
        dispatch_core::duration::parse_duration(&self.every)
            .map_err(|e| anyhow::anyhow!("--every {:?}: {e}", self.every))?;
        let name = alias_object_name(&self.function, &self.alias);
        let mut o = c.get(Kind::Alias, &name).await?;
        let mut spec: AliasSpec = o.typed_spec()?;
        spec.promotion = Some(Promotion {
            to: self.to,
            step: step as u32,
            every: self.every.clone(),
            max_error_rate,
            min_calls: self.min_calls,
            started_at: None,
            from: Vec::new(),
        });
        o.spec = serde_json::to_value(&spec)?;
        let stored = c.update(&o).await?;
        if !self.wait {
            match self.output {
                Format::Table | Format::Wide => println!(
                    "alias/{name}: promoting to version {} ({}% every {}, rolled back above {}% errors)",
                    self.to, step, self.every, max_error_rate
                ),
                f => print_structured(&stored, f)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        // Follow it: one line per change of traffic, until the promotion is gone.
        let every = dispatch_core::duration::parse_duration(&self.every)?;
        let deadline = Instant::now() + every * (100 / step as u32 + 3) + Duration::from_secs(60);
        let mut last = String::new();
        loop {
            let o = c.get(Kind::Alias, &name).await?;
            let spec: AliasSpec = o.typed_spec()?;
            let traffic = spec
                .traffic
                .iter()
                .map(|t| format!("{}={}%", t.version, t.percent))
                .collect::<Vec<_>>()
                .join(",");
            if traffic != last {
                eprintln!("alias/{name}: {traffic}");
                last = traffic;
            }
            if spec.promotion.is_none() {
                let rolled_back = o.status.reason.contains("stopped");
                match self.output {
                    Format::Table | Format::Wide => println!("alias/{name}: {}", o.status.reason),
                    f => print_structured(&o, f)?,
                }
                return Ok(if rolled_back {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "the promotion of alias/{name} did not end in time: see `dispatch get alias {name}`"
                );
            }
            tokio::time::sleep(Duration::from_millis(200).min(every / 2)).await;
        }
    }
}
