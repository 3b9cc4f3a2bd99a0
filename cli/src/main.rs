//! `berth`: the command-line client for a berth dispatcher.

mod access;
mod agents;
mod attach;
mod audit;
mod certs;
mod files;
mod nodes;
mod output;
mod render;
mod run;
mod schedules;
mod secrets;
mod sessions;
mod spec_args;
mod webhooks;

use berth_cli::auth::{Api, Bearer};
use berth_proto::v1::{nodes_client::NodesClient, sessions_client::SessionsClient};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Run and inspect AI-agent sessions on a berth dispatcher",
    after_help = "Durations take seconds (90, 1.5) or units (10m, 2h, 1h 30m).\n\
Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 dispatcher unreachable or unavailable,\n\
5 not authenticated or not allowed, 6 the session ended before its turn did,\n\
130 interrupted (Ctrl-C), 141 stdout closed (e.g. `| head`)."
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
    /// Output format: table, wide (more columns), json (proto3 JSON, one
    /// object per line), yaml, or name (resource names only).
    #[arg(
        long,
        short,
        global = true,
        value_enum,
        default_value_t,
        env = "BERTH_OUTPUT"
    )]
    output: output::Format,
    /// Same as `--output json`.
    #[arg(long, global = true, hide = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a session, stream its events until the turn ends, print usage and cost.
    /// Ctrl-C stops the session; a second Ctrl-C leaves it running.
    Run(Box<run::RunArgs>),
    /// Stream a session's events and send each line you type as a message,
    /// like a chat. Ctrl-C or end of input leaves the session running.
    Attach(attach::AttachArgs),
    /// Inspect and control sessions.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// Create, version and archive agents (session templates).
    #[command(subcommand)]
    Agents(Box<agents::AgentsCmd>),
    /// Cron schedules that run an agent's sessions.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCmd),
    /// Inbound webhooks: signed HTTP POSTs that start an agent's sessions.
    #[command(subcommand)]
    Webhooks(webhooks::WebhooksCmd),
    /// Upload files to attach to sessions.
    #[command(subcommand)]
    Files(files::FilesCmd),
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
    Secrets(secrets::SecretsCmd),
    /// The audit trail: who did what, oldest first (a session's whole life
    /// with `berth audit SESSION_ID`).
    Audit(audit::AuditArgs),
    /// Show the key in use: its id, project and role.
    Whoami,
    /// Named contexts (dispatcher, token, TLS files) in ~/.config/berth/config.json.
    #[command(subcommand)]
    Config(access::ConfigCmd),
    /// Print a shell completion script: `source <(berth completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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

fn main() {
    let cli = Cli::parse();
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let r = rt.block_on(run(cli));
            // A read of stdin (`attach`, a tool prompt) cannot be cancelled:
            // do not wait for it.
            rt.shutdown_background();
            r
        }
        Err(e) => Err(CliError::new(format!("cannot start: {e}"))),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            if !e.msg.is_empty() {
                eprintln!("error: {}", e.msg);
            }
            e.code
        }
    };
    std::process::exit(i32::from(code));
}

/// The CLI's exit codes (also in `--help` and the README).
pub(crate) mod exit {
    /// The dispatcher refused the request, or a local error.
    pub const ERROR: u8 = 1;
    pub const NOT_FOUND: u8 = 3;
    /// The dispatcher cannot be reached, or is unavailable.
    pub const UNREACHABLE: u8 = 4;
    /// No valid credentials, or not allowed.
    pub const DENIED: u8 = 5;
    /// The session ended (failed, stopped, timed out) before its turn did.
    pub const SESSION_ENDED: u8 = 6;
    /// Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
    /// Whoever read stdout went away (`| head`): 128 + SIGPIPE, like the
    /// shell reports for tools SIGPIPE kills.
    pub const CLOSED: u8 = 141;
}

/// A one-line error that says what to do, and the exit code it ends with.
#[derive(Debug)]
pub(crate) struct CliError {
    pub msg: String,
    pub code: u8,
}

impl CliError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self::with_code(exit::ERROR, msg)
    }

    pub fn with_code(code: u8, msg: impl Into<String>) -> Self {
        Self {
            msg: msg.into(),
            code,
        }
    }

    /// Stdout was closed: end quietly.
    pub fn closed() -> Self {
        Self::with_code(exit::CLOSED, "")
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

pub(crate) fn explain(dispatcher: &str, session: Option<&str>, status: tonic::Status) -> CliError {
    let code = match status.code() {
        tonic::Code::NotFound => exit::NOT_FOUND,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit::UNREACHABLE,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => exit::DENIED,
        _ => exit::ERROR,
    };
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
    let mut msg = msg;
    for detail in berth_cli::errors::describe(&status) {
        msg.push_str("\n  ");
        msg.push_str(&detail);
    }
    CliError::with_code(code, msg)
}

fn read(p: &std::path::Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::new(format!("{what} {}: {e}", p.display())))
}

