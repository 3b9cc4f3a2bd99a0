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
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
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
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.display()
        );
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

fn run(cmd: &mut Command) -> anyhow::Result<()> {
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
