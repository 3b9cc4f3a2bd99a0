//! Whether a delivery is new, a sender's retry, or a replay. A retry
//! repeats the delivery id with the same signed content; a replay signs the
//! same content (timestamp and body) under a new id, which only someone who
//! captured a delivery sends within its replay window.

pub(crate) use crate::records::Recorded;

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Never seen: make its session.
    New,
    /// A retry of a delivery recorded: answer with its session.
    Retry(uuid::Uuid),
    /// The signed content of another delivery under a new id: refuse.
    Replay { of: String },
    /// The id of another delivery with other content: refuse.
    IdReused,
}

/// Judges a delivery (`id`, `content`) against what is recorded with the
/// same id or the same content.
pub(crate) fn judge(id: &str, content: &[u8], recorded: &[Recorded]) -> Verdict {
    if let Some(r) = recorded.iter().find(|r| r.delivery_id == id) {
        return match &r.content_sha256 {
            Some(h) if h.as_slice() != content => Verdict::IdReused,
            _ => Verdict::Retry(r.session_id),
        };
    }
    match recorded
        .iter()
        .find(|r| r.content_sha256.as_deref() == Some(content))
    {
        Some(r) => Verdict::Replay {
            of: r.delivery_id.clone(),
        },
        None => Verdict::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, hash: Option<&[u8]>) -> Recorded {
        Recorded {
            delivery_id: id.into(),
            session_id: uuid::Uuid::nil(),
            content_sha256: hash.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn a_delivery_is_new_a_retry_or_refused() {
        assert_eq!(judge("d1", b"h1", &[]), Verdict::New);
        assert_eq!(
            judge("d1", b"h1", &[rec("d1", Some(b"h1"))]),
            Verdict::Retry(uuid::Uuid::nil())
        );
        // Recorded before hashes were kept: the id decides.
        assert_eq!(
            judge("d1", b"h1", &[rec("d1", None)]),
            Verdict::Retry(uuid::Uuid::nil())
        );
        assert_eq!(
            judge("d2", b"h1", &[rec("d1", Some(b"h1"))]),
            Verdict::Replay { of: "d1".into() }
        );
        assert_eq!(
            judge("d1", b"h2", &[rec("d1", Some(b"h1"))]),
            Verdict::IdReused
        );
    }
}
