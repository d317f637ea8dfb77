//! The gateway's route table: endpoints compiled into patterns matched by host, method and
//! path. Changed one endpoint at a time (routes are shared `Arc`s, so a change costs a sort
//! and a re-index, not a reload of every endpoint) and swapped whole (no lock is held while a
//! request runs).
//!
//! Lookup does not scan the table: routes are indexed by their first literal segment, so a
//! request only looks at the routes of its first path segment plus the few whose first
//! segment is a parameter (or that match every path), in precedence order.

use std::collections::HashMap;
use std::sync::Arc;

use dispatch_core::{EndpointSpec, Kind, Object};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Param(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub endpoint: String,
    pub function: String,
    pub methods: Vec<String>,
    pub cors: bool,
    /// Callers need a developer token of the namespace (`auth: token`).
    pub token: bool,
    /// A streaming handler's chunks go out as server-sent events (`stream: sse`).
    pub sse: bool,
    /// `protocol: websocket`: how its connections are held.
    pub websocket: Option<dispatch_core::WebSocketSettings>,
    hosts: Vec<String>,
    segments: Vec<Seg>,
    /// The pattern ends with `/*` (matches any rest, including nothing).
    prefix: bool,
    /// The pattern as written.
    path: String,
    /// The pattern's shape (parameter names erased).
    shape: String,
}

impl Route {
    /// Precedence order: most specific first, then a stable order so that equal ranks never
    /// flip between changes.
    fn order(&self, other: &Route) -> std::cmp::Ordering {
        other
            .rank()
            .cmp(&self.rank())
            .then_with(|| self.namespace.cmp(&other.namespace))
            .then_with(|| self.endpoint.cmp(&other.endpoint))
            .then_with(|| self.path.cmp(&other.path))
    }
}

/// A matched route with the values of its `{param}` segments.
#[derive(Debug)]
pub struct Match {
    pub route: Arc<Route>,
    pub params: Vec<(String, String)>,
}

#[derive(Debug)]
pub enum Lookup {
    Found(Match),
    /// The path matches but not the method; the route of the best path match.
    MethodNotAllowed(Arc<Route>),
    NotFound,
}

/// The table, changed in place one endpoint at a time (under the state's lock; a lookup holds
/// the read side for well under a microsecond and takes `Arc`s out).
#[derive(Debug, Default)]
pub struct Routes {
    /// First literal segment → its routes, most specific first.
    by_first: HashMap<String, Vec<Arc<Route>>>,
    /// Routes whose first segment is not a literal (a parameter, or no segment at all).
    wild: Vec<Arc<Route>>,
    /// Path shape → routes (conflict checks).
    by_shape: HashMap<String, Vec<Arc<Route>>>,
    /// Endpoint (namespace, name) → its routes.
    by_endpoint: HashMap<(String, String), Vec<Arc<Route>>>,
}

fn parse_pattern(path: &str) -> (Vec<Seg>, bool) {
    let mut segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix = segs.last() == Some(&"*");
    if prefix {
        segs.pop();
    }
    let segments = segs
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(p) => Seg::Param(p.to_string()),
                None => Seg::Lit(s.to_string()),
            },
        )
        .collect();
    (segments, prefix)
}

/// The shape of a path pattern with parameter names erased: two endpoints with the same shape
/// would shadow each other.
fn shape(path: &str) -> String {
    let (segs, prefix) = parse_pattern(path);
    let mut s: String = segs
        .iter()
        .map(|g| match g {
            Seg::Lit(l) => format!("/{l}"),
            Seg::Param(_) => "/{}".to_string(),
        })
        .collect();
    if prefix {
        s.push_str("/*");
    }
    if s.is_empty() { "/".into() } else { s }
}

/// Host header without its port, lower-cased.
fn host_only(host: &str) -> String {
    let h = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    h.to_ascii_lowercase()
}

