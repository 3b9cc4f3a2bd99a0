//! `berth keys`, `berth whoami` and `berth config`
//! (named contexts: dispatcher, token, TLS files, as kubectl has).

use std::collections::BTreeMap;
use std::path::PathBuf;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, api_keys_client::ApiKeysClient};
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use comfy_table::Cell;

use crate::output::{Out, age};
use crate::render::dash;
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
                .map_err(|e| CliError::new(format!("{}: not a berth config: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CliError::new(format!("{}: {e}", path.display()))),
        }
    }

    fn save(&self) -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = config_path();
        let err = |e: std::io::Error| CliError::new(format!("{}: {e}", path.display()));
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
            CliError::new(format!(
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
                .map_err(|e| CliError::new(format!("token file {}: {e}", p.display()))),
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
            crate::output::line(format!(
                "context `{name}` saved in {}",
                config_path().display()
            ))?;
        }
        ConfigCmd::UseContext { name } => {
            file.context(Some(&name))?;
            file.current_context = name.clone();
            file.save()?;
            crate::output::line(format!("current context: {name}"))?;
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
                crate::output::line(format!(
                    "{mark} {name}\t{}\t{auth}",
                    c.dispatcher.as_deref().unwrap_or("(default dispatcher)")
                ))?;
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

/// API keys as a table; wide adds the revocation time.
fn key_table(out: &Out, keys: &[pb::ApiKey]) -> comfy_table::Table {
    let mut header = vec!["KEY", "PROJECT", "ROLE", "NAME", "STATE", "AGE"];
    if out.wide() {
        header.push("REVOKED");
    }
    let mut t = out.table(&header);
    for k in keys {
        let role = match pb::Role::try_from(k.role) {
            Ok(pb::Role::FleetAdmin) => "fleet-admin",
            _ => "member",
        };
        let state = if k.revoke_time.is_some() {
            "revoked"
        } else {
            "active"
        };
        let mut row = vec![
            Cell::new(&k.key_id),
            Cell::new(&k.project),
            Cell::new(role),
            Cell::new(dash(&k.display_name)),
            out.status(state),
            Cell::new(age(&k.create_time)),
        ];
        if out.wide() {
            row.push(Cell::new(if k.revoke_time.is_some() {
                age(&k.revoke_time) + " ago"
            } else {
                "-".into()
            }));
        }
        t.add_row(row);
    }
    t
}

fn key_name(k: &pb::ApiKey) -> String {
    format!("keys/{}", k.key_id)
}

pub(crate) async fn keys(api: Api, d: &str, out: Out, cmd: KeysCmd) -> Result<(), CliError> {
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
            let k = r.key.clone().unwrap_or_default();
            if !out.machine() {
                eprint!("{}", key_table(&out, std::slice::from_ref(&k)));
                eprintln!("\nthe token below is shown only now; berth keeps only its hash:");
            }
            // `name` prints the token: what a script creating a key wants.
            out.object(&r, &r.token, || r.token.clone())?;
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
            out.list(&r.keys, key_name, |o| key_table(o, &r.keys))?;
        }
        KeysCmd::Revoke { key_id } => {
            let k = c
                .revoke_api_key(pb::RevokeApiKeyRequest { name: key_id })
                .await
                .map_err(e)?
                .into_inner();
            let one = std::slice::from_ref(&k);
            out.list(one, key_name, |o| key_table(o, one))?;
        }
    }
    Ok(())
}

pub(crate) async fn whoami(api: Api, d: &str, out: Out) -> Result<(), CliError> {
    let k = ApiKeysClient::new(api)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| explain(d, None, s))?
        .into_inner();
    let one = std::slice::from_ref(&k);
    out.list(one, key_name, |o| key_table(o, one))
}
