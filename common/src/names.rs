//! AIP-122 resource names: `sessions/{id}`.

/// Collection prefix of session resource names.
pub const SESSIONS: &str = "sessions/";

/// Accepts `sessions/{id}` or a bare id, returns the id part.
pub fn session_id(name: &str) -> &str {
    name.strip_prefix(SESSIONS).unwrap_or(name)
}

/// The resource name of a session id.
pub fn session_name(id: impl std::fmt::Display) -> String {
    format!("{SESSIONS}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_name_the_same_session() {
        assert_eq!(session_id("sessions/abc"), "abc");
        assert_eq!(session_id("abc"), "abc");
        assert_eq!(session_name("abc"), "sessions/abc");
    }
}