impl Route {
    fn match_path(&self, path: &str) -> Option<Vec<(String, String)>> {
        let parts: Vec<&str> = path
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if parts.len() < self.segments.len() || (!self.prefix && parts.len() != self.segments.len())
        {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Seg::Lit(l) if l == part => {}
                Seg::Lit(_) => return None,
                Seg::Param(p) => params.push((p.clone(), (*part).to_string())),
            }
        }
        Some(params)
    }

    fn match_host(&self, host: Option<&str>) -> bool {
        self.hosts.is_empty() || host.is_some_and(|h| self.hosts.iter().any(|x| *x == host_only(h)))
    }

    /// Higher is more specific: host-bound, then exact (not prefix), then literal segments.
    fn rank(&self) -> (bool, bool, usize, usize) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Seg::Lit(_)))
            .count();
        (
            !self.hosts.is_empty(),
            !self.prefix,
            self.segments.len(),
            literals,
        )
    }
}

/// The routes of one endpoint (none when its spec is invalid: its status says why).
fn compile(o: &Object) -> Vec<Arc<Route>> {
    let Ok(spec) = o.typed_spec::<EndpointSpec>() else {
        return Vec::new();
    };
    spec.paths
        .iter()
        .map(|p| {
            let (segments, prefix) = parse_pattern(p);
            Arc::new(Route {
                namespace: o.namespace().to_string(),
                endpoint: o.name().to_string(),
                function: spec.function.clone(),
                methods: spec.methods.clone(),
                cors: spec.cors,
                token: spec.needs_token(),
                sse: spec.stream.as_deref() == Some("sse"),
                websocket: spec.websocket(),
                hosts: spec.hosts.clone(),
                segments,
                prefix,
                path: p.clone(),
                shape: shape(p),
            })
        })
        .collect()
}

/// Inserts `r` into a list kept in precedence order.
fn insert_sorted(list: &mut Vec<Arc<Route>>, r: Arc<Route>) {
    let at = list.partition_point(|x| x.order(&r).is_lt());
    list.insert(at, r);
}

/// Removes `r` (by identity) from the list under `key`, dropping the key when it empties.
fn remove_from(map: &mut HashMap<String, Vec<Arc<Route>>>, key: &str, r: &Arc<Route>) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|x| !Arc::ptr_eq(x, r));
        if list.is_empty() {
            map.remove(key);
        }
    }
}

impl Routes {
    /// Compiles stored endpoints; ones with an invalid spec are skipped (their status says why).
    pub fn build(endpoints: &[Object]) -> Routes {
        let mut table = Routes::default();
        for o in endpoints.iter().filter(|o| o.kind == Kind::Endpoint) {
            table.set_endpoint(o.namespace(), o.name(), Some(o));
        }
        table
    }

    /// Replaces endpoint `namespace/name` by `endpoint` (removes it when `None`). Costs the
    /// endpoint's own routes, whatever the size of the table.
    pub fn set_endpoint(&mut self, namespace: &str, name: &str, endpoint: Option<&Object>) {
        let key = (namespace.to_string(), name.to_string());
        for r in self.by_endpoint.remove(&key).unwrap_or_default() {
            match r.segments.first() {
                Some(Seg::Lit(l)) => remove_from(&mut self.by_first, l, &r),
                _ => self.wild.retain(|x| !Arc::ptr_eq(x, &r)),
            }
            remove_from(&mut self.by_shape, &r.shape, &r);
        }
        let Some(o) = endpoint.filter(|o| o.kind == Kind::Endpoint) else {
            return;
        };
        let routes = compile(o);
        if routes.is_empty() {
            return;
        }
        for r in &routes {
            match r.segments.first() {
                Some(Seg::Lit(l)) => {
                    insert_sorted(self.by_first.entry(l.clone()).or_default(), r.clone())
                }
                _ => insert_sorted(&mut self.wild, r.clone()),
            }
            self.by_shape
                .entry(r.shape.clone())
                .or_default()
                .push(r.clone());
        }
        self.by_endpoint.insert(key, routes);
    }

