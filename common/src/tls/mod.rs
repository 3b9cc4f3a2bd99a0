//! mTLS between dispatchers and nodes: certificate material, tonic TLS
//! configs, peer-name checks, and a development CA (`berth certs`).
//!
//! Identities are names in a certificate's subject alternative names:
//! - a node's certificate carries the name the dispatcher dials it by
//!   (`node-a`, or a headless service name every node shares);
//! - a dispatcher's certificate carries [`DISPATCHER_NAME`]; nodes accept
//!   only client certificates whose names are on their allow-list;
//! - client certificates (for the CLI and services) carry their own names, so
//!   a client certificate from the same CA is never accepted by a node.

mod live;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use live::{LiveTls, TlsFiles};
pub use serve::{connect, incoming};

/// The name a dispatcher's client certificate carries by default.
pub const DISPATCHER_NAME: &str = "berth-dispatcher";

/// PEM material for one side of an mTLS link: the CA to trust, and our own
/// certificate and key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`: the files of [`TlsMaterial`].
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signs every dispatcher and node certificate.
    #[arg(long = "tls-ca", env = "BERTH_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by the CA.
    #[arg(long = "tls-cert", env = "BERTH_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long = "tls-key", env = "BERTH_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// Run the node link without TLS. Local development only: anyone who can
    /// reach the port can run containers. Logged as a warning.
    #[arg(long, env = "BERTH_INSECURE_PLAINTEXT", default_value_t = false)]
    pub insecure_plaintext: bool,
    /// How often the TLS files are read again (seconds): changed files that
    /// form a valid set (a renewed certificate in a Kubernetes Secret
    /// mount, say) are used from the next connection on, with no restart
    /// and no dropped stream. `0`: read once, at start.
    #[arg(long = "tls-reload-interval", env = "BERTH_TLS_RELOAD_INTERVAL", value_parser = crate::time::parse_duration, default_value = "10")]
    pub reload_interval: Duration,
    /// Material given in memory (tests, the in-process node); wins over the files.
    #[arg(skip)]
    pub material: Option<TlsMaterial>,
}

impl Default for TlsArgs {
    fn default() -> Self {
        Self {
            ca: None,
            cert: None,
            key: None,
            insecure_plaintext: false,
            reload_interval: Duration::from_secs(10),
            material: None,
        }
    }
}

impl TlsArgs {
    /// The configured material as a [`LiveTls`] that reloads from the
    /// files (material given in memory never changes); `None` for
    /// plaintext. Run its [`LiveTls::watch`] to reload.
    pub fn live(&self) -> anyhow::Result<Option<Arc<LiveTls>>> {
        let Some(material) = self.load()? else {
            return Ok(None);
        };
        let files = match (&self.material, &self.ca, &self.cert, &self.key) {
            (None, Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        LiveTls::new(material, files, self.reload_interval)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--tls-ca, --tls-cert, --tls-key: {e}"))
    }

    /// The configured material, `None` for plaintext. Errors name the flag
    /// that is missing or unreadable.
    pub fn load(&self) -> anyhow::Result<Option<TlsMaterial>> {
        if let Some(m) = &self.material {
            return Ok(Some(m.clone()));
        }
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => {
                anyhow::ensure!(
                    self.insecure_plaintext,
                    "mTLS is required: set --tls-ca, --tls-cert and --tls-key \
                     (BERTH_TLS_CA/CERT/KEY; `berth certs init` makes a development set), \
                     or pass --insecure-plaintext for local development"
                );
                Ok(None)
            }
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsMaterial {
                ca_pem: read(ca, "--tls-ca")?,
                cert_pem: read(cert, "--tls-cert")?,
                key_pem: read(key, "--tls-key")?,
            })),
            _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key must be given together"),
        }
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{flag}: cannot read {}: {e}", path.display()))
}

impl TlsMaterial {
    /// A server config that requires a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// A client config that presents our certificate and verifies the server
    /// against the CA and `server_name` (the name we dialled).
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }
}

/// The DER of the first certificate in `pem`.
pub fn first_cert_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
    Ok(cert.to_vec())
}

