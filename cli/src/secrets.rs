//! `berth secrets`: the vault. Values are read from stdin, never a flag,
//! and never shown again; credentials (`--usage http-header`) name the
//! hosts the node's gateway may send them to.

use std::io::Read;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, secrets_client::SecretsClient};
use clap::{Subcommand, ValueEnum};
use comfy_table::Cell;

use crate::output::{Out, age};
use crate::{CliError, explain};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum UsageArg {
    /// Sent as `x-api-key` on the session's model API calls by the gateway.
    AnthropicApiKey,
    /// An SSH private key the node clones ssh:// git resources with.
    GitSshKey,
    /// A credential the gateway sends as an HTTP header (default
    /// `Authorization: Bearer VALUE`) to its --host(s) only: an MCP
    /// server's token, a git host's token.
    HttpHeader,
    /// An OAuth 2.0 refresh token (stdin) with its client (--token-url,
    /// --client-id, --client-secret-file): dispatchers trade it for access
    /// tokens, which the gateway sends like http-header's.
    Oauth2Refresh,
}

#[derive(Subcommand)]
pub(crate) enum SecretsCmd {
    /// Store a secret; its value is read from stdin (never a flag, so it
    /// stays out of shell history and `ps`).
    ///
    /// A credential for an MCP server:
    ///   printf %s "$TOKEN" | berth secrets create docs-token --usage http-header --host mcp.example.com
    ///
    /// A GitHub token for git over HTTPS:
    ///   printf x-access-token:%s "$TOKEN" | berth secrets create gh --usage http-header --host github.com --header-prefix "Basic "
    ///
    /// An OAuth refresh token, refreshed by the dispatchers:
    ///   berth secrets create crm --usage oauth2-refresh --host api.example.com --token-url https://auth.example.com/token --client-id berth --client-secret-file client.txt < refresh.txt
    #[command(verbatim_doc_comment)]
    Create {
        name: String,
        #[arg(long, value_enum)]
        usage: UsageArg,
        /// http-header: a host it may be sent to (`host`, `host:port`,
        /// `*.domain`; repeatable, at least one).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// http-header: the header's name (default Authorization).
        #[arg(long, default_value = "")]
        header: String,
        /// http-header: put before the value (default `Bearer ` for
        /// Authorization). `Basic ` base64-encodes a `user:password` value.
        #[arg(long, default_value = "")]
        header_prefix: String,
        /// oauth2-refresh: the token endpoint (https://).
        #[arg(long)]
        token_url: Option<String>,
        /// oauth2-refresh: the client id.
        #[arg(long, default_value = "")]
        client_id: String,
        /// oauth2-refresh: a file holding the client secret (never a flag).
        #[arg(long)]
        client_secret_file: Option<std::path::PathBuf>,
        /// oauth2-refresh: the scope to ask for.
        #[arg(long, default_value = "")]
        scope: String,
    },
    /// The project's secrets: usage, hosts, and when a gateway last
    /// attached each credential.
    List,
    Delete {
        secret_id: String,
    },
}

fn table(o: &Out, secrets: &[pb::Secret]) -> comfy_table::Table {
    let mut t = o.table(&[
        "ID",
        "NAME",
        "USAGE",
        "HOSTS",
        "LAST USE",
        "LAST REFRESH",
        "AGE",
    ]);
    for s in secrets {
        let usage = pb::SecretUsage::try_from(s.usage)
            .map(|u| {
                u.as_str_name()
                    .trim_start_matches("SECRET_USAGE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let last_use = match (
            &s.last_use_time,
            s.usage == pb::SecretUsage::HttpHeader as i32,
        ) {
            (Some(t), _) => format!("{} ago", age(&Some(*t))),
            (None, true) => "never".into(),
            (None, false) => "-".into(),
        };
        t.add_row(vec![
            Cell::new(&s.secret_id),
            Cell::new(&s.display_name),
            Cell::new(usage),
            Cell::new(if s.hosts.is_empty() {
                "-".to_string()
            } else {
                s.hosts.join(",")
            }),
            Cell::new(last_use),
            Cell::new(refresh(s)),
            Cell::new(age(&s.create_time)),
        ]);
    }
    t
}

/// An OAuth credential's last refresh: when, and its error if it failed.
fn refresh(s: &pb::Secret) -> String {
    match (&s.last_refresh_time, s.last_refresh_error.as_str()) {
        (None, _) if s.oauth.is_some() => "never".into(),
        (None, _) => "-".into(),
        (Some(t), "") => format!("{} ago", age(&Some(*t))),
        (Some(t), why) => format!("failed {} ago: {why}", age(&Some(*t))),
    }
}

pub(crate) async fn secrets(api: Api, d: &str, out: Out, cmd: SecretsCmd) -> Result<(), CliError> {
    let mut c = SecretsClient::new(api);
    let e = |s| explain(d, None, s);
    match cmd {
        SecretsCmd::Create {
            name,
            usage,
            hosts,
            header,
            header_prefix,
            token_url,
            client_id,
            client_secret_file,
            scope,
        } => {
            let client_secret = match &client_secret_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| {
                        CliError::new(format!("--client-secret-file {}: {e}", f.display()))
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                None => String::new(),
            };
            let oauth_usage = matches!(usage, UsageArg::Oauth2Refresh);
            if oauth_usage && (token_url.is_none() || client_id.is_empty()) {
                return Err(CliError::new(
                    "--usage oauth2-refresh needs --token-url and --client-id (and --client-secret-file for a confidential client)",
                ));
            }
            if !oauth_usage && (token_url.is_some() || client_secret_file.is_some()) {
                return Err(CliError::new(
                    "--token-url, --client-id and --client-secret-file are for --usage oauth2-refresh",
                ));
            }
            let oauth = token_url.map(|token_url| pb::OAuth2Client {
                token_url,
                client_id,
                client_secret,
                scope,
            });
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .map_err(|e| CliError::new(format!("reading the secret from stdin: {e}")))?;
            let usage = match usage {
                UsageArg::AnthropicApiKey => pb::SecretUsage::AnthropicApiKey,
                UsageArg::GitSshKey => pb::SecretUsage::GitSshKey,
                UsageArg::HttpHeader => pb::SecretUsage::HttpHeader,
                UsageArg::Oauth2Refresh => pb::SecretUsage::Oauth2Refresh,
            };
            let header =
                (!header.is_empty() || !header_prefix.is_empty()).then_some(pb::HttpHeader {
                    name: header,
                    prefix: header_prefix,
                });
            let s = c
                .create_secret(pb::CreateSecretRequest {
                    display_name: name,
                    usage: usage as i32,
                    // A key file keeps its final newline; a token loses it.
                    value: match usage {
                        pb::SecretUsage::GitSshKey => value,
                        _ => value.trim_end_matches(['\n', '\r']).to_string(),
                    },
                    hosts,
                    header,
                    oauth,
                })
                .await
                .map_err(e)?
                .into_inner();
            let one = std::slice::from_ref(&s);
            out.list(one, |s| s.name.clone(), |o| table(o, one))?;
        }
        SecretsCmd::List => {
            let r = c
                .list_secrets(pb::ListSecretsRequest {})
                .await
                .map_err(e)?
                .into_inner();
            out.list(&r.secrets, |s| s.name.clone(), |o| table(o, &r.secrets))?;
        }
        SecretsCmd::Delete { secret_id } => {
            c.delete_secret(pb::DeleteSecretRequest { name: secret_id })
                .await
                .map_err(e)?;
        }
    }
    Ok(())
}