async fn connect(dispatcher: &str, ctx: &access::Context) -> Result<Api, CliError> {
    let mut endpoint = Endpoint::from_shared(dispatcher.to_string())
        .map_err(|e| {
            CliError::new(format!(
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
            _ => return Err(CliError::new("--cert and --key go together")),
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CliError::new(format!("TLS settings: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|_| {
        CliError::with_code(exit::UNREACHABLE, format!(
            "cannot reach the dispatcher at {dispatcher}: is it running? Start it (see README) or set --dispatcher / BERTH_DISPATCHER"
        ))
    })?;
    let bearer = Bearer::new(ctx.token()?.as_deref()).map_err(CliError::new)?;
    Ok(berth_cli::auth::api(channel, bearer))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Certs(cmd) => return certs::run(cmd),
        Command::Config(cmd) => return access::config(cmd),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "berth", &mut out);
            return output::line(String::from_utf8_lossy(&out).trim_end());
        }
        _ => {}
    }
    let out = output::Out::new(if cli.json {
        output::Format::Json
    } else {
        cli.output
    });
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
    match cli.command {
        Command::Certs(_) | Command::Config(_) | Command::Completions { .. } => Ok(()),
        Command::Keys(cmd) => access::keys(channel, d, out, cmd).await,
        Command::Secrets(cmd) => secrets::secrets(channel, d, out, cmd).await,
        Command::Whoami => access::whoami(channel, d, out).await,
        Command::Audit(args) => audit::run(channel, d, out, args).await,
        Command::Nodes(args) => nodes::run(NodesClient::new(channel), d, out, args.command).await,
        Command::Run(args) => run::run(&mut client, &channel, d, out, *args).await,
        Command::Attach(args) => attach::run(&mut client, d, out, args).await,
        Command::Agents(cmd) => agents::agents(channel, d, out, *cmd).await,
        Command::Files(cmd) => files::files(channel, d, out, cmd).await,
        Command::Schedules(cmd) => schedules::run(channel, d, out, cmd).await,
        Command::Webhooks(cmd) => webhooks::run(channel, d, out, cmd).await,
        Command::Sessions(cmd) => sessions::run(&mut client, d, out, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks over the whole command tree: no two
    /// arguments of a command (its own and the global ones) share a name
    /// or a flag, as `sessions export -o` once did with the global `-o`.
    #[test]
    fn every_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every leaf command paired with its required positionals.
    fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        if cmd.get_subcommands().next().is_none() {
            out.push((path, cmd.clone()));
            return;
        }
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            leaves(sub, p, out);
        }
    }

    /// Values to try for an argument: its possible values, else a few
    /// shapes the CLI's flags take.
    fn candidates(arg: &clap::Arg) -> Vec<String> {
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        if !possible.is_empty() {
            return possible;
        }
        ["1", "x", "a=b", "/workspace/a=./b", "coder", "0 9 * * *"]
            .map(String::from)
            .to_vec()
    }

    /// Every subcommand parses with each of its flags, one at a time, into
    /// the CLI's types: a definition that does not match its use (a flag's
    /// type read as another's) panics here, not in a user's hands.
    #[test]
    fn every_subcommand_parses_each_of_its_flags() {
        let mut all = Vec::new();
        leaves(&Cli::command(), vec!["berth".into()], &mut all);
        assert!(all.len() > 30, "{} leaf commands", all.len());
        for (path, cmd) in all {
            let mut base = path.clone();
            for arg in cmd.get_positionals().filter(|a| a.is_required_set()) {
                base.push(candidates(arg).swap_remove(0));
            }
            let parses = |args: &[String]| {
                std::panic::catch_unwind(|| Cli::try_parse_from(args).is_ok())
                    .unwrap_or_else(|_| panic!("`{}` panicked", args.join(" ")))
            };
            // Required flags too, each with the first value that parses.
            for arg in cmd
                .get_arguments()
                .filter(|a| !a.is_positional() && a.is_required_set())
            {
                let flag = format!("--{}", arg.get_long().unwrap_or_default());
                // A value this flag takes (another required one may still
                // be missing).
                let takes = |v: &String| {
                    let args = [base.clone(), vec![flag.clone(), v.clone()]].concat();
                    match Cli::try_parse_from(&args) {
                        Ok(_) => true,
                        Err(e) => e.kind() == clap::error::ErrorKind::MissingRequiredArgument,
                    }
                };
                if let Some(v) = candidates(arg).into_iter().find(takes) {
                    base.extend([flag, v]);
                }
            }
            assert!(parses(&base), "`{}` does not parse", base.join(" "));
            for arg in cmd
                .get_arguments()
                .filter(|a| !a.is_positional() && !a.is_required_set())
            {
                let Some(long) = arg.get_long() else {
                    continue;
                };
                let takes_value = arg.get_action().takes_values();
                if !takes_value {
                    parses(&[base.clone(), vec![format!("--{long}")]].concat());
                    continue;
                }
                let ok = candidates(arg)
                    .into_iter()
                    .any(|v| parses(&[base.clone(), vec![format!("--{long}"), v]].concat()));
                assert!(
                    ok,
                    "`{} --{long} …` parses with no value tried",
                    base.join(" ")
                );
            }
        }
    }
}
