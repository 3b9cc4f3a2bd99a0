//! A git server over ssh on loopback: the system's `sshd` (Debian's
//! openssh-server, installed by `scripts/setup.sh`) with a host key and one
//! authorized user key of its own, serving bare repositories under a
//! directory. Clusters that use it allowlist its address explicitly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub struct SshGitServer {
    pub addr: SocketAddr,
    /// The private key that may log in (OpenSSH format).
    pub user_key: String,
    dir: PathBuf,
    child: Child,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl SshGitServer {
    /// Starts sshd on a free loopback port; repositories live under
    /// [`SshGitServer::root`].
    pub fn start() -> anyhow::Result<Self> {
        let sshd = Path::new("/usr/sbin/sshd");
        anyhow::ensure!(sshd.is_file(), "no /usr/sbin/sshd: run scripts/setup.sh");
        let dir =
            std::env::temp_dir().join(format!("berth-sshd-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("repos"))?;
        for key in ["host_key", "user_key"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)))?;
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd")?;
        let addr = crate::free_addr()?;
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into());
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nAllowUsers {user}\nPidFile {dir}/sshd.pid\n",
            port = addr.port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let user_key = std::fs::read_to_string(dir.join("user_key"))?;
        let server = Self {
            addr,
            user_key,
            dir,
            child,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        anyhow::bail!("sshd did not listen on {addr}")
    }

    /// Where bare repositories go.
    pub fn root(&self) -> PathBuf {
        self.dir.join("repos")
    }

    /// The ssh URL of repository `name` under the root.
    pub fn url(&self, name: &str) -> String {
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into());
        format!("ssh://{user}@{}{}/{name}", self.addr, self.root().display())
    }

    /// What a cluster allowlists to reach it: `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for SshGitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
