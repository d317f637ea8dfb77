//! `dispatch k8s crds`: the CustomResourceDefinitions of every Dispatch kind, as YAML for
//! `kubectl apply -f -`.

use std::process::ExitCode;

use anyhow::Result;

/// Kubernetes helpers (the Kubernetes backend itself is not built yet)
#[derive(Debug, clap::Args)]
pub struct K8s {
    #[command(subcommand)]
    pub what: K8sWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum K8sWhat {
    /// Print the CRDs of every kind (multi-document YAML)
    Crds,
}

impl K8s {
    pub fn run(self) -> Result<ExitCode> {
        match self.what {
            K8sWhat::Crds => {
                let mut out = String::new();
                for crd in dispatch_k8s::crds() {
                    out.push_str("---\n");
                    out.push_str(&serde_saphyr::to_string(&serde_json::to_value(crd)?)?);
                }
                print!("{out}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
