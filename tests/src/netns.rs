//! Network namespaces a test creates (`ip netns`), to partition a node at
//! the kernel: a node process runs inside one, reached only through a
//! relay whose every connection to it is made from inside the namespace.
//! Taking the namespace's loopback down silences those connections (no
//! reset, no error: packets are dropped), as a real partition does.

use std::os::fd::AsFd;

use super::*;

/// A network namespace of its own, removed when dropped (its relays
/// stopped with it).
pub struct NetNs {
    pub name: String,
    /// The relays' tasks, and what stops them.
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::pg::run(std::process::Command::new("ip").args(args))
}

impl NetNs {
    /// Creates a namespace with its loopback up.
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("berth-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            tasks: tokio_util::task::TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        ns.set_connected(true)?;
        Ok(ns)
    }

    /// Partitions (`false`) or heals (`true`) the namespace: its loopback
    /// goes down or up.
    pub fn set_connected(&self, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.name, "link", "set", "lo", state])
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A TCP connection to `addr` made from inside the namespace (by a
    /// thread that enters it), usable from outside.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        connect_in(&self.name, addr).await
    }

    /// A relay on this machine's loopback to `target` inside the namespace,
    /// until [`Self::close`] (or the namespace is dropped).
    pub async fn relay(&self, target: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (name, stop, tasks) = (self.name.clone(), self.stop.clone(), self.tasks.clone());
        self.tasks.spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    },
                };
                let (name, stop) = (name.clone(), stop.clone());
                tasks.spawn(async move {
                    let Ok(mut outbound) = connect_in(&name, target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Ok(addr)
    }

    /// Stops the relays and waits for their tasks.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A TCP connection to `addr` made from inside the namespace `name`.
async fn connect_in(name: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let path = format!("/run/netns/{name}");
    let stream = tokio::task::spawn_blocking(move || {
        // A thread of its own: it stays in the namespace and then ends.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    tokio::net::TcpStream::from_std(stream)
}
