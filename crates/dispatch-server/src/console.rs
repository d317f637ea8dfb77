//! The web console at `/ui/` on the API port: three files embedded in the binary (no
//! install, nothing fetched at run time), public like `/healthz` — they hold no data. The
//! page asks the API for everything with the token the user pastes (kept in the tab's session
//! storage, sent as `Authorization`, never in a URL), so it can do exactly what the token
//! may. Its own script only: the Content-Security-Policy forbids inline script, other origins
//! and framing, so text a function printed can never run as code in an admin's tab.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The console's files: path under `/ui/`, content type, bytes.
pub const FILES: [(&str, &str, &str); 3] = [
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    ),
];

/// Script a page may load at most (issue 21: no page needs more than 200 KB).
pub const MAX_SCRIPT_BYTES: usize = 200 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` and `/ui` send a browser to `/ui/`; `/ui/…` serves the files.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }));
    for (i, (path, _, _)) in FILES.iter().enumerate() {
        r = r.route(
            &format!("/ui/{path}"),
            get(move |headers: HeaderMap| async move { file(i, &headers) }),
        );
    }
    r
}

/// The file's entity tag: its digest (the binary's version changes it).
fn etag(i: usize) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    &TAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, _, body)| {
                let d = dispatch_core::digest::sha256(body.as_bytes());
                format!("\"{}\"", &dispatch_core::digest::hex_part(&d)[..16])
            })
            .collect()
    })[i]
}

fn file(i: usize, headers: &HeaderMap) -> Response {
    let (_, mime, body) = FILES[i];
    let tag = etag(i);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes());
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, mime)], body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_script_stays_small_and_has_no_inline_code() {
        let script: usize = FILES
            .iter()
            .filter(|(_, mime, _)| mime.starts_with("text/javascript"))
            .map(|(_, _, b)| b.len())
            .sum();
        assert!(
            script <= MAX_SCRIPT_BYTES,
            "the console's script is {script} bytes, over {MAX_SCRIPT_BYTES}"
        );
        let (_, _, html) = FILES[0];
        // The CSP refuses inline script and handlers; the page must not need them.
        assert!(!html.contains("<script>"), "{html}");
        let handler = html.split(" on").skip(1).find(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(handler.is_none(), "an inline handler: on{handler:?}");
        assert!(html.contains(r#"<script src="console.js""#));
    }
}
