//! `berth run`: create a session, stream its events until the turn ends,
//! print usage and cost.

use std::time::Instant;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use clap::Args;

use crate::output::Out;
use crate::sessions::print_event;
use crate::{CliError, exit, explain, key_value, render, spec_args};

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Run an agent: NAME for its latest version, NAME@VERSION to pin one.
    /// The agent supplies image, runtime, model, prompt, limits and skills.
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    spec: spec_args::SpecArgs,
    #[command(flatten)]
    opts: spec_args::SessionOpts,
    /// Label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Leave the session running (idle) after the turn instead of stopping it.
    #[arg(long)]
    keep: bool,
    /// Create the session and return at once, leaving it running:
    /// `berth attach ID` follows it, `berth sessions stop ID` ends it.
    #[arg(long, short)]
    detach: bool,
    /// The first message.
    prompt: String,
}

/// Asks the agent's questions one by one at the terminal and sends the
/// answers. The end of input leaves them to the session's tool policy.
async fn prompt_questions(
    client: &mut SessionsClient<Api>,
    d: &str,
    session: &str,
    mut asking: berth_cli::questions::Asking,
) -> Result<(), CliError> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    eprintln!();
    eprint!("{}", asking.prompt());
    loop {
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.read_line(&mut line).await.unwrap_or(0) == 0 {
            eprintln!("(no answer; the session's tool policy decides when it times out)");
            return Ok(());
        }
        match asking.take(&line) {
            Err(why) => eprint!("{why}\n{}", asking.prompt()),
            Ok(false) => eprint!("{}", asking.prompt()),
            Ok(true) => break,
        }
    }
    match client.answer_question(asking.request(session)).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            eprintln!("{}", s.message());
            Ok(())
        }
        Err(s) => Err(explain(d, Some(session), s)),
    }
}

/// Shows a permission request (or the agent's questions) and sends the
/// person's answer.
async fn prompt_tool(
    client: &mut SessionsClient<Api>,
    d: &str,
    session: &str,
    e: &pb::Event,
) -> Result<(), CliError> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    if let Some(asking) = berth_cli::questions::Asking::from_event(e) {
        return prompt_questions(client, d, session, asking).await;
    }
    let p: berth_common::events::payload::ToolPermission =
        berth_common::events::payload::parse(&e.payload_json).unwrap_or_default();
    eprintln!("\n{}", berth_cli::tools::describe(e));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let answer = loop {
        eprint!("allow? [y]es / [n]o / [a]lways: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.read_line(&mut line).await.unwrap_or(0) == 0 {
            // No more input: leave the request to the session's policy.
            eprintln!("(no answer; the session's tool policy decides when it times out)");
            return Ok(());
        }
        if let Some(a) = berth_cli::tools::parse_answer(&line) {
            break a;
        }
    };
    let message = if answer == berth_cli::tools::Answer::Deny {
        "Denied by the user."
    } else {
        ""
    };
    match berth_cli::tools::confirm(client, session, &p.tool_use_id, answer, message).await {
        Ok(_) => Ok(()),
        // Answered elsewhere meanwhile, or withdrawn: the events say how.
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            eprintln!("{}", s.message());
            Ok(())
        }
        Err(s) => Err(explain(d, Some(session), s)),
    }
}

/// Creates the session `a` describes.
async fn create(
    client: &mut SessionsClient<Api>,
    channel: &Api,
    d: &str,
    a: RunArgs,
) -> Result<pb::Session, CliError> {
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
    Ok(session)
}

