//! `berth`: the command-line client for a berth dispatcher.

mod certs;
mod durable;
mod nodes;
mod render;
mod run;
mod sessions;

use berth_proto::v1::{nodes_client::NodesClient, sessions_client::SessionsClient};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Run and inspect AI-agent sessions on a berth dispatcher"
)]
struct Cli {
    /// Dispatcher URL.
    #[arg(
        long,
        global = true,
        env = "BERTH_DISPATCHER",
        default_value = "http://127.0.0.1:7000"
    )]
    dispatcher: String,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a session, stream its events until the turn ends, print usage and cost.
    Run(run::RunArgs),
    /// Inspect and control sessions.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// Create, version and archive agents (session templates).
    #[command(subcommand)]
    Agents(durable::AgentsCmd),
    /// Upload files to attach to sessions.
    #[command(subcommand)]
    Files(durable::FilesCmd),
    /// List the dispatcher's nodes (state, load, warm pools, sessions), or drain one.
    Nodes(nodes::NodesArgs),
    /// Make a development CA and mTLS certificates (no dispatcher needed).
    #[command(subcommand)]
    Certs(certs::CertsCmd),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RuntimeArg {
    ClaudeCode,
    Jsonl,
}

pub(crate) fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A one-line error that says what to do.
#[derive(Debug)]
pub(crate) struct CliError(pub(crate) String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn explain(dispatcher: &str, session: Option<&str>, status: tonic::Status) -> CliError {
    let msg = match status.code() {
        tonic::Code::Unavailable
            if status.message().contains("transport") || status.message().contains("connect") =>
        {
            format!(
                "cannot reach the dispatcher at {dispatcher}: is it running? Start it (see README) or set --dispatcher / BERTH_DISPATCHER"
            )
        }
        tonic::Code::NotFound => match session {
            Some(s) => {
                format!("session {s} not found; `berth sessions list` shows the sessions there are")
            }
            None => status.message().to_string(),
        },
        code => format!("{} ({code:?})", status.message()),
    };
    CliError(msg)
}

async fn connect(dispatcher: &str) -> Result<Channel, CliError> {
    let endpoint = Endpoint::from_shared(dispatcher.to_string())
        .map_err(|e| {
            CliError(format!(
                "--dispatcher `{dispatcher}` is not a valid URL: {e}"
            ))
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|_| {
        CliError(format!(
            "cannot reach the dispatcher at {dispatcher}: is it running? Start it (see README) or set --dispatcher / BERTH_DISPATCHER"
        ))
    })?;
    Ok(channel)
}

async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Certs(cmd) = cli.command {
        return certs::run(cmd);
    }
    let channel = connect(&cli.dispatcher).await?;
    let mut client = SessionsClient::new(channel.clone())
        .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
    let d = cli.dispatcher.as_str();
    let json = cli.json;
    match cli.command {
        Command::Certs(_) => Ok(()),
        Command::Nodes(args) => nodes::run(NodesClient::new(channel), d, json, args.command).await,
        Command::Run(args) => run::run(&mut client, &channel, d, json, args).await,
        Command::Agents(cmd) => durable::agents(channel, d, json, cmd).await,
        Command::Files(cmd) => durable::files(channel, d, json, cmd).await,
        Command::Sessions(cmd) => sessions::run(&mut client, d, json, cmd).await,
    }
}
