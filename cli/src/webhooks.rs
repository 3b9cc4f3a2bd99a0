//! `berth webhooks …`: inbound webhook endpoints that start sessions.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, webhooks_client::WebhooksClient};
use clap::Subcommand;
use comfy_table::Cell;

use crate::output::{Out, age, line};
use crate::{CliError, explain, key_value};

#[derive(Subcommand)]
pub(crate) enum WebhooksCmd {
    /// Create an endpoint: each signed POST to it starts a session of AGENT
    /// whose first message is the POST's JSON. Prints the signing secret once.
    Create {
        /// 1-63 lowercase letters, digits and `-`.
        id: String,
        /// NAME (its latest version at each delivery) or NAME@VERSION.
        #[arg(long)]
        agent: String,
        /// Label of each session, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Make it a Slack app's Events API endpoint: the credential
        /// (`berth secrets create NAME --usage http-header --host slack.com`)
        /// holding the bot token. Each Slack thread is then one session.
        #[arg(long)]
        slack_bot_token: Option<String>,
        /// A file holding the Slack app's signing secret (never a flag).
        #[arg(long)]
        slack_signing_secret_file: Option<std::path::PathBuf>,
    },
    List,
    Get {
        webhook: String,
    },
    /// Delete an endpoint (deliveries to it get 404; its sessions stay).
    Delete {
        webhook: String,
    },
}

fn table(out: &Out, hooks: &[pb::Webhook]) -> comfy_table::Table {
    let mut t = out.table(&["ID", "AGENT", "PATH", "AGE"]);
    for w in hooks {
        t.add_row(vec![
            Cell::new(&w.webhook_id),
            Cell::new(&w.agent),
            Cell::new(&w.path),
            Cell::new(age(&w.create_time)),
        ]);
    }
    t
}

pub(crate) async fn run(api: Api, d: &str, out: Out, cmd: WebhooksCmd) -> Result<(), CliError> {
    let mut c = WebhooksClient::new(api);
    let e = |s| explain(d, None, s);
    let one = |w: pb::Webhook| -> Result<(), CliError> {
        let list = [w];
        out.list(&list, |w| w.name.clone(), |o| table(o, &list))
    };
    match cmd {
        WebhooksCmd::Create {
            id,
            agent,
            labels,
            slack_bot_token,
            slack_signing_secret_file,
        } => {
            let slack = match (slack_bot_token, slack_signing_secret_file) {
                (Some(bot_token_secret), Some(file)) => Some(pb::SlackApp {
                    bot_token_secret,
                    signing_secret: std::fs::read_to_string(&file)
                        .map_err(|e| {
                            CliError::new(format!(
                                "--slack-signing-secret-file {}: {e}",
                                file.display()
                            ))
                        })?
                        .trim()
                        .to_string(),
                }),
                (None, None) => None,
                _ => {
                    return Err(CliError::new(
                        "a Slack app needs both --slack-bot-token and --slack-signing-secret-file",
                    ));
                }
            };
            let r = c
                .create_webhook(pb::CreateWebhookRequest {
                    webhook_id: id,
                    webhook: Some(pb::Webhook {
                        agent,
                        labels: labels.into_iter().collect(),
                        slack,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(e)?
                .into_inner();
            if out.machine() {
                return out.object(&r, &r.secret, String::new);
            }
            let w = r.webhook.clone().unwrap_or_default();
            if w.slack.is_some() {
                eprintln!(
                    "Set the Slack app's Event Subscriptions Request URL to the dispatcher's webhook port (--webhook-listen) at {}, and subscribe to message.channels and app_mention.",
                    w.path
                );
                return line(&w.name);
            }
            eprintln!(
                "POST deliveries to {} on the dispatcher's webhook port (--webhook-listen, :7080), with headers\n  \
                 Berth-Delivery: <id>  Berth-Timestamp: <unix seconds>  Berth-Signature: v1=<hex HMAC-SHA256 of \"<timestamp>.<body>\">\n\
                 the signing secret below is shown only now:",
                w.path
            );
            line(&r.secret)
        }
        WebhooksCmd::List => {
            let r = c
                .list_webhooks(pb::ListWebhooksRequest {
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await
                .map_err(e)?
                .into_inner();
            out.list(&r.webhooks, |w| w.name.clone(), |o| table(o, &r.webhooks))
        }
        WebhooksCmd::Get { webhook } => one(c
            .get_webhook(pb::GetWebhookRequest { name: webhook })
            .await
            .map_err(e)?
            .into_inner()),
        WebhooksCmd::Delete { webhook } => {
            c.delete_webhook(pb::DeleteWebhookRequest {
                name: webhook.clone(),
            })
            .await
            .map_err(e)?;
            line(format!("deleted {webhook}"))
        }
    }
}
