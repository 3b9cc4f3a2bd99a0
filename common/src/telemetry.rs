//! Structured logging through `tracing`, and the OpenTelemetry layer that
//! exports spans (see [`crate::traces`]).
//!
//! Session work runs inside a `session` span carrying `session_id` (and the
//! run's `epoch`); in JSON output that span is attached to every line, so a
//! log shipper can select one session's lines by `span.session_id`. With
//! traces on, a JSON line written inside a traced span also carries its
//! `trace_id` and `span_id`.

use std::sync::{Arc, OnceLock};

use tracing::dispatcher::WeakDispatch;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, fmt};

use crate::traces::Exporter;

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
/// text lines (only for a terminal); `traces`: export spans there.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
    traces: Option<&Exporter>,
) -> tracing::Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi && format == LogFormat::Text)
        .with_writer(writer);
    match format {
        LogFormat::Text => traced(builder.finish(), traces, DispatchCell::default()),
        LogFormat::Json => {
            let dispatch = Arc::new(OnceLock::new());
            let json = fmt::format()
                .json()
                .with_target(true)
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            let lines = TraceIds {
                inner: json,
                dispatch: dispatch.clone(),
            };
            // Span fields as JSON (what `with_current_span` prints); the
            // lines themselves are `lines`'.
            let sub = builder
                .fmt_fields(fmt::format::JsonFields::new())
                .event_format(lines)
                .finish();
            traced(sub, traces, DispatchCell(dispatch))
        }
    }
}

/// `sub` with the OpenTelemetry layer when traces are exported.
fn traced<S>(sub: S, traces: Option<&Exporter>, cell: DispatchCell) -> tracing::Dispatch
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let otel = traces.map(|e| tracing_opentelemetry::layer().with_tracer(e.tracer()));
    // Registered as itself (not boxed), so its layers learn their dispatch.
    tracing::Dispatch::new(sub.with(otel).with(cell))
}

/// Keeps the dispatch a subscriber was registered as, so a line's
/// formatter can read its span's trace context. (Not wrapped in an
/// `Option`: an optional layer is not told its dispatch.)
#[derive(Default)]
struct DispatchCell(Arc<OnceLock<WeakDispatch>>);

impl<S: tracing::Subscriber> Layer<S> for DispatchCell {
    fn on_register_dispatch(&self, dispatch: &tracing::Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }
}

/// A JSON line with `trace_id` and `span_id` added when the line's span is
/// traced.
struct TraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            use opentelemetry::trace::TraceContextExt;
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let sc = cx.span().span_context().clone();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
            Some(head) => writeln!(
                writer,
                "{head},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Installs the global subscriber on stderr, exporting spans when the
/// `OTEL_*` variables name a collector (see [`crate::traces`]); `service`
/// names this process in traces. `RUST_LOG` filters (default `info`). Text
/// is coloured only when stderr is a terminal and `NO_COLOR` is unset: a
/// redirected log holds no escape codes. Safe to call more than once:
/// later calls are ignored. Call inside a Tokio runtime; flush the
/// exporter it returns before exiting.
pub fn init(format: LogFormat, service: &str) -> anyhow::Result<Option<Exporter>> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").is_some(),
    );
    let traces = crate::traces::from_env(service)?;
    let _ = tracing::dispatcher::set_global_default(subscriber(
        format,
        filter,
        std::io::stderr,
        ansi,
        traces.as_ref(),
    ));
    Ok(traces)
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
            None,
        );
        tracing::dispatcher::with_default(&sub, || {
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
    fn json_lines_inside_a_traced_span_carry_its_trace_and_span_ids() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let exporter = Exporter::unexported();
        let sub = subscriber(
            LogFormat::Json,
            EnvFilter::new("info"),
            move || writer.clone(),
            false,
            Some(&exporter),
        );
        let (traceparent, outside) = tracing::dispatcher::with_default(&sub, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("session", session_id = "s-1");
            let _g = span.enter();
            tracing::info!("inside");
            (
                crate::traces::current(),
                crate::traces::traceparent_of(&tracing::Span::none()),
            )
        });
        let traceparent = traceparent.expect("a traced span has a traceparent");
        assert_eq!(outside, None);
        let out = String::from_utf8(buf.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].get("trace_id").is_none(), "{out}");
        let trace_id = lines[1]["trace_id"].as_str().expect("trace_id");
        let span_id = lines[1]["span_id"].as_str().expect("span_id");
        assert_eq!(lines[1]["span"]["session_id"], "s-1");
        assert_eq!(
            traceparent,
            format!("00-{trace_id}-{span_id}-01"),
            "the line names the span the traceparent does"
        );
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
            None,
        );
        tracing::dispatcher::with_default(&sub, || tracing::warn!(session_id = "s-1", "hello"));
        let out = String::from_utf8(buf.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        assert!(out.contains("WARN") && out.contains("hello"), "{out}");
        assert!(!out.contains('\x1b'), "escape codes in {out:?}");
    }
}
