//! Production's dependencies as managed services give them: a Postgres that
//! takes TLS connections only, its certificate checked against its CA; an
//! object store reached with the credentials a cloud hands a pod (web
//! identity, as IRSA), and asked to encrypt what it stores.

use std::time::Duration;

use berth_common::objects::{ObjectStore, SseMode};
use berth_common::tls::DevCa;
use berth_proto::v1 as pb;
use berth_tests::pg::PrivatePostgres;
use berth_tests::sts::Sts;
use berth_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_runs_on_a_postgres_that_requires_tls() -> anyhow::Result<()> {
    let ca = DevCa::generate("managed Postgres CA")?;
    let pg = PrivatePostgres::start_tls(&ca)?;
    let url = pg.tls_url().expect("a TLS server");
    // The server takes no plaintext connection.
    let plain = format!("{}?sslmode=disable", pg.url());
    let Err(refused) = <sqlx::PgConnection as sqlx::Connection>::connect(&plain).await else {
        anyhow::bail!("plaintext was accepted");
    };
    assert!(
        refused.to_string().contains("pg_hba.conf"),
        "refused for its missing TLS: {refused}"
    );
    // A dispatcher on `sslmode=verify-full` migrates, queues and runs a
    // session.
    let cluster = TestCluster::builder().database(url).start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo over tls")).await?;
    assert_eq!(turn(&mut c, &s.name, "echo still").await?, "still");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// A server that authenticates by client certificate (`hostssl … cert`)
/// refuses a connection without one, and takes a dispatcher that presents
/// one (`sslcert`, `sslkey`), which then runs sessions on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_authenticates_to_postgres_with_a_client_certificate() -> anyhow::Result<()>
{
    let ca = DevCa::generate("managed Postgres CA")?;
    let mut pg = PrivatePostgres::start_tls(&ca)?;
    pg.require_client_certs()?;
    let url = pg.tls_url().expect("a TLS server");
    let Err(refused) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await else {
        anyhow::bail!("a connection without a client certificate was accepted");
    };
    assert!(
        refused.to_string().contains("certificate"),
        "refused for its missing certificate: {refused}"
    );
    // Postgres maps the certificate's common name to the user.
    let client = ca.issue(berth_common::tls::CertKind::Client, &["berth".into()])?;
    let dir = std::env::temp_dir().join(format!("berth-pgcert-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("client.pem"), &client.cert_pem)?;
    std::fs::write(dir.join("client.key"), &client.key_pem)?;
    let url = format!(
        "{url}&sslcert={}&sslkey={}",
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    );
    let cluster = TestCluster::builder().database(url).start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo by certificate")).await?;
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `sslmode=verify-full` refuses a server whose certificate names another
/// host, and the error says so without the connection string's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_name() -> anyhow::Result<()> {
    let ca = DevCa::generate("managed Postgres CA")?;
    let pg = PrivatePostgres::start_tls(&ca)?;
    // The certificate is for `localhost`; dial the server by its address.
    let url = pg.tls_url().expect("a TLS server").replace(
        "postgres://berth@localhost:",
        "postgres://berth:s3cret-pw@127.0.0.1:",
    );
    let err = match TestCluster::builder().database(url).start().await {
        Ok(cluster) => {
            cluster.shutdown().await?;
            anyhow::bail!("a dispatcher started on a server of another name");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("certificate") || err.contains("Certificate"),
        "the refusal names the certificate: {err}"
    );
    assert!(!err.contains("s3cret-pw"), "the password stays out: {err}");
    Ok(())
}

/// A node with no static key finds its S3 credentials as a pod on EKS does
/// (IRSA): a projected token file and a role, exchanged at STS (here a
/// stand-in on loopback, reached through the SDK's endpoint override) for
/// temporary credentials, which sign its snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_its_s3_credentials_by_web_identity() -> anyhow::Result<()> {
    let sts = Sts::start().await?;
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let dir = std::env::temp_dir().join(format!("berth-irsa-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, "eyJ.berth-test-projected-token.sig")?;
    let role = "arn:aws:iam::123456789012:role/berth-node";
    let node = ProcessNode::start_with_credentials(
        &cluster,
        &["--capacity", "1", "--checkpoint-interval", "0"],
        &[
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                token_file.display().to_string(),
            ),
            ("AWS_ROLE_ARN", role.to_string()),
            ("AWS_ROLE_SESSION_NAME", "berth-node".to_string()),
            ("AWS_ENDPOINT_URL_STS", format!("http://{}", sts.addr)),
        ],
    )
    .await?;
    // The node listens first and finds its credentials right after.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sts.calls().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = sts.calls();
    assert!(!calls.is_empty(), "the node asked STS at start");
    assert_eq!(calls[0].role_arn, role);
    assert_eq!(
        calls[0].web_identity_token,
        "eyJ.berth-test-projected-token.sig"
    );

    let mut c = cluster.add_dispatcher_for(&[&node]).await?;
    cluster.sigterm_dispatcher().await?;
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    let before = cluster.s3.requests().len();
    let paused = pause_and_wait(&mut c, &s.name, Duration::from_secs(60)).await?;
    assert!(paused.snapshot.is_some(), "a snapshot was stored");
    // The snapshot's upload was signed with STS's temporary credentials.
    let uploads: Vec<_> = cluster.s3.requests()[before..]
        .iter()
        .filter(|r| r.method == "PUT" || r.method == "POST")
        .cloned()
        .collect();
    assert!(!uploads.is_empty(), "the node stored its snapshot");
    assert!(
        uploads
            .iter()
            .all(|r| r.security_token.as_deref() == Some(sts.session_token.as_str())),
        "every upload carries the session token: {uploads:?}"
    );
    c.resume_session(pb::ResumeSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    assert_eq!(turn(&mut c, &s.name, "echo back").await?, "back");
    stop_and_wait(&mut c, &s.name).await?;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    cluster.shutdown().await
}

/// A node that finds no S3 credentials anywhere in the chain refuses to
/// start, and says where it looked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_s3_credentials_says_so_at_start() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).start().await?;
    // Its port is bound before the check, so it may look up for a moment.
    let e = match ProcessNode::start_with_credentials(&cluster, &[], &[]).await {
        Err(e) => e.to_string(),
        Ok(mut node) => {
            let status = node.exit_within(Duration::from_secs(30)).await?;
            anyhow::ensure!(
                status.is_some_and(|s| !s.success()),
                "a node without S3 credentials kept running: {}",
                node.log()
            );
            node.log()
        }
    };
    assert!(
        e.contains("--s3-bucket needs credentials") && e.contains("web identity"),
        "{e}"
    );
    // Its log went to a file: plain text, no colour escape codes.
    assert!(
        !e.contains('\x1b'),
        "escape codes in a redirected log: {e:?}"
    );
    cluster.shutdown().await
}

/// Every object written asks for the configured server-side encryption:
/// a small one in its PUT, a large one when its multipart upload starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_written_with_the_asked_server_side_encryption() -> anyhow::Result<()> {
    let s3 = s3::S3Server::start().await?;
    let mut args = s3.args();
    args.s3_sse = SseMode::AwsKms;
    args.s3_sse_kms_key_id = Some("alias/berth-snapshots".into());
    let store = ObjectStore::open(&args).await?;
    store.put("small", bytes::Bytes::from_static(b"x")).await?;
    let big = vec![7u8; berth_common::objects::PART_BYTES + 1000];
    store.put_stream("big", &big[..]).await?;
    let writes: Vec<_> = s3
        .requests()
        .into_iter()
        .filter(|r| {
            (r.method == "PUT" && !r.uri.contains("partNumber=")) || r.uri.contains("uploads")
        })
        .collect();
    assert_eq!(
        writes.len(),
        2,
        "one PUT and one multipart start: {writes:?}"
    );
    for w in &writes {
        assert_eq!(w.sse.as_deref(), Some("aws:kms"), "{w:?}");
        assert_eq!(
            w.kms_key_id.as_deref(),
            Some("alias/berth-snapshots"),
            "{w:?}"
        );
    }
    assert_eq!(store.get("big").await?.map(|b| b.len()), Some(big.len()));
    Ok(())
}
