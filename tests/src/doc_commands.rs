//! The `berth …` commands the docs show, read from the Markdown itself:
//! code block lines and inline code, and their runnable forms. The
//! documented-commands test (`tests/it/docs.rs`) runs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where a command was found.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A line of a code block: a reader copies it, so it must succeed.
    Block,
    /// Inline code in the prose.
    Inline,
}

#[derive(Debug, Clone)]
pub struct Documented {
    pub file: String,
    pub line: usize,
    pub kind: Kind,
    pub text: String,
}

/// The Markdown files the test reads: the README, then everything in
/// `docs/` in name order, but the configuration reference (generated from
/// the binaries' help, and checked by a test of its own).
pub fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md")
                && p.file_name().is_some_and(|n| n != "configuration.md")
            {
                files.push(p);
            }
        }
    }
    files[1..].sort();
    files
}

/// The `berth …` commands of one Markdown text, in order: code block lines
/// (`berth`, `target/debug/berth` or `$B`, joined across `\` and split at
/// `&&`), and inline code spans that start with `berth `.
pub fn commands_in(file: &str, text: &str) -> Vec<Documented> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    let mut prose = String::new();
    let mut prose_line = 1;
    let flush_prose = |prose: &mut String, at: usize, out: &mut Vec<Documented>| {
        for (i, span) in prose.split('`').enumerate() {
            let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
            if i % 2 == 1 && (span.starts_with("berth ") || span == "berth") {
                out.push(Documented {
                    file: file.into(),
                    line: at,
                    kind: Kind::Inline,
                    text: span,
                });
            }
        }
        prose.clear();
    };
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            if !in_block {
                flush_prose(&mut prose, prose_line, &mut out);
            }
            in_block = !in_block;
            continue;
        }
        if !in_block {
            // A paragraph at a time: inline code may wrap across lines.
            if line.trim().is_empty() {
                flush_prose(&mut prose, prose_line, &mut out);
            } else {
                if prose.is_empty() {
                    prose_line = n + 1;
                }
                prose.push_str(line);
                prose.push('\n');
            }
            continue;
        }
        let l = line.trim();
        if let Some(head) = l.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        let whole = std::mem::take(&mut pending) + l;
        let whole = whole.strip_prefix("$ ").unwrap_or(&whole).to_string();
        for part in whole.split("&&") {
            let part = strip_comment(part.trim());
            let part = part
                .strip_prefix("target/debug/berth ")
                .or_else(|| part.strip_prefix("$B "))
                .map(|rest| format!("berth {rest}"))
                .unwrap_or(part);
            if part.starts_with("berth ") {
                out.push(Documented {
                    file: file.into(),
                    line: n + 1,
                    kind: Kind::Block,
                    text: part,
                });
            }
        }
    }
    flush_prose(&mut prose, prose_line, &mut out);
    out
}

/// A line less its shell comment (a `#` that starts a word, outside quotes).
pub fn strip_comment(line: &str) -> String {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].trim_end().to_string(),
            _ => {}
        }
        prev = c;
    }
    line.to_string()
}

/// The runnable forms of a documented command: `a|b` in a word gives one
/// command per alternative; `[…]` parts are left out, then all put in; a
/// lone `…` and what follows a pipe are dropped.
pub fn expand(text: &str) -> Vec<String> {
    let text = text.split(" | ").next().unwrap_or(text);
    let tokens: Vec<&str> = text
        .split_whitespace()
        .filter(|t| *t != "…" && *t != "...")
        .collect();
    let mut forms = BTreeSet::new();
    for with_optional in [false, true] {
        let mut words: Vec<String> = Vec::new();
        let mut depth = 0;
        for t in &tokens {
            let opens = t.matches('[').count();
            let closes = t.matches(']').count();
            let inside = depth > 0 || opens > 0;
            depth += opens;
            depth = depth.saturating_sub(closes);
            if inside && !with_optional {
                continue;
            }
            let t = t
                .trim_end_matches(['…', ','])
                .trim_matches(|c| c == '[' || c == ']');
            if !t.is_empty() {
                words.push(t.to_string());
            }
        }
        // Alternatives in subcommand words (`approve|deny`), not in values.
        let mut variants = vec![Vec::<String>::new()];
        for w in &words {
            let alternatives: Vec<&str> = if w.contains('|') && !w.starts_with('-') {
                w.split('|').collect()
            } else {
                vec![w.as_str()]
            };
            variants = variants
                .into_iter()
                .flat_map(|v| {
                    alternatives.iter().map(move |a| {
                        let mut v = v.clone();
                        v.push((*a).to_string());
                        v
                    })
                })
                .collect();
        }
        for v in variants {
            forms.insert(v.join(" "));
        }
    }
    // Keep the documented order: the plain form first.
    let mut ordered: Vec<String> = forms.into_iter().collect();
    ordered.sort_by_key(|f| f.len());
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_commands_are_found_in_blocks_and_prose_and_expanded() {
        let md = "Run `berth sessions approve|deny SESSION [--always]` or\n`berth run\n--detach`.\n\n```sh\nB=target/debug/berth\n$B sessions pause <id>   # snapshot\n$B sessions archive <id> && $B sessions delete <id>\ntarget/debug/berth run --image x \\\n  \"echo hi\"\nscripts/demo.sh\n```\n";
        let found: Vec<(Kind, String)> = commands_in("t.md", md)
            .into_iter()
            .map(|d| (d.kind, d.text))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    Kind::Inline,
                    "berth sessions approve|deny SESSION [--always]".to_string()
                ),
                (Kind::Inline, "berth run --detach".to_string()),
                (Kind::Block, "berth sessions pause <id>".to_string()),
                (Kind::Block, "berth sessions archive <id>".to_string()),
                (Kind::Block, "berth sessions delete <id>".to_string()),
                (Kind::Block, "berth run --image x \"echo hi\"".to_string()),
            ]
        );
        assert_eq!(
            expand("berth sessions approve|deny SESSION [--always]"),
            vec![
                "berth sessions deny SESSION",
                "berth sessions approve SESSION",
                "berth sessions deny SESSION --always",
                "berth sessions approve SESSION --always",
            ]
        );
        assert_eq!(expand("berth run … | head"), vec!["berth run"]);
        assert_eq!(strip_comment("berth nodes   # state"), "berth nodes");
        assert_eq!(strip_comment("berth run \"a # b\""), "berth run \"a # b\"");
    }
}
