//! `berth run`: create a session, stream its events until the turn ends,
//! print usage and cost.

use std::time::Instant;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use clap::Args;

use crate::sessions::print_event;
use crate::{CliError, durable, explain, key_value, render};

#[derive(Args)]
pub(crate) struct RunArgs {
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

/// Shows a permission request and sends the person's answer.
async fn prompt_tool(
    client: &mut SessionsClient<Api>,
    d: &str,
    session: &str,
    e: &pb::Event,
) -> Result<(), CliError> {
    use std::io::{BufRead, Write};
    let p: berth_common::events::payload::ToolPermission =
        berth_common::events::payload::parse(&e.payload_json).unwrap_or_default();
    eprintln!("\n{}", berth_cli::tools::describe(e));
    let answer = loop {
        eprint!("allow? [y]es / [n]o / [a]lways: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line).unwrap_or(0) == 0 {
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

/// Runs `berth run` against dispatcher `d`.
pub(crate) async fn run(
    client: &mut SessionsClient<Api>,
    channel: &Api,
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
    let mut first_agent_event = None;
    let mut turn_done = false;
    // A person at a terminal answers tool permission requests here; else
    // they are printed with the command that answers them.
    let ask = !json && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let mut after = 0;
    loop {
        let mut asked = None;
        berth_cli::follow::follow(client, &session.name, after, |e| {
            after = e.seq;
            if first_agent_event.is_none()
                && (e.r#type.starts_with("agent.") || e.r#type.starts_with("runtime."))
            {
                first_agent_event = Some(started.elapsed());
            }
            print_event(e, json);
            if e.r#type == "session.usage" {
                turn_done = true;
            }
            if ask && e.r#type == berth_common::events::AGENT_TOOL_PERMISSION {
                asked = Some(e.clone());
                return false;
            }
            !(turn_done && e.r#type == "session.status_idle")
        })
        .await
        .map_err(|e| explain(d, Some(&session.id), e))?;
        let Some(e) = asked else { break };
        prompt_tool(client, d, &session.id, &e).await?;
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
