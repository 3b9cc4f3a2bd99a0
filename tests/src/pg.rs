//! A Postgres server of a test's own, for faults that take the database
//! away: the shared server (scripts/setup.sh) is never stopped by a test.

use std::path::PathBuf;
use std::process::Command;

/// A private Postgres server on a loopback port, with `trust` auth, run
/// as the `postgres` user when the tests run as root.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    root: bool,
    /// With TLS: the server's certificate and key, and its CA's file.
    tls: Option<PathBuf>,
    /// Clients authenticate by a certificate of that CA (`hostssl … cert`).
    client_certs: bool,
}

fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let v = versions.last().ok_or_else(|| {
        anyhow::anyhow!("no Postgres under /usr/lib/postgresql (run scripts/setup.sh)")
    })?;
    Ok(PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
}

impl PrivatePostgres {
    /// Creates and starts a fresh server.
    pub fn start() -> anyhow::Result<Self> {
        let root = running_as_root();
        let port = crate::free_addr()?.port();
        let dir = std::env::temp_dir().join(format!(
            "berth-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir)?;
        let pg = Self {
            dir,
            bin: pg_bin()?,
            port,
            root,
            tls: None,
            client_certs: false,
        };
        if root {
            run(Command::new("chown").arg("postgres:postgres").arg(&pg.dir))?;
        }
        pg.pg(&[
            "initdb",
            "-D",
            "",
            "-U",
            "berth",
            "--auth=trust",
            "-E",
            "UTF8",
        ])?;
        pg.start_again()?;
        Ok(pg)
    }

    /// A fresh server that takes TLS connections only, with a certificate
    /// for `localhost` signed by `ca`, as managed Postgres services do.
    pub fn start_tls(ca: &berth_common::tls::DevCa) -> anyhow::Result<Self> {
        let mut pg = Self::start()?;
        pg.stop()?;
        let issued = ca.issue(
            berth_common::tls::CertKind::Node,
            &["localhost".to_string()],
        )?;
        let data = pg.dir.join("data");
        std::fs::write(data.join("server.crt"), &issued.cert_pem)?;
        std::fs::write(data.join("server.key"), &issued.key_pem)?;
        std::fs::write(pg.dir.join("ca.pem"), &ca.cert_pem)?;
        // Only TLS over TCP; the local socket stays for the server's tools.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        if pg.root {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&data))?;
        }
        pg.tls = Some(pg.dir.join("ca.pem"));
        pg.start_again()?;
        Ok(pg)
    }

    /// Makes the (TLS) server authenticate clients by certificate only: a
    /// certificate of its CA whose common name is the user (`berth`), as
    /// managed services offer instead of passwords.
    pub fn require_client_certs(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.tls.is_some(), "client certificates need a TLS server");
        self.stop()?;
        std::fs::write(
            self.dir.join("data/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\nhostssl all all ::1/128 cert\n",
        )?;
        self.client_certs = true;
        self.start_again()
    }

    /// The URL of a TLS server that checks its certificate against the CA
    /// (`sslmode=verify-full`), as a managed database is reached.
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|ca| {
            format!(
                "postgres://berth@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
                self.port,
                ca.display()
            )
        })
    }

    /// `postgres://berth@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://berth@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (`immediate`: like a crash).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg(&["pg_ctl", "-D", "", "-m", "immediate", "-w", "stop"])
    }

    /// Starts the (stopped) server again, and waits until it takes connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.display()
        );
        if self.tls.is_some() {
            opts.push_str(" -c ssl=on");
        }
        if let Some(ca) = self.tls.as_ref().filter(|_| self.client_certs) {
            opts.push_str(&format!(" -c ssl_ca_file={}", ca.display()));
        }
        let log = self.dir.join("server.log");
        let log = log.to_string_lossy();
        self.pg(&["pg_ctl", "-D", "", "-o", &opts, "-l", &log, "-w", "start"])
    }

    /// Runs a Postgres program; `""` after `-D` is the data directory.
    fn pg(&self, args: &[&str]) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let data = data.to_string_lossy().to_string();
        let mut argv: Vec<String> = args
            .iter()
            .map(|a| {
                if a.is_empty() {
                    data.clone()
                } else {
                    (*a).to_string()
                }
            })
            .collect();
        argv[0] = self.bin.join(&argv[0]).to_string_lossy().to_string();
        let mut cmd = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(&argv);
            c
        } else {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        };
        run(&mut cmd)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` to its end; an error with its output when it fails.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Whether this process runs as root (initdb refuses root).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
