//! Certificates that rotate under a running process.
//!
//! A Kubernetes Secret mount (cert-manager renewing every few weeks) or an
//! operator replaces the files in place. [`LiveTls::watch`] reads them every
//! `--tls-reload-interval`; when they changed and form a whole, valid set
//! (the key matches the certificate, the CA parses) it builds new rustls
//! configs and swaps them in. New connections use them; connections already
//! open keep theirs, so no stream drops. A half-written or broken set is
//! refused with a warning and the current one stays.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::{TlsMaterial, cert_names};

/// The files a [`LiveTls`] reloads from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One consistent set: the material and the configs built from it.
struct Built {
    material: TlsMaterial,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

/// The current TLS configuration of a process, reloaded from its files.
pub struct LiveTls {
    files: Option<TlsFiles>,
    interval: Duration,
    current: RwLock<Arc<Built>>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("files", &self.files)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl LiveTls {
    /// Configs for `material`, reloaded from `files` (when given) every
    /// `interval` once [`Self::watch`] runs.
    pub fn new(
        material: TlsMaterial,
        files: Option<TlsFiles>,
        interval: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let built = build(material)?;
        Ok(Arc::new(Self {
            files,
            interval,
            current: RwLock::new(Arc::new(built)),
        }))
    }

    fn current(&self) -> Arc<Built> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The server config for the next handshake: our certificate, and a
    /// client certificate signed by the CA required.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }

    /// The client config for the next connection: our certificate, and the
    /// server's verified against the CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.current().client.clone()
    }

    /// The current material.
    pub fn material(&self) -> TlsMaterial {
        self.current().material.clone()
    }

    /// Re-reads the files every interval until `stop`; a no-op without
    /// files.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let Some(files) = self.files.clone() else {
            return;
        };
        if self.interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload(&files) {
                Ok(false) => {}
                Ok(true) => {
                    let m = self.material();
                    tracing::info!(
                        cert = %files.cert.display(),
                        names = ?leaf_names(&m.cert_pem),
                        "TLS certificate reloaded; new connections use it"
                    );
                }
                Err(e) => tracing::warn!(
                    cert = %files.cert.display(),
                    error = %e,
                    "the TLS files changed but do not form a valid set; keeping the current one"
                ),
            }
        }
    }

    /// Reads the files; swaps in a new set when they changed. `Ok(false)`
    /// when they did not.
    fn reload(&self, files: &TlsFiles) -> anyhow::Result<bool> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        let material = TlsMaterial {
            ca_pem: read(&files.ca)?,
            cert_pem: read(&files.cert)?,
            key_pem: read(&files.key)?,
        };
        let current = self.current();
        if material.ca_pem == current.material.ca_pem
            && material.cert_pem == current.material.cert_pem
            && material.key_pem == current.material.key_pem
        {
            return Ok(false);
        }
        let built = build(material)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(built);
        Ok(true)
    }
}

/// The names on the first certificate of `pem`.
fn leaf_names(pem: &str) -> Vec<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| cert_names(&c))
        .unwrap_or_default()
}

/// The configs for `material`; an error when its parts do not fit.
fn build(material: TlsMaterial) -> anyhow::Result<Built> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "certificate: no PEM certificate");
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(material.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| anyhow::anyhow!("CA: {e}"))?;
        roots.add(ca).map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    }
    anyhow::ensure!(!roots.is_empty(), "CA: no PEM certificate");
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| anyhow::anyhow!("CA: {e}"))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| anyhow::anyhow!("certificate and key: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("certificate and key: {e}"))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built {
        material,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertKind, DevCa};

    fn write(dir: &std::path::Path, m: &TlsMaterial) {
        std::fs::write(dir.join("ca.pem"), &m.ca_pem).expect("write");
        std::fs::write(dir.join("tls.pem"), &m.cert_pem).expect("write");
        std::fs::write(dir.join("tls.key"), &m.key_pem).expect("write");
    }

    #[test]
    fn changed_files_are_swapped_in_and_a_broken_set_is_refused() {
        let ca = DevCa::generate("live test CA").expect("ca");
        let first = ca.material(&ca.issue(CertKind::Node, &["a".into()]).expect("issue"));
        let second = ca.material(&ca.issue(CertKind::Node, &["b".into()]).expect("issue"));
        let dir = std::env::temp_dir().join(format!("berth-live-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        write(&dir, &first);
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("tls.pem"),
            key: dir.join("tls.key"),
        };
        let live =
            LiveTls::new(first.clone(), Some(files.clone()), Duration::from_secs(1)).expect("live");
        assert!(!live.reload(&files).expect("same files"), "nothing changed");

        write(&dir, &second);
        assert!(live.reload(&files).expect("a new set"));
        assert_eq!(leaf_names(&live.material().cert_pem), ["b", "b"]);

        // Half an update: the new certificate with the old key.
        std::fs::write(dir.join("tls.pem"), &first.cert_pem).expect("write");
        let err = live
            .reload(&files)
            .expect_err("a mismatched key is refused");
        assert!(err.to_string().contains("certificate and key"), "{err}");
        assert_eq!(
            leaf_names(&live.material().cert_pem),
            ["b", "b"],
            "the current set stays"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
