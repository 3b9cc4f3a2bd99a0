//! A delivery's authenticity: its signature (`v1=` HMAC-SHA256 of
//! `{timestamp}.{body}` under the webhook's secret), its id, and the hash
//! of what it signs (a replay under another id has the same).

use base64::Engine;
use ring::rand::SecureRandom;

use super::SECRET_PREFIX;
use crate::error::{Error, Result};

/// `v1=` + the hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`.
pub(crate) fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex::encode(ctx.sign().as_ref()))
}

/// Whether `signature` (one or more `v1=…`, comma-separated, as a sender
/// rotating secrets sends) is `body`'s at `timestamp`. Constant time.
pub(crate) fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut message = Vec::with_capacity(timestamp.len() + 1 + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    signature.split(',').any(|s| {
        s.trim()
            .strip_prefix("v1=")
            .and_then(|h| hex::decode(h).ok())
            .is_some_and(|tag| ring::hmac::verify(&key, &message, &tag).is_ok())
    })
}

/// Whether a request whose `header` says it was signed at `timestamp`
/// (Unix seconds) is within `tolerance` of `now`: else why it is refused
/// (a possible replay, or a clock far off).
pub(crate) fn within_window(
    header: &str,
    timestamp: &str,
    now: chrono::DateTime<chrono::Utc>,
    tolerance: std::time::Duration,
) -> std::result::Result<(), String> {
    let Ok(sent) = timestamp.parse::<i64>() else {
        return Err(format!("`{header}` must be Unix seconds"));
    };
    let skew = (now.timestamp() - sent).unsigned_abs();
    if skew > tolerance.as_secs() {
        return Err(format!(
            "`{header}` is {skew} s from now, outside the {} s replay window (check the sender's clock)",
            tolerance.as_secs()
        ));
    }
    Ok(())
}

/// A new signing secret: `whsec_` and 32 random bytes, base64url.
pub(crate) fn new_secret() -> Result<String> {
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| Error::Internal("no system randomness".into()))?;
    Ok(format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

/// Whether a delivery id is 1–128 of `[A-Za-z0-9._:-]`.
pub(super) fn delivery_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// SHA-256 of what a delivery signs, `{timestamp}.{body}`: the same for a
/// replay, whatever delivery id it comes under.
pub(crate) fn content_sha256(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.finish().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_secret_timestamp_and_body() {
        let s = sign(b"whsec_a", "1700000000", br#"{"x":1}"#);
        assert!(s.starts_with("v1=") && s.len() == 3 + 64, "{s}");
        assert!(verify(b"whsec_a", "1700000000", br#"{"x":1}"#, &s));
        assert!(verify(
            b"whsec_a",
            "1700000000",
            br#"{"x":1}"#,
            &format!("v1=00,{s}")
        ));
        assert!(!verify(b"whsec_b", "1700000000", br#"{"x":1}"#, &s));
        assert!(!verify(b"whsec_a", "1700000001", br#"{"x":1}"#, &s));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":2}"#, &s));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":1}"#, ""));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":1}"#, "v1=zz"));
    }

    #[test]
    fn delivery_ids_are_bounded() {
        assert!(delivery_id_ok("evt_123:a.b-c"));
        assert!(!delivery_id_ok(""));
        assert!(!delivery_id_ok("a b"));
        assert!(!delivery_id_ok(&"a".repeat(129)));
    }
}
