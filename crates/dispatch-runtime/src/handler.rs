//! Handlers: the default handler of a source tree, and the static check that a handler
//! names a file the source has (done when a function is created, so that a typo is a 400, not
//! a build that fails later). Whether the handler imports and is callable is checked when the
//! function is built, by starting a worker.

use dispatch_core::{Language, ValidationError};

use crate::source::SourceFile;

/// How a worker finds the handler: the arguments given to the bootstrap (Python: the
/// `module.function`; Node: the module file and the export; exec: the program path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHandler {
    /// The handler as stored in the spec (the default filled in when none was given).
    pub handler: String,
    pub args: Vec<String>,
}

/// Resolves `handler` (or the default when `None`) against the files of a source archive.
pub fn resolve(
    language: Language,
    handler: Option<&str>,
    files: &[SourceFile],
) -> Result<ResolvedHandler, ValidationError> {
    let handler = match handler {
        Some(h) => h.to_string(),
        None => default_handler(language, files)?,
    };
    let has = |p: &str| files.iter().any(|f| f.path == p);
    let listing = || {
        let mut names: Vec<&str> = files.iter().map(|f| f.path.as_str()).take(10).collect();
        if files.len() > 10 {
            names.push("…");
        }
        names.join(", ")
    };
    match language {
        Language::Python3 => {
            // Dispatch's path forms: `./hello.py`, `hello.py`, `./lib/util.py` name the
            // module's file; its `handle` is the function.
            let path = handler.trim_start_matches("./");
            let handler = match path.strip_suffix(".py") {
                Some(stem) if has(path) => format!("{}.handle", stem.replace('/', ".")),
                _ => handler,
            };
            let Some((module, func)) = handler.rsplit_once('.') else {
                return Err(ValidationError::new(format!(
                    "handler {handler:?} must look like module.function (for example hello.handle)"
                )));
            };
            let valid_ident = |s: &str| {
                !s.is_empty()
                    && !s.starts_with(|c: char| c.is_ascii_digit())
                    && s.chars().all(|c| c.is_alphanumeric() || c == '_')
            };
            if !valid_ident(func) || !module.split('.').all(valid_ident) {
                return Err(ValidationError::new(format!(
                    "handler {handler:?} must look like module.function (for example hello.handle)"
                )));
            }
            let base = module.replace('.', "/");
            if !has(&format!("{base}.py")) && !has(&format!("{base}/__init__.py")) {
                return Err(ValidationError::new(format!(
                    "handler {handler:?}: the source has no module {module} ({base}.py); files: {}",
                    listing()
                )));
            }
            Ok(ResolvedHandler {
                args: vec![handler.clone()],
                handler,
            })
        }
        Language::Nodejs => {
            let js = |m: &str| {
                [
                    m.to_string(),
                    format!("{m}.js"),
                    format!("{m}.cjs"),
                    format!("{m}/index.js"),
                ]
                .into_iter()
                .find(|c| has(c))
            };
            // Dispatch's e2e suite writes `--handler ./hello.js`: a path to the module file.
            let path = handler.trim_start_matches("./");
            if let Some(file) = js(path) {
                return Ok(ResolvedHandler {
                    args: vec![file],
                    handler,
                });
            }
            if let Some((module, export)) = path.rsplit_once('.')
                && let Some(file) = js(module)
            {
                return Ok(ResolvedHandler {
                    args: vec![file, export.to_string()],
                    handler,
                });
            }
            Err(ValidationError::new(format!(
                "handler {handler:?}: the source has no such module (write file, ./file.js or \
                 file.export, for example hello or hello.handle); files: {}",
                listing()
            )))
        }
        Language::Exec => {
            let path = handler.trim_start_matches("./");
            match files.iter().find(|f| f.path == path) {
                None => Err(ValidationError::new(format!(
                    "handler {handler:?}: the source has no such file; files: {}",
                    listing()
                ))),
                Some(f) if !f.executable => Err(ValidationError::new(format!(
                    "handler {handler:?} is not executable: chmod +x it before creating the function"
                ))),
                Some(_) => Ok(ResolvedHandler {
                    args: vec![path.to_string()],
                    handler,
                }),
            }
        }
    }
}

