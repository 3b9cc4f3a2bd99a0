//! `google.api.http` path templates (AIP-127): `/v1/sessions`,
//! `/v1/{name=sessions/*}:stop`, `/v1/nodes/{node}:drain`.
//!
//! A variable binds one request field to one or more path segments; its
//! pattern's literals stay in the value (`name` = `sessions/abc`), as
//! resource names do (AIP-122). Segments are percent-decoded after the path
//! is split, so `%2F` reaches a field as `/`.

use std::fmt;

/// A parsed template.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
    verb: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// A field bound to as many segments as its pattern has: `None` is `*`
    /// (one non-empty segment), `Some` a literal.
    Var {
        field: String,
        pattern: Vec<Option<String>>,
    },
}

/// The fields a matched path binds, in template order.
pub(crate) type Bindings = Vec<(String, String)>;

impl Template {
    /// Parses `/v1/{name=sessions/*}:verb`. Errors name what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| format!("`{text}`: a path template starts with `/`"))?;
        let (path, verb) = split_verb(rest);
        let mut segments = Vec::new();
        let mut chars = path;
        while !chars.is_empty() {
            if let Some(var) = chars.strip_prefix('{') {
                let end = var
                    .find('}')
                    .ok_or_else(|| format!("`{text}`: unclosed `{{`"))?;
                segments.push(variable(&var[..end]).map_err(|e| format!("`{text}`: {e}"))?);
                chars = &var[end + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let literal = &chars[..end];
                if literal.is_empty() || literal.contains(['{', '}', '*']) {
                    return Err(format!("`{text}`: bad segment `{literal}`"));
                }
                segments.push(Segment::Literal(literal.to_string()));
                chars = &chars[end..];
            }
            chars = match chars.strip_prefix('/') {
                Some("") => return Err(format!("`{text}`: trailing `/`")),
                Some(next) => next,
                None if chars.is_empty() => chars,
                None => return Err(format!("`{text}`: expected `/` before `{chars}`")),
            };
        }
        Ok(Self {
            segments,
            verb: verb.map(str::to_string),
        })
    }

    /// The fields `path` binds, or `None` if it does not match.
    pub fn matches(&self, path: &str) -> Option<Bindings> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let mut parts = rest.split('/');
        let mut bound = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(lit) => {
                    if parts.next()? != lit {
                        return None;
                    }
                }
                Segment::Var { field, pattern } => {
                    let mut value = Vec::with_capacity(pattern.len());
                    for p in pattern {
                        // A raw `:` ends the path at a custom verb.
                        let raw = parts.next()?;
                        let part = decode(raw)?;
                        match p {
                            Some(lit) if &part != lit => return None,
                            None if part.is_empty() || raw.contains(':') => return None,
                            _ => value.push(part),
                        }
                    }
                    bound.push((field.clone(), value.join("/")));
                }
            }
        }
        parts.next().is_none().then_some(bound)
    }

    /// The template as an OpenAPI path (`/v1/sessions/{session}:stop`) and
    /// its parameters: each `*` becomes one, named for the literal before
    /// it (`sessions` → `session`), or for its field when it stands alone.
    pub fn openapi(&self) -> (String, Vec<String>) {
        let mut path = String::new();
        let mut params = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(lit) => {
                    path.push('/');
                    path.push_str(lit);
                }
                Segment::Var { field, pattern } => {
                    let mut before: Option<&str> = None;
                    for p in pattern {
                        path.push('/');
                        match p {
                            Some(lit) => {
                                path.push_str(lit);
                                before = Some(lit);
                            }
                            None => {
                                let name = before.map_or_else(|| field.clone(), singular);
                                path.push_str(&format!("{{{name}}}"));
                                params.push(name);
                            }
                        }
                    }
                }
            }
        }
        if let Some(verb) = &self.verb {
            path.push(':');
            path.push_str(verb);
        }
        (path, params)
    }

    /// For each OpenAPI parameter ([`Template::openapi`]), the field it
    /// fills and the literal prefix its value takes there (`sessions/`).
    pub fn fields(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for segment in &self.segments {
            if let Segment::Var { field, pattern } = segment {
                let mut prefix = String::new();
                for p in pattern {
                    match p {
                        Some(lit) => {
                            prefix.push_str(lit);
                            prefix.push('/');
                        }
                        None => out.push((field.clone(), prefix.clone())),
                    }
                }
            }
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.segments {
            match segment {
                Segment::Literal(lit) => write!(f, "/{lit}")?,
                Segment::Var { field, pattern } => {
                    let pattern: Vec<&str> = pattern
                        .iter()
                        .map(|p| p.as_deref().unwrap_or("*"))
                        .collect();
                    write!(f, "/{{{field}={}}}", pattern.join("/"))?;
                }
            }
        }
        match &self.verb {
            Some(verb) => write!(f, ":{verb}"),
            None => Ok(()),
        }
    }
}

