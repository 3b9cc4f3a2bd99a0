//! `berth keys`, `berth secrets`, `berth whoami` and `berth config`
//! (named contexts: dispatcher, token, TLS files, as kubectl has).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, api_keys_client::ApiKeysClient, secrets_client::SecretsClient};
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{CliError, explain};

/// One context: where a dispatcher is and how to prove who we are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatcher: Option<String>,
    /// The token itself (the file is written 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Or a file holding it (read at each call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// `~/.config/berth/config.json` (or `$BERTH_CONFIG`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub current_context: String,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

pub(crate) fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("berth").join("config.json")
}

impl ConfigFile {
    pub(crate) fn load() -> Result<Self, CliError> {
        let path = config_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CliError(format!("{}: not a berth config: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CliError(format!("{}: {e}", path.display()))),
        }
    }

    fn save(&self) -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = config_path();
        let err = |e: std::io::Error| CliError(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        let text = serde_json::to_string_pretty(self).expect("config serializes");
        writeln!(f, "{text}").map_err(err)
    }

    /// The context `name`, or the current one (empty when there is none).
    pub(crate) fn context(&self, name: Option<&str>) -> Result<Context, CliError> {
        let name = name.unwrap_or(&self.current_context);
        if name.is_empty() {
            return Ok(Context::default());
        }
        self.contexts.get(name).cloned().ok_or_else(|| {
            CliError(format!(
                "no context `{name}` in {}; `berth config get-contexts` lists them",
                config_path().display()
            ))
        })
    }
}

impl Context {
    /// The token: itself, or read from its file.
    pub(crate) fn token(&self) -> Result<Option<String>, CliError> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| CliError(format!("token file {}: {e}", p.display()))),
            None => Ok(None),
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum ConfigCmd {
    /// Create or update a context (only the flags given change).
    SetContext {
        name: String,
        #[arg(long)]
        dispatcher: Option<String>,
        /// Stored in the config file (mode 0600).
        #[arg(long)]
        token: Option<String>,
        /// A file holding the token, read at each call.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Also make it the current context.
        #[arg(long)]
        use_it: bool,
    },
    /// Make a context the current one.
    UseContext { name: String },
    /// List the contexts (tokens never shown).
    GetContexts,
}

pub(crate) fn config(cmd: ConfigCmd) -> Result<(), CliError> {
    let mut file = ConfigFile::load()?;
    match cmd {
        ConfigCmd::SetContext {
            name,
            dispatcher,
            token,
            token_file,
            ca,
            cert,
            key,
            use_it,
        } => {
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let c = file.contexts.entry(name.clone()).or_default();
            if dispatcher.is_some() {
                c.dispatcher = dispatcher;
            }
            if token.is_some() {
                c.token = token;
                c.token_file = None;
            }
            if let Some(f) = token_file {
                c.token_file = Some(abs(f));
                c.token = None;
            }
            if let Some(p) = ca {
                c.ca = Some(abs(p));
            }
            if let Some(p) = cert {
                c.cert = Some(abs(p));
            }
            if let Some(p) = key {
                c.key = Some(abs(p));
            }
            if use_it || file.current_context.is_empty() {
                file.current_context = name.clone();
            }
            file.save()?;
            println!("context `{name}` saved in {}", config_path().display());
        }
        ConfigCmd::UseContext { name } => {
            file.context(Some(&name))?;
            file.current_context = name.clone();
            file.save()?;
            println!("current context: {name}");
        }
        ConfigCmd::GetContexts => {
            for (name, c) in &file.contexts {
                let mark = if *name == file.current_context {
                    "*"
                } else {
                    " "
                };
                let auth = match (&c.token, &c.token_file) {
                    (Some(_), _) => "token".to_string(),
                    (None, Some(f)) => format!("token file {}", f.display()),
                    (None, None) => "no token".to_string(),
                };
                println!(
                    "{mark} {name}\t{}\t{auth}",
                    c.dispatcher.as_deref().unwrap_or("(default dispatcher)")
                );
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    Member,
    FleetAdmin,
}

#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Create an API key; its token is printed once.
    Create {
        /// Another project needs a fleet-admin key; default: yours.
        #[arg(long, default_value = "")]
        project: String,
        #[arg(long, value_enum, default_value = "member")]
        role: RoleArg,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (your project; `--project '*'` for all, as a fleet admin).
    List {
        #[arg(long, default_value = "")]
        project: String,
        #[arg(long)]
        show_revoked: bool,
    },
    /// Revoke a key by id.
    Revoke { key_id: String },
}

fn key_line(k: &pb::ApiKey) -> String {
    let role = match pb::Role::try_from(k.role) {
        Ok(pb::Role::FleetAdmin) => "fleet-admin",
        _ => "member",
    };
    let revoked = if k.revoke_time.is_some() {
        "\trevoked"
    } else {
        ""
    };
    format!(
        "{}\t{}\t{role}\t{}{revoked}",
        k.key_id, k.project, k.display_name
    )
}

pub(crate) async fn keys(api: Api, d: &str, json: bool, cmd: KeysCmd) -> Result<(), CliError> {
    let mut c = ApiKeysClient::new(api);
    let e = |s| explain(d, None, s);
    match cmd {
        KeysCmd::Create {
            project,
            role,
            name,
        } => {
            let role = match role {
                RoleArg::Member => pb::Role::Member,
                RoleArg::FleetAdmin => pb::Role::FleetAdmin,
            };
            let r = c
                .create_api_key(pb::CreateApiKeyRequest {
                    project,
                    role: role as i32,
                    display_name: name,
                })
                .await
                .map_err(e)?
                .into_inner();
            let k = r.key.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"key_id": k.key_id, "project": k.project, "token": r.token})
                );
            } else {
                eprintln!("{}", key_line(&k));
                eprintln!("the token below is shown only now; berth keeps only its hash:");
                println!("{}", r.token);
            }
        }
        KeysCmd::List {
            project,
            show_revoked,
        } => {
            let r = c
                .list_api_keys(pb::ListApiKeysRequest {
                    project,
                    show_revoked,
                })
                .await
                .map_err(e)?
                .into_inner();
            for k in &r.keys {
                println!("{}", key_line(k));
            }
        }
        KeysCmd::Revoke { key_id } => {
            let k = c
                .revoke_api_key(pb::RevokeApiKeyRequest { name: key_id })
                .await
                .map_err(e)?
                .into_inner();
            println!("{}", key_line(&k));
        }
    }
    Ok(())
}

