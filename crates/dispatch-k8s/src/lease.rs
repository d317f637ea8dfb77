//! Leader election with a `coordination.k8s.io/v1` Lease: of the servers of
//! one installation, only the holder of the Lease runs the cron scheduler, so that a fire
//! happens once however many servers run. A server takes the Lease when it is free or its
//! holder stopped renewing it for `duration`, renews it every `renew_every`, and stops
//! counting itself leader as soon as a renewal fails.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who this server is (its pod's name).
    pub holder: String,
    /// How long a Lease not renewed keeps its holder.
    pub duration: Duration,
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, holder: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: "dispatch-scheduler".into(),
            holder: holder.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One look at the Lease at `now`: take it when it is free or expired, renew it when it is
/// ours. Returns whether this server holds it. Losing a race (409) is not an error.
pub async fn step(
    client: &kube::Client,
    cfg: &LeaseConfig,
    now: jiff::Timestamp,
) -> Result<bool, kube::Error> {
    let api = Api::<Lease>::namespaced(client.clone(), &cfg.namespace);
    let duration = cfg.duration.as_secs() as i32;
    let Some(current) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.holder.clone()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(duration),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    let mine = spec.holder_identity.as_deref() == Some(cfg.holder.as_str());
    let held_for = spec
        .lease_duration_seconds
        .map_or(cfg.duration, |s| Duration::from_secs(s.max(0) as u64));
    let expired = match &spec.renew_time {
        Some(MicroTime(renewed)) => renewed
            .checked_add(jiff::SignedDuration::try_from(held_for).unwrap_or_default())
            .map_or(true, |until| until < now),
        None => true,
    };
    if !mine && !expired && spec.holder_identity.is_some() {
        return Ok(false);
    }
    let mut next = current;
    let s = next.spec.get_or_insert_with(Default::default);
    if !mine {
        s.holder_identity = Some(cfg.holder.clone());
        s.acquire_time = Some(MicroTime(now));
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.renew_time = Some(MicroTime(now));
    s.lease_duration_seconds = Some(duration);
    // The resourceVersion read above makes this a compare-and-swap: two servers taking an
    // expired Lease at once cannot both win.
    match api.replace(&cfg.name, &PostParams::default(), &next).await {
        Ok(_) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps trying to lead until the returned receiver is dropped; it says whether this server
/// leads now.
pub fn spawn(client: kube::Client, cfg: LeaseConfig) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let leads = match step(&client, &cfg, jiff::Timestamp::now()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(lease = %cfg.name, "leader election: {e}");
                    false
                }
            };
            if tx.send_replace(leads) != leads {
                tracing::info!(lease = %cfg.name, holder = %cfg.holder, leads, "leadership changed");
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(cfg.renew_every).await;
        }
    });
    rx
}
