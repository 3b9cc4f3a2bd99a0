//! A TCP proxy that can go silent, as a hung or partitioned node does, or
//! drop every connection, as a restarted load balancer does.

use super::*;

/// A TCP proxy in front of a node that can go silent: while paused it
/// forwards nothing but keeps every connection open, as a hung or
/// partitioned machine does. Only the node *lease* can tell.
pub struct Proxy {
    pub addr: SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
    /// Bumped by [`Proxy::cut`]: connections of an older generation end.
    generation: tokio::sync::watch::Sender<u64>,
    /// The accept loop; its connections are a `JoinSet` of it, so aborting
    /// it (on drop) ends every one.
    server: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, rx) = tokio::sync::watch::channel(false);
        let (generation, generations) = tokio::sync::watch::channel(0u64);
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                // Reap the ones that ended.
                while connections.try_join_next().is_some() {}
                let rx = rx.clone();
                let mut cut = generations.clone();
                let born = *cut.borrow_and_update();
                connections.spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let both = async { tokio::join!(pipe(ri, wo, rx.clone()), pipe(ro, wi, rx)) };
                    tokio::select! {
                        _ = both => {}
                        _ = cut.wait_for(|g| *g != born) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            paused,
            generation,
            server,
        })
    }

    /// Drops every open connection at once; new ones go through.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Pauses (silences) or resumes forwarding.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}
