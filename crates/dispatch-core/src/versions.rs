//! Function versions, aliases and traffic (issue 23): every build of a function that reached
//! READY with a new digest is kept as an immutable, numbered version — what it was made of, who
//! made it and when — so that `dispatch get versions` shows what ran, `dispatch rollback`
//! returns to it and `hello@3` calls it; an alias (`hello@prod`) splits calls between versions
//! by weight, and a promotion moves the weight step by step.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::names::validate_name;

/// Versions kept per function unless `spec.keepVersions` says otherwise (older ones are
/// removed as new ones come, unless an alias or an endpoint names them).
pub const KEEP_VERSIONS: usize = 10;

/// One build of a function, numbered from 1 in the order they first became READY.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionVersion {
    pub namespace: String,
    pub function: String,
    pub version: u32,
    /// The function digest (image + source + handler + settings): one version per digest.
    pub digest: String,
    /// The function's spec that built it (its source archive's digest included): what a
    /// rollback writes back.
    pub spec: serde_json::Value,
    /// The function's generation whose spec this was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// When it first became READY.
    pub created_at: Timestamp,
    /// Who wrote the spec that built it (the API token's name; absent when auth is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// Most versions a function may keep (`spec.keepVersions`).
pub const MAX_KEEP_VERSIONS: u32 = 100;

/// Which build of a function a call goes to: `hello` (the one deployed now), `hello@3` (a
/// version), `hello@prod` (an alias, which names versions with weights).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Latest,
    Version(u32),
    Alias(String),
}

/// A function reference as endpoints, subscriptions, event drivers and callers write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub function: String,
    pub selector: Selector,
}

/// The alias name every function has: the build deployed now.
pub const LATEST: &str = "latest";

impl Target {
    /// Parses `function`, `function@N` or `function@alias` (`function@latest` is `function`).
    pub fn parse(s: &str) -> Result<Target, ValidationError> {
        let (function, selector) = match s.split_once('@') {
            None => (s, Selector::Latest),
            Some((f, rest)) => {
                let selector = if rest == LATEST {
                    Selector::Latest
                } else if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                    match rest.parse::<u32>() {
                        Ok(n) if n > 0 => Selector::Version(n),
                        _ => {
                            return Err(ValidationError::new(format!(
                                "{s:?} names version {rest}: versions are numbered from 1 \
                                 (`dispatch get versions {f}`)"
                            )));
                        }
                    }
                } else {
                    validate_name("alias", rest).map_err(|e| {
                        ValidationError::new(format!(
                            "{s:?}: after '@' comes a version number or an alias: {}",
                            e.message
                        ))
                    })?;
                    Selector::Alias(rest.to_string())
                };
                (f, selector)
            }
        };
        validate_name("function", function)?;
        Ok(Target {
            function: function.to_string(),
            selector,
        })
    }

    /// The stored name of the alias this target names, if it names one.
    pub fn alias_object(&self) -> Option<String> {
        match &self.selector {
            Selector::Alias(a) => Some(alias_object_name(&self.function, a)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.selector {
            Selector::Latest => f.write_str(&self.function),
            Selector::Version(n) => write!(f, "{}@{n}", self.function),
            Selector::Alias(a) => write!(f, "{}@{a}", self.function),
        }
    }
}

/// Checks a function reference (`what` names the field), as [`Target::parse`].
pub fn validate_target(s: &str) -> Result<(), ValidationError> {
    Target::parse(s).map(|_| ())
}

/// The name an alias is stored under: `function.alias` (both DNS labels, so the dot is
/// unambiguous, and the pair is a valid Kubernetes object name).
pub fn alias_object_name(function: &str, alias: &str) -> String {
    format!("{function}.{alias}")
}

/// The name under which a version deployed beside the function's current build is known to
/// the backend: `function@N`, which no function name can be.
pub fn deploy_name(function: &str, version: u32) -> String {
    format!("{function}@{version}")
}

/// The function and version of a [`deploy_name`]; a plain function name has no version.
pub fn split_deploy_name(name: &str) -> (&str, Option<u32>) {
    match name.split_once('@') {
        Some((f, v)) => (f, v.parse().ok()),
        None => (name, None),
    }
}

/// One version's share of an alias's calls.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficTarget {
    /// A version of the function (`dispatch get versions FUNCTION`).
    pub version: u32,
    /// Its share of calls in percent (all of an alias's add up to 100).
    pub percent: u32,
}

/// A gradual move of an alias's traffic to one version (`dispatch promote`): `step` percent
/// more every `every`, undone when the new version's error rate (from its run records since
/// the promotion began) passes `maxErrorRate` percent.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Promotion {
    /// The version traffic moves to.
    pub to: u32,
    /// Percent added per step (1–100, default 10).
    #[serde(default = "default_step")]
    pub step: u32,
    /// Time between steps (default 1m, at least 1s).
    #[serde(default = "default_every")]
    pub every: String,
    /// Error rate of the new version, in percent, above which the promotion stops and the
    /// alias goes back to where it was (default 1).
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Calls the new version must have answered before its error rate is judged (default 20):
    /// one failure of the first two calls is not a 50 % error rate.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    /// When it began (set by the server when the promotion is written).
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// The traffic before it began, which an aborted promotion restores (set by the server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<TrafficTarget>,
}

