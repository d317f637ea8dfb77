//! NATS drivers: a core NATS subscription (at most once) or a JetStream durable pull
//! consumer (`config.stream`: ack after storing, nak with a delay under back-pressure).

use std::sync::Arc;
use std::time::Duration;

use dispatch_core::Phase;
use dispatch_core::events::EventDriverSpec;
use futures_util::StreamExt;

use super::{Backoff, failed, handle, offer, passes, set_state};
use crate::state::AppState;

pub(super) async fn run_nats(
    state: Arc<AppState>,
    ns: String,
    name: String,
    spec: EventDriverSpec,
) {
    let url = spec.config.get("url").cloned().unwrap_or_default();
    let subject = spec.config.get("subject").cloned().unwrap_or_default();
    let mut backoff = Backoff::new();
    loop {
        let st = state.clone();
        let (cns, cname) = (ns.clone(), name.clone());
        let opts = async_nats::ConnectOptions::new().event_callback(move |ev| {
            let (st, ns, name) = (st.clone(), cns.clone(), cname.clone());
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        set_state(&st, &ns, &name, Phase::Connected, String::new()).await
                    }
                    async_nats::Event::Disconnected => {
                        set_state(
                            &st,
                            &ns,
                            &name,
                            Phase::Error,
                            "disconnected from the NATS server; reconnecting".into(),
                        )
                        .await
                    }
                    _ => {}
                }
            }
        });
        let client = match opts.connect(url.as_str()).await {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot connect to {url}: {e}");
                failed(&state, (&ns, &name), reason, &mut backoff).await;
                continue;
            }
        };
        if let Some(stream) = spec.config.get("stream") {
            let reason = match run_jetstream(&state, (&ns, &name), &spec, client, stream).await {
                Ok(()) => "the JetStream consumer ended; consuming again".to_string(),
                Err(e) => e,
            };
            failed(&state, (&ns, &name), reason, &mut backoff).await;
            continue;
        }
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot subscribe to {subject}: {e}");
                failed(&state, (&ns, &name), reason, &mut backoff).await;
                continue;
            }
        };
        set_state(&state, &ns, &name, Phase::Connected, String::new()).await;
        backoff.reset();
        while let Some(msg) = sub.next().await {
            // Core NATS is at most once: a message refused for good is gone (log only).
            offer(
                &state,
                (&ns, &name),
                &spec,
                msg.subject.as_str(),
                &msg.payload,
                None,
            )
            .await;
        }
        let reason = "the subscription ended; resubscribing".to_string();
        failed(&state, (&ns, &name), reason, &mut backoff).await;
    }
}

/// A JetStream durable pull consumer (`config.stream`, `config.durable`, default
/// `dispatch-NS-NAME`): one message in flight (max_ack_pending 1, so runs are queued in the
/// stream's order), acknowledged only once its event is stored with its deliveries; under
/// back-pressure it is nak'd with a delay (redelivered then, nothing overtakes it). The
/// event id is `STREAM-SEQUENCE`, so a message redelivered after a crash between the commit
/// and the ack is a duplicate that is not delivered twice.
async fn run_jetstream(
    state: &Arc<AppState>,
    driver: (&str, &str),
    spec: &EventDriverSpec,
    client: async_nats::Client,
    stream: &str,
) -> Result<(), String> {
    use async_nats::jetstream::{self, AckKind, consumer};
    let (ns, name) = driver;
    let subject = spec.config.get("subject").cloned().unwrap_or_default();
    let durable = spec
        .config
        .get("durable")
        .cloned()
        .unwrap_or_else(|| format!("dispatch-{ns}-{name}"));
    let js = jetstream::new(client);
    let st = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("JetStream stream {stream:?}: {e}"))?;
    let consumer: consumer::PullConsumer = st
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: subject.clone(),
                ack_policy: consumer::AckPolicy::Explicit,
                // A message unacknowledged this long (its server died) comes again; the
                // ingest it waits for takes milliseconds (back-pressure is a nak).
                ack_wait: Duration::from_secs(5),
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("JetStream consumer {durable:?} on {stream:?}: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consuming {durable:?}: {e}"))?;
    set_state(state, ns, name, Phase::Connected, String::new()).await;
    let mut backoff = Backoff::new();
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| format!("JetStream consumer {durable:?}: {e}"))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        let id = format!("{stream}-{seq}");
        match handle(
            state,
            ns,
            name,
            spec,
            m.subject.as_str(),
            &m.payload,
            Some(id),
        )
        .await
        {
            Ok(()) => {
                backoff.reset();
                m.ack()
                    .await
                    .map_err(|e| format!("acknowledging {stream} #{seq}: {e}"))?;
            }
            Err(e) if passes(&e) => {
                tracing::debug!(driver = %name, "JetStream message {seq} waits: {}", e);
                m.ack_with(AckKind::Nak(Some(backoff.next())))
                    .await
                    .map_err(|e| format!("nak of {stream} #{seq}: {e}"))?;
            }
            Err(e) => {
                tracing::warn!(driver = %name, "JetStream message {seq} refused: {}", e);
                m.ack_with(AckKind::Term)
                    .await
                    .map_err(|e| format!("terminating {stream} #{seq}: {e}"))?;
            }
        }
    }
    Ok(())
}