    pub fn len(&self) -> usize {
        self.by_endpoint.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    /// The most specific route for a request (routes are kept sorted by specificity).
    pub fn find(&self, host: Option<&str>, method: &str, path: &str) -> Lookup {
        let first = path.split('/').find(|s| !s.is_empty());
        let literal = first
            .and_then(|f| self.by_first.get(f))
            .map_or(&[][..], Vec::as_slice);
        let mut path_only: Option<&Arc<Route>> = None;
        for r in merged(literal, &self.wild) {
            if !r.match_host(host) {
                continue;
            }
            let Some(params) = r.match_path(path) else {
                continue;
            };
            if r.methods.iter().any(|m| m == method) {
                return Lookup::Found(Match {
                    route: r.clone(),
                    params,
                });
            }
            path_only.get_or_insert(r);
        }
        match path_only {
            Some(r) => Lookup::MethodNotAllowed(r.clone()),
            None => Lookup::NotFound,
        }
    }
}

/// Two lists in precedence order merged into one sequence in precedence order.
fn merged<'a>(
    a: &'a [Arc<Route>],
    b: &'a [Arc<Route>],
) -> impl Iterator<Item = &'a Arc<Route>> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || match (a.get(i), b.get(j)) {
        (Some(x), Some(y)) if x.order(y).is_lt() => {
            i += 1;
            Some(x)
        }
        (_, Some(y)) => {
            j += 1;
            Some(y)
        }
        (Some(x), None) => {
            i += 1;
            Some(x)
        }
        (None, None) => None,
    })
}

