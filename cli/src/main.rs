//! `berth`: the command-line client for a berth dispatcher.

mod certs;
mod durable;
mod render;

use std::collections::HashMap;
use std::time::Instant;

use berth_proto::v1::{self as pb, nodes_client::NodesClient, sessions_client::SessionsClient};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
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
    Run(RunArgs),
    /// Inspect and control sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Create, version and archive agents (session templates).
    #[command(subcommand)]
    Agents(durable::AgentsCmd),
    /// Upload files to attach to sessions.
    #[command(subcommand)]
    Files(durable::FilesCmd),
    /// List the dispatcher's nodes (state, load, warm pools, sessions), or drain one.
    Nodes(NodesArgs),
    /// Make a development CA and mTLS certificates (no dispatcher needed).
    #[command(subcommand)]
    Certs(certs::CertsCmd),
}

#[derive(Args)]
struct NodesArgs {
    #[command(subcommand)]
    command: Option<NodesCmd>,
}

#[derive(Subcommand)]
enum NodesCmd {
    /// List nodes (the default).
    List,
    /// Stop new placements on a node; its running sessions finish.
    Drain {
        /// The node's name, URL, host or address, as `berth nodes` shows them.
        node: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RuntimeArg {
    ClaudeCode,
    Jsonl,
}

#[derive(Args)]
struct RunArgs {
    /// Run an agent: NAME for its latest version, NAME@VERSION to pin one.
    /// The agent supplies image, runtime, model, prompt, limits and skills.
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    spec: durable::SpecArgs,
    #[command(flatten)]
    opts: durable::SessionOpts,
    /// Label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Leave the session running (idle) after the turn instead of stopping it.
    #[arg(long)]
    keep: bool,
    /// The first message.
    prompt: String,
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// List sessions, newest first.
    List {
        /// Only sessions in this status (pending, running, idle, stopped, failed…).
        #[arg(long)]
        status: Option<String>,
        /// Sessions per page.
        #[arg(long, default_value_t = 50)]
        page_size: i32,
        /// Page token from a previous listing.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Show one session.
    Get { session: String },
    /// Print a session's events.
    Events {
        session: String,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Keep following live events until the session stops running.
        #[arg(long, short)]
        follow: bool,
    },
    /// Send a user message.
    Send { session: String, text: String },
    /// Interrupt the current turn.
    Interrupt { session: String },
    /// Stop a session (its workspace is snapshotted; it stays resumable).
    Stop { session: String },
    /// Snapshot a running or idle session and free its container.
    Pause { session: String },
    /// Run a paused or stopped session again, from its snapshot, on any node.
    Resume { session: String },
    /// Make a finished session read-only (events kept for the retention period).
    Archive { session: String },
    /// Delete a session that is not live, with its events, usage and snapshots.
    Delete { session: String },
    /// Create a new session with the same configuration and no history.
    Clone { session: String },
    /// Print the session as a Markdown transcript or as JSON.
    Export {
        session: String,
        #[arg(long, value_enum, default_value = "markdown")]
        format: durable::ExportFormatArg,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<String>,
    },
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

async fn nodes(
    mut client: NodesClient<Channel>,
    d: &str,
    json: bool,
    cmd: Option<NodesCmd>,
) -> Result<(), CliError> {
    match cmd.unwrap_or(NodesCmd::List) {
        NodesCmd::List => {
            let resp = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            if json {
                for n in &resp.nodes {
                    println!("{}", render::node_json(n));
                }
            } else {
                print!("{}", render::node_table(&resp.nodes));
            }
            Ok(())
        }
        NodesCmd::Drain { node } => {
            let r = client
                .drain_node(pb::DrainNodeRequest { node: node.clone() })
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"node": node, "running": r.running})
                );
            } else {
                println!(
                    "{node} is draining; {} session(s) still running there",
                    r.running
                );
            }
            Ok(())
        }
    }
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
        Command::Nodes(args) => nodes(NodesClient::new(channel), d, json, args.command).await,
        Command::Run(args) => run_session(&mut client, &channel, d, json, args).await,
        Command::Agents(cmd) => durable::agents(channel, d, json, cmd).await,
        Command::Files(cmd) => durable::files(channel, d, json, cmd).await,
        Command::Sessions(cmd) => match cmd {
            SessionsCmd::List {
                status,
                page_size,
                page_token,
            } => {
                let status = match status {
                    None => 0,
                    Some(s) => render::parse_status(&s)
                        .ok_or_else(|| CliError(format!("unknown status `{s}`")))?
                        as i32,
                };
                let resp = client
                    .list_sessions(pb::ListSessionsRequest {
                        page_size,
                        page_token,
                        status,
                        labels: HashMap::new(),
                    })
                    .await
                    .map_err(|s| explain(d, None, s))?
                    .into_inner();
                for s in &resp.sessions {
                    if json {
                        println!("{}", render::session_json(s));
                    } else {
                        println!("{}", render::session_line(s));
                    }
                }
                if !resp.next_page_token.is_empty() && !json {
                    println!("(more: --page-token {})", resp.next_page_token);
                }
                Ok(())
            }
            SessionsCmd::Get { session } => {
                let s = client
                    .get_session(pb::GetSessionRequest {
                        name: session.clone(),
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
                    .into_inner();
                if json {
                    println!("{}", render::session_json(&s));
                } else {
                    print!("{}", render::session_details(&s));
                }
                Ok(())
            }
            SessionsCmd::Events {
                session,
                after,
                follow,
            } => {
                if follow {
                    let mut stream = client
                        .stream_events(pb::StreamEventsRequest {
                            name: session.clone(),
                            after_seq: after,
                        })
                        .await
                        .map_err(|e| explain(d, Some(&session), e))?
                        .into_inner();
                    while let Some(e) = stream.next().await {
                        let e = e.map_err(|e| explain(d, Some(&session), e))?;
                        print_event(&e, json);
                    }
                    return Ok(());
                }
                let mut token = String::new();
                loop {
                    let resp = client
                        .list_events(pb::ListEventsRequest {
                            name: session.clone(),
                            after_seq: after,
                            page_size: 500,
                            page_token: token,
                        })
                        .await
                        .map_err(|e| explain(d, Some(&session), e))?
                        .into_inner();
                    for e in &resp.events {
                        print_event(e, json);
                    }
                    if resp.next_page_token.is_empty() {
                        return Ok(());
                    }
                    token = resp.next_page_token;
                }
            }
            SessionsCmd::Send { session, text } => {
                let r = client
                    .send_message(pb::SendMessageRequest {
                        name: session.clone(),
                        text,
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
                    .into_inner();
                print_seq(json, "sent", r.seq);
                Ok(())
            }
            SessionsCmd::Interrupt { session } => {
                let r = client
                    .interrupt(pb::InterruptRequest {
                        name: session.clone(),
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
                    .into_inner();
                print_seq(json, "interrupted", r.seq);
                Ok(())
            }
            SessionsCmd::Stop { session } => {
                let r = client
                    .stop_session(pb::StopSessionRequest {
                        name: session.clone(),
                    })
                    .await;
                show_session(d, &session, json, r)
            }
            SessionsCmd::Pause { session } => {
                let r = client
                    .pause_session(pb::PauseSessionRequest {
                        name: session.clone(),
                    })
                    .await;
                show_session(d, &session, json, r)
            }
            SessionsCmd::Resume { session } => {
                let r = client
                    .resume_session(pb::ResumeSessionRequest {
                        name: session.clone(),
                    })
                    .await;
                show_session(d, &session, json, r)
            }
            SessionsCmd::Archive { session } => {
                let r = client
                    .archive_session(pb::ArchiveSessionRequest {
                        name: session.clone(),
                    })
                    .await;
                show_session(d, &session, json, r)
            }
            SessionsCmd::Clone { session } => {
                let req = pb::CloneSessionRequest {
                    name: session.clone(),
                    request_id: uuid::Uuid::new_v4().to_string(),
                };
                let r = client.clone_session(req).await;
                show_session(d, &session, json, r)
            }
            SessionsCmd::Delete { session } => {
                let r = client
                    .delete_session(pb::DeleteSessionRequest {
                        name: session.clone(),
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"deleted": session, "objects_deleted": r.objects_deleted})
                    );
                } else {
                    println!(
                        "deleted {session} ({} stored objects removed)",
                        r.objects_deleted
                    );
                }
                Ok(())
            }
            SessionsCmd::Export {
                session,
                format,
                output,
            } => {
                let format = match format {
                    durable::ExportFormatArg::Markdown => pb::ExportFormat::Markdown,
                    durable::ExportFormatArg::Json => pb::ExportFormat::Json,
                };
                let r = client
                    .export_session(pb::ExportSessionRequest {
                        name: session.clone(),
                        format: format as i32,
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
                    .into_inner();
                match output {
                    Some(path) => {
                        std::fs::write(&path, &r.content)
                            .map_err(|e| CliError(format!("cannot write {path}: {e}")))?;
                        eprintln!("wrote {} bytes to {path}", r.content.len());
                    }
                    None => print!("{}", r.content),
                }
                Ok(())
            }
        },
    }
}

/// Prints the session a control call returned, or explains its error.
fn show_session(
    d: &str,
    session: &str,
    json: bool,
    r: Result<tonic::Response<pb::Session>, tonic::Status>,
) -> Result<(), CliError> {
    let s = r.map_err(|e| explain(d, Some(session), e))?.into_inner();
    if json {
        println!("{}", render::session_json(&s));
    } else {
        println!("{}", render::session_line(&s));
    }
    Ok(())
}

/// Prints the seq a request was logged at.
fn print_seq(json: bool, verb: &str, seq: i64) {
    if json {
        println!("{}", serde_json::json!({"seq": seq}));
    } else {
        println!("{verb} (seq {seq})");
    }
}

fn print_event(e: &pb::Event, json: bool) {
    if json {
        println!("{}", render::event_json(e));
    } else if let Some(line) = render::event_text(e) {
        println!("{line}");
    }
}

async fn run_session(
    client: &mut SessionsClient<Channel>,
    channel: &Channel,
    d: &str,
    json: bool,
    a: RunArgs,
) -> Result<(), CliError> {
    let started = Instant::now();
    let spec = match &a.agent {
        Some(_) => a.spec.env_only()?,
        None => a.spec.session_spec()?,
    };
    let mut req = pb::CreateSessionRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        spec: Some(spec),
        initial_message: a.prompt,
        labels: a.labels.into_iter().collect(),
        agent: a.agent.unwrap_or_default(),
        ..Default::default()
    };
    a.opts.apply(channel, d, &mut req).await?;
    let session = client
        .create_session(req)
        .await
        .map_err(|s| explain(d, None, s))?
        .into_inner();
    if !json {
        eprintln!("session {} created", session.id);
    }
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {
            name: session.name.clone(),
            after_seq: 0,
        })
        .await
        .map_err(|e| explain(d, Some(&session.id), e))?
        .into_inner();
    let mut first_agent_event = None;
    let mut turn_done = false;
    while let Some(e) = stream.next().await {
        let e = e.map_err(|e| explain(d, Some(&session.id), e))?;
        if first_agent_event.is_none()
            && (e.r#type.starts_with("agent.") || e.r#type.starts_with("runtime."))
        {
            first_agent_event = Some(started.elapsed());
        }
        print_event(&e, json);
        if e.r#type == "session.usage" {
            turn_done = true;
        }
        if turn_done && e.r#type == "session.status_idle" {
            break;
        }
    }
    let s = client
        .get_session(pb::GetSessionRequest {
            name: session.name.clone(),
        })
        .await
        .map_err(|e| explain(d, Some(&session.id), e))?
        .into_inner();
    if !a.keep
        && matches!(
            pb::SessionStatus::try_from(s.status),
            Ok(pb::SessionStatus::Idle | pb::SessionStatus::Running)
        )
    {
        client
            .stop_session(pb::StopSessionRequest {
                name: session.name.clone(),
            })
            .await
            .map_err(|e| explain(d, Some(&session.id), e))?;
    }
    if !json {
        let u = s.usage.unwrap_or_default();
        eprintln!(
            "\nsession {}: {}  tokens in {} / out {} / cache read {} / cache write {}  cost ${:.6}",
            s.id,
            render::status_name(s.status),
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_creation_input_tokens,
            u.cost_usd
        );
        if let Some(t) = first_agent_event {
            eprintln!("first agent event after {} ms", t.as_millis());
        }
        if a.keep {
            eprintln!(
                "left running: `berth sessions send {} \"…\"` to continue, `berth sessions stop {}` to end",
                s.id, s.id
            );
        }
    }
    if !turn_done {
        return Err(CliError(format!(
            "the session ended before its turn did: {} ({})",
            render::status_name(s.status),
            s.status_reason
        )));
    }
    Ok(())
}
