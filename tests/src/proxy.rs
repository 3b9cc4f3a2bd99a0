//! A TCP proxy that can go silent, as a hung or partitioned node does.

use super::*;

/// A TCP proxy in front of a node that can go silent: while paused it
/// forwards nothing but keeps every connection open, as a hung or
/// partitioned machine does. Only the node *lease* can tell.
pub struct Proxy {
    pub addr: SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub(crate) async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, rx.clone()), pipe(ro, wi, rx));
                });
            }
        });
        Ok(Self { addr, paused })
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