impl Routes {
    /// Whether `spec` would take a request another endpoint already takes: same path shape, a
    /// common method, overlapping hosts (no hosts = every host). Returns a message naming it.
    pub fn conflict(&self, spec: &EndpointSpec, me: (&str, &str)) -> Option<String> {
        for p in &spec.paths {
            let Some(same) = self.by_shape.get(&shape(p)) else {
                continue;
            };
            for other in same {
                if (other.namespace.as_str(), other.endpoint.as_str()) == me {
                    continue;
                }
                let hosts_overlap = spec.hosts.is_empty()
                    || other.hosts.is_empty()
                    || spec.hosts.iter().any(|h| other.hosts.contains(h));
                if !hosts_overlap {
                    continue;
                }
                if let Some(m) = spec.methods.iter().find(|m| other.methods.contains(m)) {
                    return Some(format!(
                        "{m} {p} is already routed by endpoint {:?} in namespace {:?} (path {}): choose another path, method or host",
                        other.endpoint, other.namespace, other.path
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(spec: &EndpointSpec, others: &[Object], me: (&str, &str)) -> Option<String> {
        Routes::build(others).conflict(spec, me)
    }

    fn ep(name: &str, methods: &[&str], paths: &[&str], hosts: &[&str]) -> Object {
        let mut o = Object::new(
            Kind::Endpoint,
            "default",
            name,
            serde_json::json!({"function": name, "methods": methods, "paths": paths, "hosts": hosts}),
        );
        o.validate().unwrap();
        o
    }

    fn found(r: &Routes, host: Option<&str>, m: &str, p: &str) -> Option<String> {
        match r.find(host, m, p) {
            Lookup::Found(x) => Some(x.route.endpoint.clone()),
            _ => None,
        }
    }

    #[test]
    fn literal_and_parameter_first_segments_keep_their_precedence() {
        let r = Routes::build(&[
            ep("any", &["GET"], &["/{name}"], &[]),
            ep("hello", &["GET"], &["/hello"], &[]),
            ep("all", &["GET"], &["/*"], &[]),
            ep("deep", &["GET"], &["/{a}/b"], &[]),
        ]);
        assert_eq!(found(&r, None, "GET", "/hello").as_deref(), Some("hello"));
        assert_eq!(found(&r, None, "GET", "/other").as_deref(), Some("any"));
        assert_eq!(found(&r, None, "GET", "/hello/b").as_deref(), Some("deep"));
        assert_eq!(found(&r, None, "GET", "/x/y/z").as_deref(), Some("all"));
        assert_eq!(found(&r, None, "GET", "/").as_deref(), Some("all"));
    }

    #[test]
    fn one_endpoint_changes_without_touching_the_others() {
        let many: Vec<Object> = (0..1000)
            .map(|i| ep(&format!("f{i}"), &["GET"], &[&format!("/f{i}")], &[]))
            .collect();
        let mut r = Routes::build(&many);
        assert_eq!(found(&r, None, "GET", "/f999").as_deref(), Some("f999"));
        let moved = ep("f5", &["GET"], &["/moved"], &[]);
        r.set_endpoint("default", "f5", Some(&moved));
        assert_eq!(found(&r, None, "GET", "/moved").as_deref(), Some("f5"));
        assert_eq!(found(&r, None, "GET", "/f5"), None);
        assert_eq!(r.len(), 1000);
        let spec: EndpointSpec = moved.typed_spec().unwrap();
        assert!(r.conflict(&spec, ("default", "x")).is_some());
        r.set_endpoint("default", "f5", None);
        assert_eq!(r.len(), 999);
        assert_eq!(found(&r, None, "GET", "/moved"), None);
        assert!(r.conflict(&spec, ("default", "x")).is_none());
        assert_eq!(r.by_first.len(), 999, "emptied buckets are dropped");
    }

    #[test]
    fn exact_params_prefix_and_precedence() {
        let r = Routes::build(&[
            ep("hello", &["GET", "POST"], &["/hello"], &[]),
            ep("user", &["GET"], &["/users/{id}"], &[]),
            ep("me", &["GET"], &["/users/me"], &[]),
            ep("api", &["GET"], &["/api/*"], &[]),
            ep("hosted", &["GET"], &["/hello"], &["example.com"]),
        ]);
        assert_eq!(found(&r, None, "GET", "/hello").as_deref(), Some("hello"));
        assert_eq!(
            found(&r, Some("example.com:8081"), "GET", "/hello").as_deref(),
            Some("hosted")
        );
        assert_eq!(
            found(&r, Some("example.com"), "POST", "/hello").as_deref(),
            Some("hello")
        );
        assert_eq!(found(&r, None, "GET", "/users/me").as_deref(), Some("me"));
        assert_eq!(found(&r, None, "GET", "/users/42").as_deref(), Some("user"));
        match r.find(None, "GET", "/users/42") {
            Lookup::Found(m) => assert_eq!(m.params, vec![("id".to_string(), "42".to_string())]),
            other => panic!("{other:?}"),
        }
        assert_eq!(found(&r, None, "GET", "/api").as_deref(), Some("api"));
        assert_eq!(found(&r, None, "GET", "/api/a/b").as_deref(), Some("api"));
        assert!(matches!(
            r.find(None, "DELETE", "/hello"),
            Lookup::MethodNotAllowed(_)
        ));
        assert!(matches!(r.find(None, "GET", "/nope"), Lookup::NotFound));
        assert!(matches!(
            r.find(None, "GET", "/users/1/x"),
            Lookup::NotFound
        ));
    }

    #[test]
    fn conflicts_need_same_shape_method_and_host() {
        let existing = [ep("a", &["GET"], &["/u/{id}"], &[])];
        let spec = |o: Object| o.typed_spec::<EndpointSpec>().unwrap();
        let c = conflict(
            &spec(ep("b", &["GET", "POST"], &["/u/{name}"], &[])),
            &existing,
            ("default", "b"),
        );
        assert!(c.unwrap().contains("endpoint \"a\""));
        assert!(
            conflict(
                &spec(ep("b", &["POST"], &["/u/{name}"], &[])),
                &existing,
                ("default", "b")
            )
            .is_none()
        );
        assert!(
            conflict(
                &spec(ep("b", &["GET"], &["/v/{id}"], &[])),
                &existing,
                ("default", "b")
            )
            .is_none()
        );
        // Updating itself is not a conflict.
        assert!(
            conflict(
                &spec(ep("a", &["GET"], &["/u/{id}"], &[])),
                &existing,
                ("default", "a")
            )
            .is_none()
        );
        let hosted = [ep("h", &["GET"], &["/x"], &["a.com"])];
        assert!(
            conflict(
                &spec(ep("b", &["GET"], &["/x"], &["b.com"])),
                &hosted,
                ("default", "b")
            )
            .is_none()
        );
        assert!(
            conflict(
                &spec(ep("b", &["GET"], &["/x"], &[])),
                &hosted,
                ("default", "b")
            )
            .is_some()
        );
    }
}