/// Runs `berth run` against dispatcher `d`.
pub(crate) async fn run(
    client: &mut SessionsClient<Api>,
    channel: &Api,
    d: &str,
    out: Out,
    a: RunArgs,
) -> Result<(), CliError> {
    let started = Instant::now();
    let keep = a.keep;
    let detach = a.detach;
    let session = create(client, channel, d, a).await?;
    let id = session.id.clone();
    if detach {
        // On stderr, so `-o name` / `-o json` stay clean on stdout.
        eprintln!(
            "session {id} created and left running: `berth attach {id}` follows it, `berth sessions stop {id}` ends it"
        );
        return out.object(&session, &session.name, || id.clone());
    }
    if !out.machine() {
        eprintln!("session {id} created");
    }
    // One SIGINT stream for the whole run: a second Ctrl-C that comes
    // before the first is handled is kept, not lost between listeners.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::new(format!("cannot watch for Ctrl-C: {e}")))?;
    let spinner = Spinner::start(out);
    let mut first_agent_event = None;
    let mut turn_done = false;
    // A person at a terminal answers tool permission requests here; else
    // they are printed with the command that answers them.
    let ask = !out.machine() && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let mut after = 0;
    loop {
        let mut asked = None;
        let mut closed = None;
        let mut c = client.clone();
        let followed = berth_cli::follow::follow(&mut c, &session.name, after, |e| {
            after = e.seq;
            if first_agent_event.is_none()
                && (e.r#type.starts_with("agent.") || e.r#type.starts_with("runtime."))
            {
                first_agent_event = Some(started.elapsed());
            }
            if !spinner.shows(e)
                && let Err(err) = spinner.around(|| print_event(out, e))
            {
                closed = Some(err);
                return false;
            }
            if e.r#type == berth_common::events::SESSION_USAGE {
                turn_done = true;
            }
            if ask && berth_common::events::asks(&e.r#type) {
                asked = Some(e.clone());
                return false;
            }
            !(turn_done && e.r#type == "session.status_idle")
        });
        let outcome = tokio::select! {
            r = followed => Some(r),
            _ = sigint.recv() => None,
        };
        match outcome {
            None => return interrupted(client, d, &session, &spinner, &mut sigint).await,
            Some(r) => r.map_err(|e| explain(d, Some(&id), e))?,
        }
        if let Some(err) = closed {
            // Nobody reads the output any more (`| head`): end the session
            // rather than leave it holding a container.
            spinner.clear();
            if !keep {
                let _ = client
                    .stop_session(pb::StopSessionRequest {
                        name: session.name.clone(),
                    })
                    .await;
            }
            return Err(err);
        }
        let Some(e) = asked else { break };
        spinner.clear();
        let answered = tokio::select! {
            r = prompt_tool(client, d, &id, &e) => Some(r),
            _ = sigint.recv() => None,
        };
        match answered {
            None => return interrupted(client, d, &session, &spinner, &mut sigint).await,
            Some(r) => r?,
        }
    }
    spinner.clear();
    let summary = Summary {
        keep,
        first_agent_event,
        turn_done,
    };
    finish(client, d, out, &session, summary).await
}

/// What `finish` reports of a run.
struct Summary {
    keep: bool,
    first_agent_event: Option<std::time::Duration>,
    turn_done: bool,
}

/// Ends the run: stops the session unless `--keep`, prints its usage and
/// cost, and fails when the session ended before its turn did.
async fn finish(
    client: &mut SessionsClient<Api>,
    d: &str,
    out: Out,
    session: &pb::Session,
    summary: Summary,
) -> Result<(), CliError> {
    let Summary {
        keep,
        first_agent_event,
        turn_done,
    } = summary;
    let id = &session.id;
    let s = client
        .get_session(pb::GetSessionRequest {
            name: session.name.clone(),
        })
        .await
        .map_err(|e| explain(d, Some(id), e))?
        .into_inner();
    if !keep
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
            .map_err(|e| explain(d, Some(id), e))?;
    }
    if !out.machine() {
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
        if keep {
            eprintln!(
                "left running: `berth attach {}` to continue, `berth sessions stop {}` to end",
                s.id, s.id
            );
        }
    }
    if !turn_done {
        return Err(CliError::with_code(
            exit::SESSION_ENDED,
            format!(
                "the session ended before its turn did: {} ({})",
                render::status_name(s.status),
                s.status_reason
            ),
        ));
    }
    Ok(())
}

/// How long a second Ctrl-C may follow the first to leave the session
/// running instead of stopping it.
const SECOND_CTRL_C: std::time::Duration = std::time::Duration::from_secs(2);

/// Ctrl-C: stops the session, unless a second Ctrl-C follows within
/// [`SECOND_CTRL_C`], which leaves it running. Ends with exit code 130.
async fn interrupted(
    client: &mut SessionsClient<Api>,
    d: &str,
    session: &pb::Session,
    spinner: &Spinner,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<(), CliError> {
    spinner.clear();
    let id = &session.id;
    eprintln!(
        "\n^C: stopping session {id}; press Ctrl-C again within {} s to leave it running",
        SECOND_CTRL_C.as_secs()
    );
    let second = tokio::select! {
        _ = tokio::time::sleep(SECOND_CTRL_C) => false,
        _ = sigint.recv() => true,
    };
    if second {
        eprintln!(
            "left running: `berth attach {id}` follows it again, `berth sessions stop {id}` ends it"
        );
        return Err(CliError::with_code(exit::INTERRUPTED, ""));
    }
    let s = client
        .stop_session(pb::StopSessionRequest {
            name: session.name.clone(),
        })
        .await
        .map_err(|e| explain(d, Some(id), e))?
        .into_inner();
    eprintln!(
        "session {id}: {} (it stays resumable: `berth sessions resume {id}`)",
        render::status_name(s.status)
    );
    Err(CliError::with_code(exit::INTERRUPTED, ""))
}

/// A spinner on stderr while the session waits for a node and starts;
/// nothing when stderr is not a terminal or the output is for programs.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn start(out: Out) -> Self {
        if out.machine() || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message("pending: waiting for a node");
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        Self(Some(bar))
    }

    /// Whether the spinner shows `e` (a status change before the agent
    /// runs) instead of it being printed. Any other event ends the spinner.
    fn shows(&self, e: &pb::Event) -> bool {
        let Some(bar) = &self.0 else { return false };
        if bar.is_finished() {
            return false;
        }
        let status = e
            .r#type
            .strip_prefix(berth_common::events::SESSION_STATUS_PREFIX);
        match status {
            Some(s @ ("pending" | "starting" | "rescheduling")) => {
                let change: berth_common::events::payload::StatusChange =
                    berth_common::events::payload::parse(&e.payload_json).unwrap_or_default();
                bar.set_message(if change.reason.is_empty() {
                    s.to_string()
                } else {
                    format!("{s}: {}", change.reason)
                });
                true
            }
            // The user's own message: printed above the spinner.
            _ if e.r#type.starts_with("user.") => false,
            _ => {
                bar.finish_and_clear();
                false
            }
        }
    }

    /// Runs `print` with the spinner out of the way.
    fn around<T>(&self, print: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(bar) if !bar.is_finished() => bar.suspend(print),
            _ => print(),
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
