//! `berth sessions …`: inspect and control sessions.

use berth_cli::auth::Api;
use berth_proto::v1::sessions_client::SessionsClient;
use clap::Subcommand;

use crate::output::Out;
use crate::{CliError, explain};

mod answer;
mod control;
mod events;
mod export;
mod read;

pub(crate) use events::print_event;

#[derive(Subcommand)]
pub(crate) enum SessionsCmd {
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
        /// Only sessions whose agent waits for a tool approval.
        #[arg(long)]
        waiting: bool,
    },
    /// Allow a tool call the agent asked permission for.
    Approve {
        session: String,
        /// The request's tool_use_id; may be left out when only one waits.
        tool_use_id: Option<String>,
        /// Also allow calls like it for the rest of the session.
        #[arg(long)]
        always: bool,
    },
    /// Refuse a tool call the agent asked permission for.
    Deny {
        session: String,
        /// The request's tool_use_id; may be left out when only one waits.
        tool_use_id: Option<String>,
        /// Told to the agent as the reason.
        #[arg(long, default_value = "Denied by the user.")]
        message: String,
    },
    /// Answer the agent's clarifying questions (`agent.question`).
    #[command(
        after_help = "Each --answer names a question by its header or its text: \
        `--answer \"Color=Blue\"`. An option's label picks it; anything else is your own \
        words (\"Other\"). Repeat a question to pick several options of a multi-select one."
    )]
    Answer {
        session: String,
        /// The request's tool_use_id; may be left out when only one waits.
        tool_use_id: Option<String>,
        /// QUESTION=ANSWER, once per question (or per choice).
        #[arg(long = "answer", required = true, value_name = "QUESTION=ANSWER")]
        answers: Vec<String>,
    },
    /// Show one session.
    Get { session: String },
    /// Find sessions by the text of their messages (`"phrase"`, `or`, `-word`).
    Search {
        query: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Rate a session (or one of its turns) 1-5, with a comment.
    Feedback {
        session: String,
        #[arg(long)]
        rating: i32,
        /// The turn rated; 0 (the default) rates the whole session.
        #[arg(long, default_value_t = 0)]
        turn: i64,
        #[arg(long, default_value = "")]
        comment: String,
    },
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
    /// Waits until it has stopped, unless --no-wait.
    Stop {
        session: String,
        #[command(flatten)]
        wait: Settle,
    },
    /// Snapshot a running or idle session and free its container. Waits
    /// until it is paused, unless --no-wait.
    Pause {
        session: String,
        #[command(flatten)]
        wait: Settle,
    },
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
        format: export::ExportFormatArg,
        /// Write to this file instead of stdout (`-o` is the output format).
        #[arg(long)]
        output_file: Option<String>,
    },
}

/// How long `stop` and `pause` wait for the session to get there.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Settle {
    /// Return as soon as the request is taken, without waiting for the
    /// snapshot and the container's removal.
    #[arg(long)]
    no_wait: bool,
    /// Longest wait for the session to stop or pause (`30s`, `5m`).
    #[arg(long, value_parser = berth_common::time::parse_duration, default_value = "5m")]
    wait_timeout: std::time::Duration,
}

/// What a `berth sessions` command works with: the client, the
/// dispatcher's address (for error hints) and the output.
pub(crate) struct Ctx<'a> {
    pub client: &'a mut SessionsClient<Api>,
    pub d: &'a str,
    pub out: Out,
}

impl Ctx<'_> {
    /// A call's error, explained for `session`.
    fn explain(&self, session: Option<&str>, status: tonic::Status) -> CliError {
        explain(self.d, session, status)
    }
}

/// Runs one `berth sessions` command against dispatcher `d`.
pub(crate) async fn run(
    client: &mut SessionsClient<Api>,
    d: &str,
    out: Out,
    cmd: SessionsCmd,
) -> Result<(), CliError> {
    use berth_cli::tools::Answer;
    let mut c = Ctx { client, d, out };
    match cmd {
        SessionsCmd::List {
            status,
            page_size,
            page_token,
            waiting,
        } => read::list(&mut c, status, page_size, page_token, waiting).await,
        SessionsCmd::Search { query, limit } => read::search(&mut c, query, limit).await,
        SessionsCmd::Get { session } => read::get(&mut c, &session).await,
        SessionsCmd::Events {
            session,
            after,
            follow,
        } => events::print(&mut c, &session, after, follow).await,
        SessionsCmd::Approve {
            session,
            tool_use_id,
            always,
        } => {
            let answer = if always {
                Answer::Always
            } else {
                Answer::Allow
            };
            control::answer_tool(&mut c, &session, tool_use_id.as_deref(), answer, "").await
        }
        SessionsCmd::Deny {
            session,
            tool_use_id,
            message,
        } => {
            let id = tool_use_id.as_deref();
            control::answer_tool(&mut c, &session, id, Answer::Deny, &message).await
        }
        SessionsCmd::Answer {
            session,
            tool_use_id,
            answers,
        } => answer::answer(&mut c, &session, tool_use_id.as_deref(), &answers).await,
        SessionsCmd::Feedback {
            session,
            rating,
            turn,
            comment,
        } => control::feedback(&mut c, &session, rating, turn, comment).await,
        SessionsCmd::Send { session, text } => control::send(&mut c, &session, text).await,
        SessionsCmd::Interrupt { session } => control::interrupt(&mut c, &session).await,
        SessionsCmd::Stop { session, wait } => control::stop(&mut c, &session, &wait, false).await,
        SessionsCmd::Pause { session, wait } => control::stop(&mut c, &session, &wait, true).await,
        SessionsCmd::Resume { session } => control::resume(&mut c, &session).await,
        SessionsCmd::Archive { session } => control::archive(&mut c, &session).await,
        SessionsCmd::Clone { session } => control::clone(&mut c, &session).await,
        SessionsCmd::Delete { session } => control::delete(&mut c, &session).await,
        SessionsCmd::Export {
            session,
            format,
            output_file,
        } => export::export(&mut c, &session, format, output_file).await,
    }
}
