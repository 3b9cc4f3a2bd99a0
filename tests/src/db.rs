//! The tests' Postgres: one database per cluster on a shared server,
//! and a tiny HTTP getter for the metrics endpoints.

use super::*;

/// Postgres server for tests; each cluster creates its own database on it.
pub(crate) fn admin_url() -> String {
    std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://berth:berth@127.0.0.1:5432/postgres".into())
}

/// Creates a fresh database `berth_test_{tag}` on the test Postgres server
/// (`BERTH_TEST_DATABASE_URL`); returns its name and URL.
pub async fn create_database(tag: &str) -> anyhow::Result<(String, String)> {
    let database = format!("berth_test_{tag}");
    let admin = admin_url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .with_context(|| format!("needs Postgres at {admin} (run scripts/setup.sh)"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut conn)
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => anyhow::bail!("BERTH_TEST_DATABASE_URL must end in /DBNAME"),
    };
    Ok((database, url))
}

/// A plain HTTP/1.0 GET on loopback (a `/metrics` scrape): (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: berth\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Drops a database made by [`create_database`].
pub async fn drop_database(database: &str) -> anyhow::Result<()> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}
