//! `berth`: the command-line client for a berth dispatcher.

mod access;
mod certs;
mod durable;
mod nodes;
mod render;
mod run;
mod sessions;

use berth_cli::auth::{Api, Bearer};
use berth_proto::v1::{nodes_client::NodesClient, sessions_client::SessionsClient};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Run and inspect AI-agent sessions on a berth dispatcher"
)]
struct Cli {
    /// Dispatcher URL [default: the context's, else http://127.0.0.1:7000].
    #[arg(long, global = true, env = "BERTH_DISPATCHER")]
    dispatcher: Option<String>,
    /// API key (`berth_…`) [default: the context's].
    #[arg(long, global = true, env = "BERTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Context from the config file (`berth config`) [default: its current one].
    #[arg(long, global = true, env = "BERTH_CONTEXT")]
    context: Option<String>,
    /// CA certificate for an https:// dispatcher (`--api-tls`).
    #[arg(long, global = true, env = "BERTH_CA")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate, with --key, where the dispatcher asks for one.
    #[arg(long, global = true, env = "BERTH_CERT")]
    cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "BERTH_KEY")]
    key: Option<std::path::PathBuf>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a session, stream its events until the turn ends, print usage and cost.
    Run(Box<run::RunArgs>),
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
    /// API keys: create (token shown once), list, revoke.
    #[command(subcommand)]
    Keys(access::KeysCmd),
    /// Secrets sessions use through the node's gateway (values write-only).
    #[command(subcommand)]
    Secrets(access::SecretsCmd),
    /// Show the key in use: its id, project and role.
    Whoami,
    /// Named contexts (dispatcher, token, TLS files) in ~/.config/berth/config.json.
    #[command(subcommand)]
    Config(access::ConfigCmd),
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
        tonic::Code::Unauthenticated => format!(
            "{}: pass an API key with --token / BERTH_TOKEN, or a context (`berth config set-context`)",
            status.message()
        ),
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

fn read(p: &std::path::Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError(format!("{what} {}: {e}", p.display())))
}

async fn connect(dispatcher: &str, ctx: &access::Context) -> Result<Api, CliError> {
    let mut endpoint = Endpoint::from_shared(dispatcher.to_string())
        .map_err(|e| {
            CliError(format!(
                "--dispatcher `{dispatcher}` is not a valid URL: {e}"
            ))
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    if dispatcher.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &ctx.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?));
        }
        match (&ctx.cert, &ctx.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(Identity::from_pem(read(c, "--cert")?, read(k, "--key")?));
            }
            (None, None) => {}
            _ => return Err(CliError("--cert and --key go together".into())),
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CliError(format!("TLS settings: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|_| {
        CliError(format!(
            "cannot reach the dispatcher at {dispatcher}: is it running? Start it (see README) or set --dispatcher / BERTH_DISPATCHER"
        ))
    })?;
    let bearer = Bearer::new(ctx.token()?.as_deref()).map_err(CliError)?;
    Ok(berth_cli::auth::api(channel, bearer))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Certs(cmd) => return certs::run(cmd),
        Command::Config(cmd) => return access::config(cmd),
        _ => {}
    }
    // Flags and env first, then the context, then the defaults.
    let mut ctx = access::ConfigFile::load()?.context(cli.context.as_deref())?;
    if let Some(t) = cli.token {
        ctx.token = Some(t);
    }
    for (flag, slot) in [
        (cli.ca, &mut ctx.ca),
        (cli.cert, &mut ctx.cert),
        (cli.key, &mut ctx.key),
    ] {
        if flag.is_some() {
            *slot = flag;
        }
    }
    let dispatcher = cli
        .dispatcher
        .or_else(|| ctx.dispatcher.clone())
        .unwrap_or_else(|| "http://127.0.0.1:7000".to_string());
    let channel = connect(&dispatcher, &ctx).await?;
    let mut client = SessionsClient::new(channel.clone())
        .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
    let d = dispatcher.as_str();
    let json = cli.json;
    match cli.command {
        Command::Certs(_) | Command::Config(_) => Ok(()),
        Command::Keys(cmd) => access::keys(channel, d, json, cmd).await,
        Command::Secrets(cmd) => access::secrets(channel, d, json, cmd).await,
        Command::Whoami => access::whoami(channel, d).await,
        Command::Nodes(args) => nodes::run(NodesClient::new(channel), d, json, args.command).await,
        Command::Run(args) => run::run(&mut client, &channel, d, json, *args).await,
        Command::Agents(cmd) => durable::agents(channel, d, json, cmd).await,
        Command::Files(cmd) => durable::files(channel, d, json, cmd).await,
        Command::Sessions(cmd) => sessions::run(&mut client, d, json, cmd).await,
    }
}
