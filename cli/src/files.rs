//! `berth files …`: files uploaded once and attached to sessions.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, files_client::FilesClient};
use clap::Subcommand;

use crate::output::{Out, line};
use crate::spec_args::upload;
use crate::{CliError, explain};

#[derive(Subcommand)]
pub enum FilesCmd {
    /// Upload a file (up to 32 MiB); attach it with `berth run --file PATH=…`
    /// or a FileResource naming `files/{id}`.
    Upload {
        path: String,
        /// Name to record (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a file's metadata.
    Get { file: String },
    /// Delete a file.
    Delete { file: String },
}

pub(crate) async fn files(channel: Api, d: &str, out: Out, cmd: FilesCmd) -> Result<(), CliError> {
    let mut client = FilesClient::new(channel.clone());
    let f = match cmd {
        FilesCmd::Upload { path, name } => upload(&channel, d, &path, name).await?,
        FilesCmd::Get { file } => client
            .get_file(pb::GetFileRequest { name: file })
            .await
            .map_err(|s| explain(d, None, s))?
            .into_inner(),
        FilesCmd::Delete { file } => {
            client
                .delete_file(pb::DeleteFileRequest { name: file.clone() })
                .await
                .map_err(|s| explain(d, None, s))?;
            return line(format!("deleted {file}"));
        }
    };
    out.object(&f, &f.name, || {
        format!(
            "{}  {}  {} bytes  sha256 {}",
            f.name, f.display_name, f.size_bytes, f.sha256
        )
    })
}
