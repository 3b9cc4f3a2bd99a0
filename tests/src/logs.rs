//! The process's logs captured for tests that read what berth logged.

/// Every line berth's crates log in this process at debug level and above,
/// for tests that check what never reaches a log; the newest 64 MiB.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
const CAPTURE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = CAPTURED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.len() + buf.len() > CAPTURE_BYTES {
            let cut = (c.len() + buf.len() - CAPTURE_BYTES).min(c.len());
            c.drain(..cut);
        }
        c.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// What berth logged in this process so far (see [`CAPTURED`]).
pub fn captured_logs() -> String {
    let c = CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    String::from_utf8_lossy(&c).into_owned()
}

/// Logs to the test's output (`RUST_LOG`, default `warn`) and, at debug
/// level for berth's crates, to the in-memory capture.
pub(crate) fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let shown =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let captured = tracing_subscriber::EnvFilter::new(
        "berth_dispatcher=debug,berth_agent_server=debug,berth_common=debug,berth_server=debug",
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(shown),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Capture)
                .with_filter(captured),
        )
        .try_init();
}
