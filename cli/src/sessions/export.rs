//! `berth sessions export`: a session as Markdown, JSON or PDF.

use berth_proto::v1 as pb;
use clap::ValueEnum;

use super::Ctx;
use crate::CliError;
use crate::output::line;

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormatArg {
    Markdown,
    Json,
    /// A PDF of the Markdown transcript (needs --output-file, or a stdout that is not a terminal).
    Pdf,
}

pub(super) async fn export(
    c: &mut Ctx<'_>,
    session: &str,
    format: ExportFormatArg,
    output_file: Option<String>,
) -> Result<(), CliError> {
    let format = match format {
        ExportFormatArg::Markdown => pb::ExportFormat::Markdown,
        ExportFormatArg::Json => pb::ExportFormat::Json,
        ExportFormatArg::Pdf => pb::ExportFormat::Pdf,
    };
    let r = c
        .client
        .export_session(pb::ExportSessionRequest {
            name: session.to_string(),
            format: format as i32,
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    let bytes = if r.data.is_empty() {
        r.content.as_bytes()
    } else {
        r.data.as_slice()
    };
    match output_file {
        Some(path) => {
            std::fs::write(&path, bytes)
                .map_err(|e| CliError::new(format!("cannot write {path}: {e}")))?;
            eprintln!("wrote {} bytes ({}) to {path}", bytes.len(), r.content_type);
        }
        None if !r.data.is_empty() => {
            use std::io::Write;
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                return Err(CliError::new(
                    "a PDF is binary: write it with --output-file FILE, or redirect stdout",
                ));
            }
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)
                .and_then(|()| out.flush())
                .map_err(|_| CliError::closed())?;
        }
        None => line(r.content.trim_end_matches('\n'))?,
    }
    Ok(())
}
