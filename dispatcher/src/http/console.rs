//! The web console at `/ui`: one page, its script and its style, embedded
//! in the binary (no build step, no CDN), on the HTTP/JSON API.
//!
//! Every response carries a strict Content-Security-Policy: scripts and
//! styles from this origin only, no inline script, no framing, no form
//! posts elsewhere, fetches to this origin only. Agent output never reaches
//! the page as raw HTML: the script sets text, and Markdown is rendered
//! here ([`markdown`]: pulldown-cmark, with raw HTML turned to text and
//! unsafe URLs dropped, so the only markup is the renderer's own).

use http::{HeaderValue, StatusCode, header};
use tonic::body::Body;

use super::respond;

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// The policy every console response carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The most texts one Markdown call renders, and their total size.
const MAX_TEXTS: usize = 500;
const MAX_MARKDOWN_BYTES: usize = 4 * 1024 * 1024;

/// Whether `path` is the console's.
pub(crate) fn is_console(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// A console asset, or `None` for a path that is not one.
pub(crate) fn asset(path: &str) -> Option<http::Response<Body>> {
    let (content_type, body) = match path {
        "/ui" | "/ui/" => ("text/html; charset=utf-8", INDEX),
        "/ui/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/ui/app.css" => ("text/css; charset=utf-8", APP_CSS),
        _ => return None,
    };
    let mut response = respond::bytes(StatusCode::OK, content_type, body);
    harden(&mut response);
    Some(response)
}

/// The console's security headers, on any response of its paths.
pub(crate) fn harden(response: &mut http::Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// `{"texts": [...]}` → `{"html": [...]}`: each text's Markdown as
/// sanitized HTML. `Err` says what is wrong with the request.
pub(crate) fn render(body: &[u8]) -> Result<serde_json::Value, String> {
    let request: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let texts = request["texts"]
        .as_array()
        .ok_or("texts: a list of strings is required")?;
    if texts.len() > MAX_TEXTS {
        return Err(format!("texts: at most {MAX_TEXTS} at once"));
    }
    let mut total = 0;
    let mut html = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let t = t
            .as_str()
            .ok_or_else(|| format!("texts[{i}]: a string is required"))?;
        total += t.len();
        if total > MAX_MARKDOWN_BYTES {
            return Err(format!("texts: more than {MAX_MARKDOWN_BYTES} bytes"));
        }
        html.push(serde_json::Value::String(markdown(t)));
    }
    Ok(serde_json::json!({ "html": html }))
}

/// One text's Markdown as HTML that runs nothing. pulldown-cmark writes
/// every text and attribute escaped; what could carry markup of its own is
/// disarmed before it writes: raw HTML (blocks and inline) becomes text,
/// shown as typed, and a link or image whose URL is not `http`, `https`,
/// `mailto` or relative (`javascript:`, `data:`, `vbscript:`…) loses it.
pub(crate) fn markdown(text: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, Tag, html};
    let mut options = Options::empty();
    options.insert(Options::ENABLE_TABLES);
    options.insert(Options::ENABLE_STRIKETHROUGH);
    options.insert(Options::ENABLE_TASKLISTS);
    let events = Parser::new_ext(text, options).map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe_url(&dest_url) => Event::Start(Tag::Link {
            link_type,
            dest_url: "".into(),
            title,
            id,
        }),
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe_url(&dest_url) => Event::Start(Tag::Image {
            link_type,
            dest_url: "".into(),
            title,
            id,
        }),
        other => other,
    });
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, events);
    out
}

/// A URL a link may keep: relative, or of a scheme that runs nothing.
fn safe_url(url: &str) -> bool {
    let lower: String = url
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && !c.is_ascii_control())
        .collect::<String>()
        .to_ascii_lowercase();
    match lower.split_once(':') {
        // `:` after a `/`, `?` or `#` is not a scheme.
        Some((scheme, _)) if !scheme.contains(['/', '?', '#']) => {
            matches!(scheme, "http" | "https" | "mailto")
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_renders_and_runs_nothing() {
        let html = markdown("**bold** and `code`\n\n- a\n- b");
        assert!(html.contains("<strong>bold</strong>"), "{html}");
        assert!(html.contains("<li>a</li>"), "{html}");
        for attack in [
            "<script>alert(1)</script>",
            "<img src=x onerror=alert(1)>",
            "[x](javascript:alert(1))",
            "<a href=\"javascript:alert(1)\">x</a>",
            "<iframe src=\"https://example.com\"></iframe>",
            "<svg onload=alert(1)>",
            "<style>body{display:none}</style>",
            "![x](javascript:alert(1))",
            "[x](JaVa\tScRiPt:alert(1))",
            "[x](data:text/html;base64,PHNjcmlwdD4=)",
            "<div\nonclick=alert(1)>x</div>",
        ] {
            let html = markdown(attack);
            // Text is escaped, so every `<` left is a tag the renderer
            // wrote: only formatting, links and images, with no handler
            // and no URL that runs.
            for tag in html
                .split('<')
                .skip(1)
                .map(|t| t.split('>').next().unwrap_or_default())
            {
                let name = tag
                    .trim_start_matches('/')
                    .split([' ', '/'])
                    .next()
                    .unwrap_or_default();
                assert!(
                    [
                        "p", "a", "img", "em", "strong", "code", "pre", "ul", "ol", "li", "del"
                    ]
                    .contains(&name),
                    "{attack} → {html}"
                );
                let lower = tag.to_ascii_lowercase();
                assert!(!lower.contains(" on"), "{attack} → {html}");
                assert!(
                    !lower.contains("javascript:") && !lower.contains("data:"),
                    "{attack} → {html}"
                );
            }
            if attack.starts_with('<') {
                assert!(html.contains("&lt;"), "typed markup shows as text: {html}");
            }
        }
        let link = markdown("[docs](https://example.com/a?b=c) and [rel](/x)");
        assert!(
            link.contains("href=\"https://example.com/a?b=c\""),
            "{link}"
        );
        assert!(link.contains("href=\"/x\""), "{link}");
    }

    #[test]
    fn a_render_request_is_checked() {
        let r = render(br#"{"texts": ["*a*", "b"]}"#).expect("valid");
        assert_eq!(r["html"][0], "<p><em>a</em></p>\n");
        assert!(render(b"{}").is_err());
        assert!(
            render(br#"{"texts": [1]}"#)
                .expect_err("a number")
                .starts_with("texts[0]")
        );
    }

    #[test]
    fn every_asset_carries_the_policy() {
        for path in ["/ui", "/ui/", "/ui/app.js", "/ui/app.css"] {
            let r = asset(path).expect(path);
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        }
        assert!(asset("/ui/other.js").is_none());
        assert!(!INDEX.contains("<script>"), "no inline script");
        assert!(!INDEX.contains("style="), "no inline style");
    }
}