/// `path:verb` → (`path`, `verb`): the verb follows the last segment, so
/// a `:` inside a variable's braces is not one.
fn split_verb(rest: &str) -> (&str, Option<&str>) {
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    let tail_start = rest[last..].rfind('}').map_or(last, |i| last + i + 1);
    match rest[tail_start..].find(':') {
        Some(i) => (&rest[..tail_start + i], Some(&rest[tail_start + i + 1..])),
        None => (rest, None),
    }
}

/// `name=sessions/*` or `node`.
fn variable(text: &str) -> Result<Segment, String> {
    let (field, pattern) = text.split_once('=').unwrap_or((text, "*"));
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("bad field `{field}`"));
    }
    let pattern = pattern
        .split('/')
        .map(|p| match p {
            "*" => Ok(None),
            "" | "**" => Err(format!("unsupported pattern `{p}` in `{text}`")),
            lit => Ok(Some(lit.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Segment::Var {
        field: field.to_string(),
        pattern,
    })
}

/// A percent-decoded segment; `None` if it is not UTF-8.
fn decode(part: &str) -> Option<String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// `sessions` → `session`, `apiKeys` → `apiKey`.
fn singular(collection: &str) -> String {
    collection
        .strip_suffix('s')
        .unwrap_or(collection)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).expect(s)
    }

    #[test]
    fn a_resource_name_binds_with_its_collection() {
        let get = t("/v1/{name=sessions/*}");
        assert_eq!(
            get.matches("/v1/sessions/abc"),
            Some(vec![("name".into(), "sessions/abc".into())])
        );
        assert_eq!(get.matches("/v1/sessions"), None);
        assert_eq!(get.matches("/v1/agents/abc"), None);
        assert_eq!(get.matches("/v1/sessions/abc/events"), None);
        assert_eq!(get.matches("/v1/sessions/"), None);
        // A custom method's path is not the resource's.
        assert_eq!(get.matches("/v1/sessions/abc:stop"), None);
        assert_eq!(get.to_string(), "/v1/{name=sessions/*}");
    }

    #[test]
    fn custom_verbs_follow_the_last_segment() {
        let stop = t("/v1/{name=sessions/*}:stop");
        assert_eq!(
            stop.matches("/v1/sessions/abc:stop"),
            Some(vec![("name".into(), "sessions/abc".into())])
        );
        assert_eq!(stop.matches("/v1/sessions/abc:pause"), None);
        assert_eq!(stop.matches("/v1/sessions/abc"), None);
        let search = t("/v1/sessions:search");
        assert_eq!(search.matches("/v1/sessions:search"), Some(vec![]));
        let stream = t("/v1/{name=sessions/*}/events:stream");
        assert!(stream.matches("/v1/sessions/x/events:stream").is_some());
        assert!(stream.matches("/v1/sessions/x/events").is_none());
    }

    #[test]
    fn segments_are_percent_decoded() {
        let drain = t("/v1/nodes/{node}:drain");
        assert_eq!(
            drain.matches("/v1/nodes/http%3A%2F%2Fn1%3A50052:drain"),
            Some(vec![("node".into(), "http://n1:50052".into())])
        );
        assert_eq!(drain.matches("/v1/nodes/%FF:drain"), None);
    }

    #[test]
    fn openapi_paths_name_each_wildcard() {
        assert_eq!(
            t("/v1/{name=sessions/*}:stop").openapi(),
            ("/v1/sessions/{session}:stop".into(), vec!["session".into()])
        );
        assert_eq!(
            t("/v1/nodes/{node}:drain").openapi(),
            ("/v1/nodes/{node}:drain".into(), vec!["node".into()])
        );
        assert_eq!(
            t("/v1/{name=sessions/*}").fields(),
            vec![("name".into(), "sessions/".into())]
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "v1/x",
            "/v1/{name",
            "/v1//x",
            "/v1/x/",
            "/v1/{=x}",
            "/v1/{a=**}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