fn default_step() -> u32 {
    10
}
fn default_every() -> String {
    "1m".into()
}
fn default_max_error_rate() -> f64 {
    1.0
}
fn default_min_calls() -> u32 {
    20
}

/// A named pointer to versions of a function: `hello@prod`. Stored as `hello.prod`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AliasSpec {
    /// The function (same namespace); taken from the name (`function.alias`) when absent.
    #[serde(default)]
    pub function: String,
    /// Shorthand for all traffic to one version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Versions and their shares of calls (percent, adding up to 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
    /// A promotion under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

impl AliasSpec {
    /// Splits an alias's stored name into its function and alias parts.
    pub fn split_name(name: &str) -> Result<(&str, &str), ValidationError> {
        let hint = "an alias is named FUNCTION.ALIAS (`dispatch create alias hello prod` stores hello.prod)";
        let Some((f, a)) = name.split_once('.') else {
            return Err(ValidationError::new(format!(
                "alias name {name:?} has no '.': {hint}"
            )));
        };
        validate_name("function", f)?;
        validate_name("alias", a)?;
        if a == LATEST || a.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::new(format!(
                "alias {a:?} cannot be named so: `{f}@{a}` already means {}",
                if a == LATEST {
                    "the build deployed now"
                } else {
                    "a version"
                }
            )));
        }
        Ok((f, a))
    }

    /// Fills the function from the name, folds `version` into `traffic` and checks it.
    pub fn normalize(mut self, name: &str) -> Result<AliasSpec, ValidationError> {
        let (f, _) = AliasSpec::split_name(name)?;
        if self.function.is_empty() {
            self.function = f.to_string();
        }
        if self.function != f {
            return Err(ValidationError::new(format!(
                "alias {name:?} is named for function {f:?} but its spec.function is {:?}",
                self.function
            )));
        }
        if let Some(v) = self.version.take() {
            if !self.traffic.is_empty() {
                return Err(ValidationError::new(
                    "give an alias either version or traffic, not both",
                ));
            }
            self.traffic = vec![TrafficTarget {
                version: v,
                percent: 100,
            }];
        }
        check_traffic(&self.traffic)?;
        self.traffic.sort_by_key(|t| t.version);
        if let Some(p) = &mut self.promotion {
            if p.to == 0 {
                return Err(ValidationError::new(
                    "promotion.to names no version: versions are numbered from 1",
                ));
            }
            if !(1..=100).contains(&p.step) {
                return Err(ValidationError::new(format!(
                    "promotion step {}% is not between 1% and 100%",
                    p.step
                )));
            }
            let every = crate::duration::parse_duration(&p.every)
                .map_err(|e| ValidationError::new(format!("promotion every {:?}: {e}", p.every)))?;
            // Each step reads the new version's run records since the promotion began.
            if every < std::time::Duration::from_secs(1) {
                return Err(ValidationError::new(format!(
                    "promotion every {:?} is shorter than 1s: each step measures the new \
                     version's run records",
                    p.every
                )));
            }
            if !(0.0..=100.0).contains(&p.max_error_rate) || p.max_error_rate.is_nan() {
                return Err(ValidationError::new(format!(
                    "promotion maxErrorRate {} is not a percentage between 0 and 100",
                    p.max_error_rate
                )));
            }
            if !p.from.is_empty() {
                check_traffic(&p.from)?;
            }
        }
        Ok(self)
    }

    /// The version a hash point in `0..100` lands on (versions in ascending order, each
    /// taking its percent of the range).
    pub fn pick(&self, point: u32) -> Option<u32> {
        let mut upto = 0;
        for t in &self.traffic {
            upto += t.percent;
            if point < upto {
                return Some(t.version);
            }
        }
        self.traffic.last().map(|t| t.version)
    }

    /// Versions it sends calls to (a promotion's target included), in order, once each.
    pub fn versions(&self) -> Vec<u32> {
        let live = self.traffic.iter().filter(|t| t.percent > 0);
        sorted(
            live.map(|t| t.version)
                .chain(self.promotion.iter().map(|p| p.to)),
        )
    }

    /// Every version it names — those it sends calls to and those an aborted promotion would
    /// return to —, in order, once each: what must exist, and what the function keeps.
    pub fn named_versions(&self) -> Vec<u32> {
        let from = self.promotion.iter().flat_map(|p| p.from.iter());
        sorted(self.versions().into_iter().chain(from.map(|t| t.version)))
    }
}