pub(crate) async fn whoami(api: Api, d: &str) -> Result<(), CliError> {
    let k = ApiKeysClient::new(api)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| explain(d, None, s))?
        .into_inner();
    println!("{}", key_line(&k));
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum UsageArg {
    /// Sent as `x-api-key` on the session's model API calls by the gateway.
    AnthropicApiKey,
    /// An SSH private key the node clones ssh:// git resources with.
    GitSshKey,
}

#[derive(Subcommand)]
pub(crate) enum SecretsCmd {
    /// Store a secret; its value is read from stdin (never a flag, so it
    /// stays out of shell history and `ps`).
    Create {
        name: String,
        #[arg(long, value_enum)]
        usage: UsageArg,
    },
    List,
    Delete {
        secret_id: String,
    },
}

pub(crate) async fn secrets(
    api: Api,
    d: &str,
    json: bool,
    cmd: SecretsCmd,
) -> Result<(), CliError> {
    let mut c = SecretsClient::new(api);
    let e = |s| explain(d, None, s);
    let line = |s: &pb::Secret| format!("{}\t{}", s.secret_id, s.display_name);
    match cmd {
        SecretsCmd::Create { name, usage } => {
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .map_err(|e| CliError(format!("reading the secret from stdin: {e}")))?;
            let usage = match usage {
                UsageArg::AnthropicApiKey => pb::SecretUsage::AnthropicApiKey,
                UsageArg::GitSshKey => pb::SecretUsage::GitSshKey,
            };
            let s = c
                .create_secret(pb::CreateSecretRequest {
                    display_name: name,
                    usage: usage as i32,
                    // A key file keeps its final newline; a token loses it.
                    value: match usage {
                        pb::SecretUsage::GitSshKey => value,
                        _ => value.trim_end_matches(['\n', '\r']).to_string(),
                    },
                })
                .await
                .map_err(e)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"secret_id": s.secret_id, "name": s.display_name})
                );
            } else {
                println!("{}", line(&s));
            }
        }
        SecretsCmd::List => {
            let r = c
                .list_secrets(pb::ListSecretsRequest {})
                .await
                .map_err(e)?
                .into_inner();
            for s in &r.secrets {
                println!("{}", line(s));
            }
        }
        SecretsCmd::Delete { secret_id } => {
            c.delete_secret(pb::DeleteSecretRequest { name: secret_id })
                .await
                .map_err(e)?;
        }
    }
    Ok(())
}
