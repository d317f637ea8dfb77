//! `-o jsonpath=TEMPLATE`, as kubectl reads it: text printed as is, and in braces a path
//! (`{.metadata.name}`, `{.items[*].status.phase}`, `{@.name}` inside a range), a string
//! (`{"\n"}`), or `{range PATH}…{end}` repeating what is between for each value the path
//! finds. Paths are JSONPath (`jsonpath-rust`); a list is `{"kind":"List","items":[…]}`, so
//! `{.items[*].metadata.name}` names every item. Several values print space-separated,
//! strings without quotes, anything else as compact JSON.

use anyhow::{Result, bail};
use jsonpath_rust::JsonPath;
use serde_json::Value;

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Node>);

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Path(String),
    Range(String, Vec<Node>),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template> {
        let mut stack: Vec<(String, Vec<Node>)> = Vec::new();
        let mut nodes = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                nodes.push(Node::Text(rest.to_string()));
                break;
            };
            if open > 0 {
                nodes.push(Node::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                bail!("jsonpath template {text:?}: a '{{' has no '}}'");
            };
            let inner = rest[open + 1..open + close].trim();
            rest = &rest[open + close + 1..];
            if let Some(quoted) = inner.strip_prefix('"') {
                let Some(body) = quoted.strip_suffix('"') else {
                    bail!("jsonpath template {text:?}: {inner} is not a closed string");
                };
                nodes.push(Node::Text(unescape(body)));
            } else if let Some(path) = inner.strip_prefix("range ") {
                stack.push((path.trim().to_string(), std::mem::take(&mut nodes)));
            } else if inner == "end" {
                let Some((path, outer)) = stack.pop() else {
                    bail!("jsonpath template {text:?}: {{end}} without {{range …}}");
                };
                let body = std::mem::replace(&mut nodes, outer);
                nodes.push(Node::Range(path, body));
            } else if inner.is_empty() {
                bail!("jsonpath template {text:?}: an empty {{}}");
            } else {
                nodes.push(Node::Path(inner.to_string()));
            }
        }
        if !stack.is_empty() {
            bail!("jsonpath template {text:?}: a {{range …}} has no {{end}}");
        }
        Ok(Template(nodes))
    }

    /// The template applied to `value`.
    pub fn render(&self, value: &Value) -> Result<String> {
        let mut out = String::new();
        render(&self.0, value, &mut out)?;
        Ok(out)
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n")
        .replace("\\t", "\t")
        .replace("\\\"", "\"")
}

fn find<'a>(path: &str, value: &'a Value) -> Result<Vec<&'a Value>> {
    let query = match path.as_bytes().first() {
        Some(b'.') | Some(b'[') => format!("${path}"),
        Some(b'@') => format!("${}", &path[1..]),
        _ => path.to_string(),
    };
    value
        .query(&query)
        .map_err(|e| anyhow::anyhow!("jsonpath {path:?} is not valid: {e}"))
}

fn render(nodes: &[Node], value: &Value, out: &mut String) -> Result<()> {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Path(p) => {
                let found = find(p, value)?;
                for (i, v) in found.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    match v {
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
            Node::Range(p, body) => {
                for item in find(p, value)? {
                    render(body, item, out)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_ranges_and_strings_render_as_kubectl_does() {
        let list = json!({"kind": "List", "items": [
            {"metadata": {"name": "a"}, "status": {"phase": "READY", "n": 1}},
            {"metadata": {"name": "b"}, "status": {"phase": "ERROR", "n": 2}},
        ]});
        let t = |s: &str| Template::parse(s).unwrap().render(&list).unwrap();
        assert_eq!(t("{.items[*].metadata.name}"), "a b");
        assert_eq!(t("{.items[0].status.n}"), "1");
        assert_eq!(
            t(r#"{range .items[*]}{.metadata.name}={@.status.phase}{"\n"}{end}"#),
            "a=READY\nb=ERROR\n"
        );
        assert_eq!(t("names: {.items[1].metadata.name}!"), "names: b!");
        assert_eq!(t("{.items[0].status}"), r#"{"n":1,"phase":"READY"}"#);
        assert_eq!(t("{.nothing}"), "");
    }

    #[test]
    fn a_broken_template_says_what_is_wrong() {
        for (bad, says) in [
            ("{.a", "has no '}'"),
            ("{range .items[*]}x", "has no {end}"),
            ("x{end}", "without {range"),
            (r#"{"open}"#, "not a closed string"),
            ("{}", "empty"),
        ] {
            let e = Template::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
