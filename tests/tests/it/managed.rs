//! Production's dependencies as managed services give them: a Postgres that
//! takes TLS connections only, its certificate checked against its CA.

use berth_common::tls::DevCa;
use berth_tests::pg::PrivatePostgres;
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
