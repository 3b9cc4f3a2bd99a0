//! The relay's ceiling on this machine: the same events berth stored, written
//! again into the same `events` table by a bare loop of multi-row INSERTs,
//! one statement per commit and as many rows per statement as berth's own
//! writer committed on average in the same run. Nothing else: no session
//! row to bump, no NOTIFY, no node, no gRPC, no reader. That is the limit of
//! persist-before-relay here; berth's relay is measured against it.

use std::time::Instant;

use sqlx::PgPool;
use uuid::Uuid;

use super::Rate;

/// Where the copies start numbering, far past anything berth appended.
const SEQ_BASE: i64 = 100_000_000;

const BARE_INSERT: &str = r#"
INSERT INTO events (session_id, seq, id, type, payload, raw, line_part)
SELECT $1, t.seq, t.id, t.type, t.payload, t.raw, t.line_part
FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::bytea[], $7::integer[])
    AS t(seq, id, type, payload, raw, line_part)
"#;

/// One stored event, as berth wrote it.
#[derive(sqlx::FromRow)]
struct Row {
    r#type: String,
    payload: String,
    raw: Option<Vec<u8>>,
    line_part: Option<i32>,
}

/// Writes the `agent.message` rows of `session` again, `batch` per
/// statement, each statement its own transaction; the rate counts from the
/// first statement to the last commit.
pub(super) async fn bare_insert(db: &PgPool, session: Uuid, batch: usize) -> anyhow::Result<Rate> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT type, payload, raw, line_part FROM events \
         WHERE session_id = $1 AND type = 'agent.message' ORDER BY seq",
    )
    .bind(session)
    .fetch_all(db)
    .await?;
    anyhow::ensure!(
        rows.len() > 1,
        "the baseline found {} stored events to copy",
        rows.len()
    );
    let batch = batch.max(1);
    // The statement's arguments are built inside the timed loop, as berth
    // builds its own from the events it holds.
    let started = Instant::now();
    let mut seq = SEQ_BASE;
    for chunk in rows.chunks(batch) {
        let seqs: Vec<i64> = chunk
            .iter()
            .map(|_| {
                seq += 1;
                seq
            })
            .collect();
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::new_v4()).collect();
        sqlx::query(BARE_INSERT)
            .bind(session)
            .bind(seqs)
            .bind(ids)
            .bind(chunk.iter().map(|r| r.r#type.as_str()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.raw.as_deref()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.line_part).collect::<Vec<_>>())
            .execute(db)
            .await?;
    }
    let span = started.elapsed();
    Ok(Rate {
        events: rows.len() as u64,
        span,
    })
}
