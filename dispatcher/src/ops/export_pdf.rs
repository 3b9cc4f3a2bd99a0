//! The PDF export: the Markdown transcript, parsed (pulldown-cmark) and laid
//! out on A4 pages (pdf-writer), with no browser and no font files. Text is
//! set in Courier, one of the fonts every PDF reader has, so a line's width
//! is exact; characters outside Latin-1 are shown as `?` (a few common ones,
//! such as dashes, arrows and quotes, as their ASCII look-alikes).

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};
use pulldown_cmark::{Event as Md, HeadingLevel, Parser, Tag, TagEnd};

const PAGE_WIDTH: f32 = 595.0;
const PAGE_HEIGHT: f32 = 842.0;
const MARGIN: f32 = 50.0;
/// Courier's advance, as a share of the font size.
const ADVANCE: f32 = 0.6;
const REGULAR: Name<'static> = Name(b"F1");
const BOLD: Name<'static> = Name(b"F2");

/// One laid-out line.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    bold: bool,
    size: f32,
    indent: f32,
    text: String,
    /// Space above it, in points.
    gap: f32,
}

/// A block being collected.
#[derive(Default)]
struct Block {
    text: String,
    bold: bool,
    size: f32,
    prefix: String,
    /// Code: keep its line breaks and spaces.
    verbatim: bool,
}

/// Lays out `markdown` as lines.
fn layout(markdown: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut block = Block {
        size: 10.0,
        ..Default::default()
    };
    let mut indent = 0.0_f32;
    let mut list_depth = 0usize;
    let flush = |block: &mut Block, lines: &mut Vec<Line>, indent: f32| {
        let text = std::mem::take(&mut block.text);
        let prefix = std::mem::take(&mut block.prefix);
        if text.trim().is_empty() && prefix.is_empty() {
            return;
        }
        let width = PAGE_WIDTH - 2.0 * MARGIN - indent;
        let per_line = ((width / (block.size * ADVANCE)).floor() as usize).max(8);
        let mut first = true;
        let pieces: Vec<String> = if block.verbatim {
            text.trim_end_matches('\n')
                .lines()
                .map(|l| l.replace('\t', "    "))
                .collect()
        } else {
            vec![format!(
                "{prefix}{}",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            )]
        };
        for piece in pieces {
            for chunk in wrap(&piece, per_line, block.verbatim) {
                lines.push(Line {
                    bold: block.bold,
                    size: block.size,
                    indent,
                    text: chunk,
                    gap: if first { block.size * 0.6 } else { 0.0 },
                });
                first = false;
            }
        }
    };
    for event in Parser::new(markdown) {
        match event {
            Md::Start(Tag::Heading { level, .. }) => {
                flush(&mut block, &mut lines, indent);
                block.bold = true;
                block.size = match level {
                    HeadingLevel::H1 => 16.0,
                    HeadingLevel::H2 => 13.0,
                    _ => 11.0,
                };
            }
            Md::End(TagEnd::Heading(_)) => {
                flush(&mut block, &mut lines, indent);
                block.bold = false;
                block.size = 10.0;
            }
            Md::Start(Tag::CodeBlock(_)) => {
                flush(&mut block, &mut lines, indent);
                block.verbatim = true;
                block.size = 8.5;
                indent += 12.0;
            }
            Md::End(TagEnd::CodeBlock) => {
                flush(&mut block, &mut lines, indent);
                block.verbatim = false;
                block.size = 10.0;
                indent -= 12.0;
            }
            Md::Start(Tag::BlockQuote(_)) => {
                flush(&mut block, &mut lines, indent);
                indent += 12.0;
            }
            Md::End(TagEnd::BlockQuote(_)) => {
                flush(&mut block, &mut lines, indent);
                indent -= 12.0;
            }
            Md::Start(Tag::List(_)) => {
                flush(&mut block, &mut lines, indent);
                list_depth += 1;
                if list_depth > 1 {
                    indent += 12.0;
                }
            }
            Md::End(TagEnd::List(_)) => {
                flush(&mut block, &mut lines, indent);
                if list_depth > 1 {
                    indent -= 12.0;
                }
                list_depth = list_depth.saturating_sub(1);
            }
            Md::Start(Tag::Item) => {
                flush(&mut block, &mut lines, indent);
                block.prefix = "- ".into();
            }
            Md::End(TagEnd::Item | TagEnd::Paragraph) => flush(&mut block, &mut lines, indent),
            Md::Start(Tag::Paragraph) if block.prefix.is_empty() => {
                flush(&mut block, &mut lines, indent);
            }
            Md::Text(t) | Md::Code(t) | Md::Html(t) | Md::InlineHtml(t) => block.text.push_str(&t),
            Md::SoftBreak => block.text.push(' '),
            Md::HardBreak => block.text.push('\n'),
            Md::Rule => {
                flush(&mut block, &mut lines, indent);
                lines.push(Line {
                    bold: false,
                    size: 10.0,
                    indent,
                    text: "-".repeat(((PAGE_WIDTH - 2.0 * MARGIN - indent) / 6.0) as usize),
                    gap: 6.0,
                });
            }
            _ => {}
        }
    }
    flush(&mut block, &mut lines, indent);
    lines
}

