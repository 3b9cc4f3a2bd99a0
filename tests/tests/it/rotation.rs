//! Certificates rotate under a live fleet, as cert-manager renews them into
//! a Kubernetes Secret mount: no restart, no dropped stream, and every new
//! connection on the new certificate.

use std::time::{Duration, Instant};

use berth_common::tls::{CertKind, DISPATCHER_NAME, TlsArgs};
use berth_tests::*;

/// How long the dispatcher's first certificate is valid.
const SHORT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_live_fleet() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let node =
        ProcessNode::start(&cluster, &["--capacity", "4", "--tls-reload-interval", "1"]).await?;
    // Between the dispatcher and the node: a proxy that can drop every
    // connection, so the dispatcher has to dial again.
    let proxy = Proxy::start(node.resolve.1).await?;

    // The dispatcher's certificate is short-lived, as cert-manager's are.
    let dir = std::env::temp_dir().join(format!("berth-rotate-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let issued_at = Instant::now();
    let first =
        cluster
            .ca
            .issue_for(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()], SHORT)?;
    std::fs::write(dir.join("ca.pem"), &cluster.ca.cert_pem)?;
    std::fs::write(dir.join("tls.pem"), &first.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &first.key_pem)?;
    let (url, route) = (node.url.clone(), (node.resolve.0.clone(), proxy.addr));
    let files = dir.clone();
    let mut c = cluster
        .add_dispatcher_configured("rotating", "127.0.0.1:0".parse()?, move |cfg| {
            cfg.agent_servers = vec![url];
            cfg.node_resolve = vec![route];
            cfg.tls = TlsArgs {
                ca: Some(files.join("ca.pem")),
                cert: Some(files.join("tls.pem")),
                key: Some(files.join("tls.key")),
                reload_interval: Duration::from_secs(1),
                ..TlsArgs::default()
            };
        })
        .await?;
    cluster.sigterm_dispatcher().await?;
    let s = idle_session(&mut c, fake_session("echo before")).await?;
    let epoch = get(&mut c, &s.name).await?.epoch;

    // Both sides' files are replaced while the session's stream is open.
    let renewed = cluster
        .ca
        .issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?;
    for (file, pem) in [
        ("tls.pem", &renewed.cert_pem),
        ("tls.key", &renewed.key_pem),
    ] {
        std::fs::write(dir.join(format!("{file}.new")), pem)?;
        std::fs::rename(dir.join(format!("{file}.new")), dir.join(file))?;
    }
    let node_renewed = cluster
        .ca
        .issue(CertKind::Node, std::slice::from_ref(&node.id))?;
    node.write_tls(&node_renewed)?;

    // The node serves its new certificate to the next connection.
    let probe =
        berth_common::tls::LiveTls::new(cluster.ca.material(&renewed), None, Duration::ZERO)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tls = berth_common::tls::connect(&probe, node.resolve.1, &node.id).await?;
        let served = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("a server certificate")[0]
            .to_vec();
        if served == berth_common::tls::first_cert_der(&node_renewed.cert_pem)? {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the node still serves its old certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The stream that was open goes on: a turn, on the same run.
    assert_eq!(turn(&mut c, &s.name, "echo during").await?, "during");
    assert_eq!(
        get(&mut c, &s.name).await?.epoch,
        epoch,
        "the session was not moved"
    );

    // Once the first certificate has expired, every connection is dropped:
    // the dispatcher dials again, and only its renewed certificate is let in.
    let expired =
        (issued_at + SHORT + Duration::from_secs(1)).saturating_duration_since(Instant::now());
    tokio::time::sleep(expired).await;
    proxy.cut();
    let fresh = idle_session(&mut c, fake_session("echo after")).await?;
    assert_eq!(turn(&mut c, &fresh.name, "echo again").await?, "again");
    assert_eq!(turn(&mut c, &s.name, "echo still").await?, "still");
    stop_and_wait(&mut c, &fresh.name).await?;
    stop_and_wait(&mut c, &s.name).await?;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    cluster.shutdown().await
}
