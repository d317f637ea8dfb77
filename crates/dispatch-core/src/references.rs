//! Which resources a resource names, read from its typed spec: an image its base image, a
//! function its image and secrets, an endpoint, a subscription or an event driver its
//! function. The controller re-queues dependents with it, a delete refuses what is still
//! named, and no caller looks fields up by string.

use crate::events::{EventDriverSpec, SubscriptionSpec};
use crate::resource::{EndpointSpec, FunctionSpec, ImageSpec, Kind, Object};
use crate::versions::{AliasSpec, Selector, Target};

/// What a function reference (`hello`, `hello@3`, `hello@prod`) names: the function, and the
/// alias when it names one.
fn target_refs(target: &str) -> Vec<(Kind, String)> {
    match Target::parse(target) {
        Ok(t) => {
            let alias = t.alias_object();
            let mut refs = vec![(Kind::Function, t.function)];
            refs.extend(alias.map(|a| (Kind::Alias, a)));
            refs
        }
        // Refused where it is written; as a plain name it still keeps its function.
        Err(_) => vec![(Kind::Function, target.to_string())],
    }
}

impl Object {
    /// The resources (same namespace) this one names, as (kind, name). A spec that does not
    /// parse names nothing (it is refused where it is written).
    pub fn references(&self) -> Vec<(Kind, String)> {
        match self.kind {
            Kind::Image => self
                .typed_spec::<ImageSpec>()
                .map_or_else(|_| Vec::new(), |s| vec![(Kind::BaseImage, s.base_image)]),
            Kind::Function => self.typed_spec::<FunctionSpec>().map_or_else(
                |_| Vec::new(),
                |s| {
                    let mut refs = vec![(Kind::Image, s.image)];
                    refs.extend(s.secrets.into_iter().map(|n| (Kind::Secret, n)));
                    refs
                },
            ),
            Kind::Endpoint => self
                .typed_spec::<EndpointSpec>()
                .map_or_else(|_| Vec::new(), |s| target_refs(&s.function)),
            Kind::Subscription => self
                .typed_spec::<SubscriptionSpec>()
                .map_or_else(|_| Vec::new(), |s| target_refs(&s.function)),
            Kind::EventDriver => self
                .typed_spec::<EventDriverSpec>()
                .ok()
                .and_then(|s| s.function)
                .map_or_else(Vec::new, |f| target_refs(&f)),
            Kind::Alias => self
                .typed_spec::<AliasSpec>()
                .map_or_else(|_| Vec::new(), |s| vec![(Kind::Function, s.function)]),
            Kind::BaseImage | Kind::JobTemplate | Kind::Secret => Vec::new(),
        }
    }

    /// The versions of function `function` this resource names by number (`hello@3`, an
    /// alias's traffic): a version named so is kept past the function's retention count.
    pub fn pinned_versions(&self, function: &str) -> Vec<u32> {
        let target = |t: Option<String>| -> Vec<u32> {
            match t.and_then(|t| Target::parse(&t).ok()) {
                Some(Target {
                    function: f,
                    selector: Selector::Version(n),
                }) if f == function => vec![n],
                _ => Vec::new(),
            }
        };
        match self.kind {
            Kind::Endpoint => target(self.typed_spec::<EndpointSpec>().ok().map(|s| s.function)),
            Kind::Subscription => target(
                self.typed_spec::<SubscriptionSpec>()
                    .ok()
                    .map(|s| s.function),
            ),
            Kind::EventDriver => target(
                self.typed_spec::<EventDriverSpec>()
                    .ok()
                    .and_then(|s| s.function),
            ),
            Kind::Alias => self
                .typed_spec::<AliasSpec>()
                .ok()
                .filter(|s| s.function == function)
                .map(|s| s.named_versions())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Whether this resource names `kind` `name`.
    pub fn refers_to(&self, kind: Kind, name: &str) -> bool {
        self.references()
            .iter()
            .any(|(k, n)| *k == kind && n == name)
    }
}

impl Kind {
    /// The kinds whose resources may name one of this kind, in the order a refused delete
    /// reports them.
    pub fn referrers(self) -> &'static [Kind] {
        match self {
            Kind::BaseImage => &[Kind::Image],
            Kind::Image | Kind::Secret => &[Kind::Function],
            Kind::Function => &[
                Kind::Subscription,
                Kind::EventDriver,
                Kind::Endpoint,
                Kind::Alias,
            ],
            Kind::Alias => &[Kind::Subscription, Kind::EventDriver, Kind::Endpoint],
            Kind::Endpoint | Kind::JobTemplate | Kind::Subscription | Kind::EventDriver => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(kind: Kind, spec: serde_json::Value) -> Object {
        serde_json::from_value(json!({
            "apiVersion": crate::resource::API_VERSION,
            "kind": kind,
            "metadata": {"name": "x"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn every_kind_names_what_its_spec_names() {
        let f = obj(
            Kind::Function,
            json!({"image": "py", "secrets": ["db", "api"], "source": "sha256:00"}),
        );
        assert_eq!(
            f.references(),
            [
                (Kind::Image, "py".to_string()),
                (Kind::Secret, "db".to_string()),
                (Kind::Secret, "api".to_string())
            ]
        );
        assert!(f.refers_to(Kind::Secret, "api") && !f.refers_to(Kind::Image, "api"));
        let i = obj(Kind::Image, json!({"baseImage": "base"}));
        assert_eq!(i.references(), [(Kind::BaseImage, "base".to_string())]);
        let e = obj(
            Kind::Endpoint,
            json!({"function": "f", "methods": ["GET"], "paths": ["/x"]}),
        );
        assert!(e.refers_to(Kind::Function, "f"));
        let d = obj(Kind::EventDriver, json!({"type": "cron", "config": {}}));
        assert!(d.references().is_empty(), "a driver without a function");
        let bad = obj(Kind::Function, json!({"image": 7}));
        assert!(bad.references().is_empty());
        for kind in Kind::ALL {
            for by in kind.referrers() {
                assert_ne!(*by, kind);
            }
        }
    }
}