fn sorted(versions: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = versions.collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn check_traffic(traffic: &[TrafficTarget]) -> Result<(), ValidationError> {
    if traffic.is_empty() {
        return Err(ValidationError::new(
            "an alias needs a version (--version 3) or traffic (--traffic 3=90,4=10)",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in traffic {
        if t.version == 0 {
            return Err(ValidationError::new(
                "traffic names version 0: versions are numbered from 1",
            ));
        }
        if !seen.insert(t.version) {
            return Err(ValidationError::new(format!(
                "traffic names version {} twice",
                t.version
            )));
        }
    }
    let sum: u64 = traffic.iter().map(|t| u64::from(t.percent)).sum();
    if sum != 100 {
        return Err(ValidationError::new(format!(
            "traffic adds up to {sum}%, not 100%: e.g. --traffic 3=90,4=10"
        )));
    }
    Ok(())
}

/// Parses `--traffic 3=90,4=10`.
pub fn parse_traffic(s: &str) -> Result<Vec<TrafficTarget>, ValidationError> {
    s.split(',')
        .map(|part| {
            let (v, p) = part.trim().split_once('=').ok_or_else(|| {
                ValidationError::new(format!(
                    "traffic {part:?} is not VERSION=PERCENT (e.g. 3=90,4=10)"
                ))
            })?;
            let version = v.trim().parse().map_err(|_| {
                ValidationError::new(format!("traffic {part:?}: {v:?} is not a version number"))
            })?;
            let percent = p.trim().trim_end_matches('%').parse().map_err(|_| {
                ValidationError::new(format!("traffic {part:?}: {p:?} is not a percentage"))
            })?;
            Ok(TrafficTarget { version, percent })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_a_function_a_version_or_an_alias() {
        let t = |s: &str| Target::parse(s).map(|t| (t.function, t.selector));
        assert_eq!(t("hello").unwrap(), ("hello".into(), Selector::Latest));
        assert_eq!(
            t("hello@latest").unwrap(),
            ("hello".into(), Selector::Latest)
        );
        assert_eq!(
            t("hello@3").unwrap(),
            ("hello".into(), Selector::Version(3))
        );
        assert_eq!(
            t("hello@prod").unwrap(),
            ("hello".into(), Selector::Alias("prod".into()))
        );
        assert_eq!(
            Target::parse("hello@prod").unwrap().to_string(),
            "hello@prod"
        );
        for bad in [
            "",
            "@3",
            "hello@",
            "hello@0",
            "hello@99999999999",
            "Hello@1",
            "hello@Prod",
            "hello@a@b",
            "hello@-x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_deploy_name(&deploy_name("hello", 3)),
            ("hello", Some(3))
        );
        assert_eq!(split_deploy_name("hello"), ("hello", None));
    }

    #[test]
    fn aliases_are_checked_and_normalized() {
        let spec = |v: serde_json::Value| serde_json::from_value::<AliasSpec>(v).unwrap();
        let a = spec(serde_json::json!({"version": 3}))
            .normalize("hello.prod")
            .unwrap();
        assert_eq!(
            (a.function.as_str(), a.version, a.traffic.len()),
            ("hello", None, 1)
        );
        assert_eq!(a.pick(99), Some(3));
        let a = spec(serde_json::json!({"traffic": [{"version": 4, "percent": 10}, {"version": 3, "percent": 90}]}))
            .normalize("hello.prod")
            .unwrap();
        assert_eq!(
            (a.pick(0), a.pick(89), a.pick(90), a.pick(99)),
            (Some(3), Some(3), Some(4), Some(4))
        );
        for (name, v, why) in [
            ("hello", serde_json::json!({"version": 1}), "no '.'"),
            (
                "hello.latest",
                serde_json::json!({"version": 1}),
                "cannot be named",
            ),
            (
                "hello.7",
                serde_json::json!({"version": 1}),
                "cannot be named",
            ),
            (
                "hello.prod",
                serde_json::json!({"function": "bye", "version": 1}),
                "spec.function",
            ),
            ("hello.prod", serde_json::json!({}), "needs a version"),
            ("hello.prod", serde_json::json!({"version": 0}), "version 0"),
            (
                "hello.prod",
                serde_json::json!({"version": 1, "traffic": [{"version": 1, "percent": 100}]}),
                "not both",
            ),
            (
                "hello.prod",
                serde_json::json!({"traffic": [{"version": 1, "percent": 50}]}),
                "50%",
            ),
            (
                "hello.prod",
                serde_json::json!({"version": 1, "promotion": {"to": 2, "every": "10ms"}}),
                "shorter than 1s",
            ),
            (
                "hello.prod",
                serde_json::json!({"version": 1, "promotion": {"to": 2, "step": 0}}),
                "step",
            ),
            (
                "hello.prod",
                serde_json::json!({"version": 1, "promotion": {"to": 2, "maxErrorRate": 101.0}}),
                "maxErrorRate",
            ),
        ] {
            let e = spec(v).normalize(name).unwrap_err();
            assert!(e.message.contains(why), "{name}: {e}");
        }
        assert_eq!(
            parse_traffic("3=90, 4=10%").unwrap(),
            vec![
                TrafficTarget {
                    version: 3,
                    percent: 90
                },
                TrafficTarget {
                    version: 4,
                    percent: 10
                }
            ]
        );
        assert!(
            parse_traffic("3:90")
                .unwrap_err()
                .message
                .contains("VERSION=PERCENT")
        );
    }
}