/// The DNS names (subject alternative names, then the common name) in a DER
/// certificate. Empty when it cannot be parsed.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push((*n).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    names
}

/// Checks that the request's client certificate carries one of `allowed`.
/// For servers that already require a CA-signed certificate at the handshake.
pub fn check_peer(req: &tonic::Request<()>, allowed: &[String]) -> Result<(), tonic::Status> {
    let Some(certs) = req.peer_certs() else {
        return Err(tonic::Status::unauthenticated(
            "a client certificate is required",
        ));
    };
    let names = certs.first().map(|c| cert_names(c)).unwrap_or_default();
    if names.iter().any(|n| allowed.contains(n)) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "client certificate names {names:?} are not allowed here (allowed: {allowed:?}; see --tls-allowed-clients)"
        )))
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertKind {
    /// An agent-server: a TLS server, named as dispatchers dial it.
    Node,
    /// A dispatcher: a client of nodes and a server of the public API.
    Dispatcher,
    /// A client of the public API (CLI, services).
    Client,
}

/// A development certificate authority.
pub struct DevCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate and its key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevCa {
    /// A new CA with a fresh key, valid for ten years.
    pub fn generate(common_name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (y, m, d) = days_from_now(3650);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| anyhow::anyhow!("the CA key is not a PEM private key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| anyhow::anyhow!("the CA certificate cannot be parsed: {e}"))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// The CA's private key, PEM. Keep it off the machines that run berth.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for `names` (the first is also the common name),
    /// valid for a year.
    pub fn issue(&self, kind: CertKind, names: &[String]) -> anyhow::Result<Issued> {
        self.issue_for(kind, names, Duration::from_secs(365 * 24 * 3600))
    }

    /// As [`Self::issue`], valid for `valid_for` from now (a short-lived
    /// certificate, as cert-manager renews).
    pub fn issue_for(
        &self,
        kind: CertKind,
        names: &[String],
        valid_for: Duration,
    ) -> anyhow::Result<Issued> {
        anyhow::ensure!(!names.is_empty(), "a certificate needs at least one name");
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match kind {
            CertKind::Node => vec![ExtendedKeyUsagePurpose::ServerAuth],
            CertKind::Dispatcher => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            CertKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + valid_for;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Material for a process holding `issued`, trusting this CA.
    pub fn material(&self, issued: &Issued) -> TlsMaterial {
        TlsMaterial {
            ca_pem: self.cert_pem.clone(),
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
        }
    }
}

/// The date `days` from today (UTC), as rcgen takes it.
fn days_from_now(days: i64) -> (i32, u8, u8) {
    use chrono::Datelike;
    let d = chrono::Utc::now().date_naive() + chrono::Duration::days(days);
    // Month and day always fit in a u8.
    (d.year(), d.month() as u8, d.day() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        pem.contents
    }

    #[test]
    fn issued_certificates_carry_their_names_and_a_loaded_ca_still_signs() {
        let ca = DevCa::generate("berth test CA").expect("ca");
        let node = ca
            .issue(CertKind::Node, &["node-a".into(), "nodes.berth".into()])
            .expect("issue");
        assert_eq!(
            cert_names(&der(&node.cert_pem)),
            ["node-a", "nodes.berth", "node-a"]
        );

        let reloaded = DevCa::load(&ca.cert_pem, &ca.key_pem()).expect("load");
        let client = reloaded
            .issue(CertKind::Client, &["alice".into()])
            .expect("issue from a loaded CA");
        assert!(cert_names(&der(&client.cert_pem)).contains(&"alice".to_string()));
        assert!(DevCa::load(&ca.cert_pem, "not a key").is_err());
    }

    #[test]
    fn missing_tls_files_are_an_error_unless_plaintext_is_explicit() {
        let err = TlsArgs::default().load().expect_err("no material");
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let plain = TlsArgs {
            insecure_plaintext: true,
            ..TlsArgs::default()
        };
        assert!(plain.load().expect("plaintext").is_none());
        let partial = TlsArgs {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        assert!(partial.load().is_err());
    }
}