/// Splits `text` into pieces of at most `width` characters, at spaces where
/// it can (code: anywhere).
fn wrap(text: &str, width: usize, verbatim: bool) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return vec![text.to_string()];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        let end = (start + width).min(chars.len());
        let mut cut = end;
        if end < chars.len()
            && !verbatim
            && let Some(space) = (start + 1..end).rev().find(|&i| chars[i] == ' ')
        {
            cut = space;
        }
        out.push(chars[start..cut].iter().collect::<String>());
        start = cut;
        while !verbatim && start < chars.len() && chars[start] == ' ' {
            start += 1;
        }
    }
    out
}

/// `text` in the fonts' encoding (WinAnsi; Latin-1 for what we print).
fn encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '—' | '–' | '−' => out.push(b'-'),
            '…' => out.extend_from_slice(b"..."),
            '→' => out.extend_from_slice(b"->"),
            '←' => out.extend_from_slice(b"<-"),
            '“' | '”' => out.push(b'"'),
            '‘' | '’' => out.push(b'\''),
            '•' | '·' => out.push(0xB7),
            c if (' '..='~').contains(&c) => out.push(c as u8),
            c if ('\u{A0}'..='\u{FF}').contains(&c) => out.push(c as u32 as u8),
            _ => out.push(b'?'),
        }
    }
    out
}

/// The Markdown `markdown` as a PDF; `footer` is printed under each page
/// with its number.
pub(crate) fn pdf(markdown: &str, footer: &str) -> Vec<u8> {
    let lines = layout(markdown);
    // Pages: runs of lines that fit between the margins.
    let mut pages: Vec<Vec<(f32, &Line)>> = vec![Vec::new()];
    let mut y = PAGE_HEIGHT - MARGIN;
    for line in &lines {
        let height = line.size * 1.3 + line.gap;
        if y - height < MARGIN && !pages.last().is_some_and(Vec::is_empty) {
            pages.push(Vec::new());
            y = PAGE_HEIGHT - MARGIN;
        }
        y -= height;
        if let Some(page) = pages.last_mut() {
            page.push((y, line));
        }
    }
    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let (regular, bold) = (Ref::new(3), Ref::new(4));
    let page_ids: Vec<(Ref, Ref)> = (0..pages.len() as i32)
        .map(|i| (Ref::new(5 + 2 * i), Ref::new(6 + 2 * i)))
        .collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree)
        .kids(page_ids.iter().map(|(p, _)| *p))
        .count(page_ids.len() as i32);
    for (font, base) in [(regular, Name(b"Courier")), (bold, Name(b"Courier-Bold"))] {
        pdf.type1_font(font)
            .base_font(base)
            .encoding_predefined(Name(b"WinAnsiEncoding"));
    }
    let total = pages.len();
    for (n, (page_lines, (page_id, content_id))) in pages.iter().zip(&page_ids).enumerate() {
        let mut page = pdf.page(*page_id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_WIDTH, PAGE_HEIGHT));
        page.parent(tree);
        page.contents(*content_id);
        let mut resources = page.resources();
        resources.fonts().pair(REGULAR, regular).pair(BOLD, bold);
        resources.finish();
        page.finish();
        let mut content = Content::new();
        for (y, line) in page_lines {
            content.begin_text();
            content.set_font(if line.bold { BOLD } else { REGULAR }, line.size);
            content.next_line(MARGIN + line.indent, *y);
            content.show(Str(&encode(&line.text)));
            content.end_text();
        }
        content.set_fill_gray(0.4);
        content.begin_text();
        content.set_font(REGULAR, 7.0);
        content.next_line(MARGIN, MARGIN / 2.0);
        content.show(Str(&encode(&format!(
            "{footer}  -  page {} of {total}",
            n + 1
        ))));
        content.end_text();
        pdf.stream(*content_id, &content.finish());
    }
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_blocks_become_styled_wrapped_lines() {
        let md = "# Title\n\nA paragraph that is long enough to need wrapping onto a second line because Courier at ten points fits eighty-two characters.\n\n- one\n- two\n\n```\nlet x = 1;\n  indented\n```\n";
        let lines = layout(md);
        assert_eq!(lines[0].text, "Title");
        assert!(lines[0].bold && lines[0].size > 10.0);
        assert!(lines[1].text.starts_with("A paragraph"));
        assert!(
            lines[2].gap == 0.0,
            "a wrapped line continues its paragraph"
        );
        assert!(
            lines.iter().all(|l| l.text.chars().count() <= 83),
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l.text == "- one"));
        let code = lines
            .iter()
            .find(|l| l.text == "  indented")
            .expect("code keeps spaces");
        assert!(code.indent > 0.0 && code.size < 10.0);
    }

    #[test]
    fn text_is_encoded_for_the_base_fonts() {
        assert_eq!(
            encode("café — ok → done…"),
            b"caf\xe9 - ok -> done...".to_vec()
        );
        assert_eq!(encode("日本"), b"??".to_vec());
    }

    #[test]
    fn the_pdf_is_well_formed_and_paginated() {
        let md = (0..200)
            .map(|i| format!("line {i}\n\n"))
            .collect::<String>();
        let bytes = pdf(&md, "berth");
        assert!(bytes.starts_with(b"%PDF-"));
        assert!(bytes.ends_with(b"%%EOF") || bytes.ends_with(b"%%EOF\n"));
        let text = String::from_utf8_lossy(&bytes);
        let count: usize = text
            .split("/Count ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .expect("a page count");
        // 200 short paragraphs do not fit on one A4 page.
        assert!(count >= 4, "{count} pages");
        assert!(text.contains("page 1 of"), "the footer");
    }
}