/// The handler used when none is given: for a source with a single top-level file of the
/// language, Python `<stem>.handle`, Node `<stem>` (the module's export), exec the file.
pub fn default_handler(
    language: Language,
    files: &[SourceFile],
) -> Result<String, ValidationError> {
    let top: Vec<&SourceFile> = files.iter().filter(|f| !f.path.contains('/')).collect();
    let pick = |exts: &[&str]| -> Vec<&str> {
        top.iter()
            .map(|f| f.path.as_str())
            .filter(|p| exts.is_empty() || exts.iter().any(|e| p.ends_with(e)))
            .collect()
    };
    let (candidates, make): (Vec<&str>, fn(&str) -> String) = match language {
        Language::Python3 => (pick(&[".py"]), |p| {
            format!("{}.handle", p.trim_end_matches(".py"))
        }),
        Language::Nodejs => (pick(&[".js", ".cjs"]), |p| {
            p.trim_end_matches(".js")
                .trim_end_matches(".cjs")
                .to_string()
        }),
        Language::Exec => (pick(&[]), |p| p.to_string()),
    };
    match candidates.as_slice() {
        [one] => Ok(make(one)),
        [] => Err(ValidationError::new(format!(
            "the source has no top-level {} file to run: set the handler (--handler)",
            language
        ))),
        many => Err(ValidationError::new(format!(
            "the source has several candidate files ({}): set the handler (--handler)",
            many.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(paths: &[(&str, bool)]) -> Vec<SourceFile> {
        paths
            .iter()
            .map(|(p, x)| SourceFile {
                path: p.to_string(),
                executable: *x,
                size: 0,
            })
            .collect()
    }

    #[test]
    fn python_defaults_and_checks() {
        let f = files(&[("hello.py", false), ("lib/util.py", false)]);
        let r = resolve(Language::Python3, None, &f).unwrap();
        assert_eq!(r.handler, "hello.handle");
        assert_eq!(r.args, ["hello.handle"]);
        resolve(Language::Python3, Some("lib.util.run"), &f).unwrap();
        let err = resolve(Language::Python3, Some("nothere.handle"), &f).unwrap_err();
        assert!(err.message.contains("no module nothere"), "{err}");
        assert!(resolve(Language::Python3, Some("hello"), &f).is_err());
        // Dispatch's path forms name the module's file; its `handle` is the function.
        for (given, stored) in [
            ("./hello.py", "hello.handle"),
            ("hello.py", "hello.handle"),
            ("./lib/util.py", "lib.util.handle"),
        ] {
            let r = resolve(Language::Python3, Some(given), &f).unwrap();
            assert_eq!(
                (r.handler.as_str(), r.args.as_slice()),
                (stored, &[stored.to_string()][..])
            );
        }
        assert!(resolve(Language::Python3, Some("./nothere.py"), &f).is_err());
    }

    #[test]
    fn node_resolves_module_and_export() {
        let f = files(&[("hello.js", false), ("lib/index.js", false)]);
        assert_eq!(
            resolve(Language::Nodejs, None, &f).unwrap().args,
            ["hello.js"]
        );
        assert_eq!(
            resolve(Language::Nodejs, Some("hello.handle"), &f)
                .unwrap()
                .args,
            ["hello.js", "handle"]
        );
        assert_eq!(
            resolve(Language::Nodejs, Some("lib"), &f).unwrap().args,
            ["lib/index.js"]
        );
        assert!(resolve(Language::Nodejs, Some("nope.handle"), &f).is_err());
        // Dispatch's forms: a path to the module file, with or without ./ and .js.
        for (given, args) in [
            ("./hello.js", &["hello.js"][..]),
            ("hello.js", &["hello.js"][..]),
            ("./hello", &["hello.js"][..]),
            ("./hello.handle", &["hello.js", "handle"][..]),
            ("./lib", &["lib/index.js"][..]),
        ] {
            assert_eq!(
                resolve(Language::Nodejs, Some(given), &f).unwrap().args,
                args,
                "{given}"
            );
        }
        assert!(resolve(Language::Nodejs, Some("./nope.js"), &f).is_err());
    }

    #[test]
    fn exec_needs_an_executable_file() {
        let f = files(&[("run.sh", true), ("data.txt", false)]);
        assert_eq!(
            resolve(Language::Exec, Some("./run.sh"), &f).unwrap().args,
            ["run.sh"]
        );
        assert!(
            resolve(Language::Exec, Some("data.txt"), &f)
                .unwrap_err()
                .message
                .contains("chmod +x")
        );
        assert!(
            default_handler(Language::Exec, &f)
                .unwrap_err()
                .message
                .contains("several")
        );
    }
}
