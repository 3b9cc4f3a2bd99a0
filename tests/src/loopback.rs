//! A server (an axum app, or any) on a loopback port for the length of a test: the
//! task is owned, shut down gracefully by [`Loopback::stop`] (which awaits
//! it), and cancelled and aborted if the test drops it early.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

pub struct Loopback {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Loopback {
    /// Serves `app` on `127.0.0.1` at a free port.
    pub async fn serve(app: axum::Router) -> anyhow::Result<Self> {
        Self::own(|listener, stop| async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        })
        .await
    }

    /// Runs the server `serve` makes of a listener on `127.0.0.1` at a free
    /// port, which must end once its token is cancelled.
    pub async fn own<F>(
        serve: impl FnOnce(tokio::net::TcpListener, CancellationToken) -> F,
    ) -> anyhow::Result<Self>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, stop.clone()));
        Ok(Self {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// Stops serving and waits until the server's task has ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
