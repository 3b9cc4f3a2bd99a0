//! Opaque page tokens (AIP-158), bound to the listing they came from: the
//! RPC, the caller's project and the filter. A token used with another
//! filter is INVALID_ARGUMENT naming `page_token`, never a silently wrong
//! page. Tokens carry no secret: the query still filters by project.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::Error;

/// A request's `page_size`: 0 takes `default`; 1–1000 otherwise.
pub(crate) fn page_size(requested: i32, default: i64) -> Result<i64, Error> {
    match requested {
        0 => Ok(default),
        1..=1000 => Ok(i64::from(requested)),
        _ => Err(Error::invalid("page_size", "must be between 1 and 1000")),
    }
}

/// A keyset cursor of a listing ordered by (time, id), newest first.
pub(crate) fn time_id_cursor(time: chrono::DateTime<chrono::Utc>, id: uuid::Uuid) -> String {
    format!("{}.{id}", time.timestamp_micros())
}

/// The (time, id) in a cursor made by [`time_id_cursor`].
pub(crate) fn parse_time_id_cursor(
    cursor: Option<String>,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>, Error> {
    let Some(c) = cursor else { return Ok(None) };
    let (micros, id) = c.split_once('.').ok_or_else(bad_token)?;
    let time = micros
        .parse()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros)
        .ok_or_else(bad_token)?;
    Ok(Some((time, id.parse().map_err(|_| bad_token())?)))
}

/// A time cursor (a listing ordered by time alone).
pub(crate) fn parse_time_cursor(
    cursor: Option<String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
    cursor
        .map(|c| {
            c.parse()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_micros)
                .ok_or_else(bad_token)
        })
        .transpose()
}

fn bad_token() -> Error {
    Error::invalid(
        "page_token",
        "not a token from a previous response of this listing; leave it empty to start over",
    )
}

/// Bytes of the filter's fingerprint at the head of a token.
const FINGERPRINT: usize = 8;

fn fingerprint(listing: &str) -> [u8; FINGERPRINT] {
    let d = ring::digest::digest(&ring::digest::SHA256, listing.as_bytes());
    let mut f = [0; FINGERPRINT];
    f.copy_from_slice(&d.as_ref()[..FINGERPRINT]);
    f
}

/// A token that resumes `listing` (the RPC, project and filter, written
/// out) after `cursor`.
pub(crate) fn encode(listing: &str, cursor: &str) -> String {
    let mut bytes = fingerprint(listing).to_vec();
    bytes.extend_from_slice(cursor.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The cursor in `token`, or `None` for the first page.
pub(crate) fn decode(token: &str, listing: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad_token())?;
    if bytes.len() < FINGERPRINT {
        return Err(bad_token());
    }
    if bytes[..FINGERPRINT] != fingerprint(listing) {
        return Err(Error::invalid(
            "page_token",
            "was issued for a different filter or listing; repeat the request with the filter it came with, or leave page_token empty to start over",
        ));
    }
    String::from_utf8(bytes[FINGERPRINT..].to_vec())
        .map(Some)
        .map_err(|_| bad_token())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_resumes_its_own_listing_only() {
        let t = encode("sessions|p|idle", "123.abc");
        assert!(!t.contains("123"), "opaque: {t}");
        assert_eq!(
            decode(&t, "sessions|p|idle").expect("same listing"),
            Some("123.abc".into())
        );
        for other in ["sessions|p|running", "sessions|q|idle", "events|p|idle"] {
            let e = decode(&t, other).expect_err(other);
            assert!(e.to_string().contains("page_token"), "{e}");
        }
        assert_eq!(decode("", "x").expect("first page"), None);
        assert!(decode("!!", "x").is_err());
        assert!(decode("AAAA", "x").is_err());
    }
}
