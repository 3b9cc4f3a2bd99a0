//! `berth certs`: a development CA and the certificates mTLS needs, written
//! as PEM files an operator points the services at.

use std::path::{Path, PathBuf};

use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
use clap::Subcommand;

use crate::CliError;

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a CA, a dispatcher certificate, and node and client certificates.
    Init {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A node certificate for this name, as dispatchers dial it
        /// (`https://NAME:7443`). Repeatable.
        #[arg(long = "node", default_value = "localhost")]
        nodes: Vec<String>,
        /// A client certificate for this name (CLI users, services). Repeatable.
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more certificate from the CA in --dir.
    Issue {
        /// What the certificate is for.
        #[arg(value_enum)]
        kind: CertKind,
        /// Its name: a node's dial name, `berth-dispatcher`, or a client's name.
        name: String,
        /// Further DNS names it is valid for (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Directory holding ca.pem and ca-key.pem; the certificate goes there too.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

fn write(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CliError> {
    if path.exists() && !force {
        return Err(CliError::new(format!(
            "{} exists; pass --force to overwrite",
            path.display()
        )));
    }
    std::fs::write(path, contents).map_err(|e| err(format!("write {}: {e}", path.display())))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("chmod {}: {e}", path.display())))?;
    }
    Ok(())
}

fn file_stem(kind: CertKind, name: &str) -> String {
    match kind {
        CertKind::Node => format!("node-{name}"),
        CertKind::Dispatcher => "dispatcher".to_string(),
        CertKind::Client => format!("client-{name}"),
    }
}

fn issue(
    ca: &DevCa,
    dir: &Path,
    kind: CertKind,
    names: &[String],
    force: bool,
) -> Result<PathBuf, CliError> {
    let issued = ca.issue(kind, names).map_err(err)?;
    let stem = file_stem(kind, &names[0]);
    let cert = dir.join(format!("{stem}.pem"));
    write(&cert, &issued.cert_pem, false, force)?;
    write(
        &dir.join(format!("{stem}-key.pem")),
        &issued.key_pem,
        true,
        force,
    )?;
    Ok(cert)
}

pub fn run(cmd: CertsCmd) -> Result<(), CliError> {
    match cmd {
        CertsCmd::Init {
            dir,
            nodes,
            clients,
            force,
        } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| err(format!("create {}: {e}", dir.display())))?;
            let ca = DevCa::generate("berth development CA").map_err(err)?;
            write(&dir.join("ca.pem"), &ca.cert_pem, false, force)?;
            write(&dir.join("ca-key.pem"), &ca.key_pem(), true, force)?;
            let mut made = vec![dir.join("ca.pem")];
            made.push(issue(
                &ca,
                &dir,
                CertKind::Dispatcher,
                &[DISPATCHER_NAME.into()],
                force,
            )?);
            for n in &nodes {
                made.push(issue(
                    &ca,
                    &dir,
                    CertKind::Node,
                    std::slice::from_ref(n),
                    force,
                )?);
            }
            for c in &clients {
                made.push(issue(
                    &ca,
                    &dir,
                    CertKind::Client,
                    std::slice::from_ref(c),
                    force,
                )?);
            }
            for m in &made {
                crate::output::line(format!("wrote {}", m.display()))?;
            }
            let d = dir.display();
            crate::output::line(format!(
                "\nnodes:       BERTH_TLS_CA={d}/ca.pem BERTH_TLS_CERT={d}/node-NAME.pem BERTH_TLS_KEY={d}/node-NAME-key.pem\n\
                 dispatcher:  BERTH_TLS_CA={d}/ca.pem BERTH_TLS_CERT={d}/dispatcher.pem BERTH_TLS_KEY={d}/dispatcher-key.pem\n\
                 Keep {d}/ca-key.pem off the machines that run berth; `berth certs issue` needs it."
            ))?;
            Ok(())
        }
        CertsCmd::Issue {
            kind,
            name,
            sans,
            dir,
            force,
        } => {
            let read = |f: &str| {
                let p = dir.join(f);
                std::fs::read_to_string(&p).map_err(|e| {
                    err(format!(
                        "read {}: {e} (run `berth certs init --dir {}` first)",
                        p.display(),
                        dir.display()
                    ))
                })
            };
            let ca = DevCa::load(&read("ca.pem")?, &read("ca-key.pem")?).map_err(err)?;
            let mut names = vec![name];
            names.extend(sans);
            let cert = issue(&ca, &dir, kind, &names, force)?;
            crate::output::line(format!("wrote {}", cert.display()))?;
            Ok(())
        }
    }
}
