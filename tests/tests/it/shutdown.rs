//! A dispatcher that shuts down (SIGTERM, a rolling update) finishes the
//! work it has in flight before it exits: an outbound webhook delivery it
//! is sending is answered and recorded, so no other dispatcher sends it
//! again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::*;
use tokio_stream::StreamExt;

/// How long the receiver holds each delivery before it answers.
const HOLD: Duration = Duration::from_secs(2);

/// A receiver on loopback that answers each POST after [`HOLD`].
struct SlowReceiver {
    addr: std::net::SocketAddr,
    /// The `Berth-Delivery` ids it was sent, in order.
    got: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn slow_receiver() -> anyhow::Result<SlowReceiver> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let id = headers
                    .get("berth-delivery")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                seen.lock().expect("lock").push(id);
                tokio::time::sleep(HOLD).await;
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(SlowReceiver { addr, got, server })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_dispatcher_finishes_the_delivery_it_is_sending() -> anyhow::Result<()> {
    let receiver = slow_receiver().await?;
    let (addr, got) = (receiver.addr, receiver.got.clone());
    let mut cluster = TestCluster::builder()
        .configure_dispatcher(|cfg| {
            cfg.subscription_allow_http_hosts = vec!["127.0.0.1".into()];
            cfg.subscription_retry_base = Duration::from_secs(1);
        })
        .start()
        .await?;
    pb::webhooks_client::WebhooksClient::new(cluster.api())
        .create_subscription(pb::CreateSubscriptionRequest {
            subscription_id: "idle".into(),
            subscription: Some(pb::Subscription {
                url: format!("http://{addr}/hook"),
                event_types: vec!["session.idle".into()],
                ..Default::default()
            }),
        })
        .await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo hi")).await?;
    // The delivery is on its way: the receiver has it and holds it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.lock().expect("lock").is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no delivery reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivery = got.lock().expect("lock")[0].clone();
    // The only dispatcher stops while the receiver still holds it.
    cluster.sigterm_dispatcher().await?;
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbound_deliveries WHERE id = $1::uuid")
            .bind(&delivery)
            .fetch_one(&mut db)
            .await?;
    assert_eq!(
        (status.as_str(), attempts),
        ("delivered", 1),
        "the delivery was answered and recorded before the dispatcher exited"
    );
    // Another dispatcher takes over: it sends nothing again.
    let mut c = cluster.add_dispatcher().await?;
    tokio::time::sleep(HOLD + Duration::from_secs(2)).await;
    let sent: Vec<String> = got.lock().expect("lock").clone();
    assert_eq!(
        sent.iter().filter(|d| **d == delivery).count(),
        1,
        "the delivery was sent once: {sent:?}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await?;
    receiver.server.abort();
    let _ = receiver.server.await;
    Ok(())
}

/// A dispatcher that stops leaves nothing running: with a session it
/// drives and a client's open event stream at the moment of the signal,
/// every task it started (loops, drivers, the event writer, followers, the
/// node links, the API's streams) has ended once `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dispatcher_leaves_no_task_running() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().start().await?;
    let mut d = cluster.add_killable_dispatcher("tasks-owned").await?;
    let mut c = d.client.clone();
    let s = idle_session(&mut c, fake_session("hello")).await?;
    // A tail that is open when the signal comes.
    let mut tail = c
        .stream_events(pb::StreamEventsRequest {
            name: s.name.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    assert!(
        tail.next().await.is_some(),
        "the tail delivers before the stop"
    );
    // What libraries spawned for connections (hyper, tonic's channels)
    // ends as their handles drop, within milliseconds.
    let alive = d.stop_gracefully(Duration::from_secs(1)).await?;
    assert_eq!(alive, 0, "tasks of the stopped dispatcher still alive");
    // The tail ended (UNAVAILABLE: reconnect elsewhere), not hung.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(r) = tail.next().await {
            if r.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "the open tail ended when its dispatcher stopped"
    );
    // The session went on being served by the other dispatcher.
    assert!(
        !turn(&mut cluster.client(), &s.name, "still there?")
            .await?
            .is_empty()
    );
    cluster.shutdown().await
}
