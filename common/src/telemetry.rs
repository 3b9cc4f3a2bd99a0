//! Structured logging through `tracing`.
//!
//! Session work runs inside a `session` span carrying `session_id` (and the
//! run's `epoch`); in JSON output that span is attached to every line, so a
//! log shipper can select one session's lines by `span.session_id`.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{EnvFilter, fmt};

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The subscriber [`init`] installs, writing to `writer`; `ansi`: colour
/// text lines (only for a terminal).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi && format == LogFormat::Text)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Installs the global subscriber on stderr. `RUST_LOG` filters (default
/// `info`). Text is coloured only when stderr is a terminal and
/// `NO_COLOR` is unset: a redirected log holds no escape codes. Safe to
/// call more than once: later calls are ignored.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").is_some(),
    );
    let _ =
        tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi));
}

/// Whether log lines are coloured: on a terminal, unless `NO_COLOR` is set.
fn colours(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_inside_a_session_span_carry_the_session_id() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let sub = subscriber(
            LogFormat::Json,
            EnvFilter::new("info"),
            move || writer.clone(),
            true,
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("session", session_id = "s-1", epoch = 2);
            let _g = span.enter();
            tracing::info!(code = 0, "session ended");
        });
        let out = String::from_utf8(buf.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert_eq!(line["message"], "session ended");
        assert_eq!(line["code"], 0);
        assert_eq!(line["span"]["session_id"], "s-1");
        assert_eq!(line["span"]["epoch"], 2);
    }

    #[test]
    fn text_lines_off_a_terminal_hold_no_escape_codes() {
        assert!(colours(true, false));
        assert!(!colours(false, false) && !colours(true, true));
        let buf = Buffer::default();
        let writer = buf.clone();
        let sub = subscriber(
            LogFormat::Text,
            EnvFilter::new("info"),
            move || writer.clone(),
            colours(false, false),
        );
        tracing::subscriber::with_default(sub, || tracing::warn!(session_id = "s-1", "hello"));
        let out = String::from_utf8(buf.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        assert!(out.contains("WARN") && out.contains("hello"), "{out}");
        assert!(!out.contains('\x1b'), "escape codes in {out:?}");
    }
}
