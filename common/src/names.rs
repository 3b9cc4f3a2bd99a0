//! AIP-122 resource names: `sessions/{id}`, `agents/{id}[@{version}]`, `files/{id}`.

/// Collection prefix of session resource names.
pub const SESSIONS: &str = "sessions/";
/// Collection prefix of agent resource names.
pub const AGENTS: &str = "agents/";
/// Collection prefix of file resource names.
pub const FILES: &str = "files/";

/// Accepts `files/{id}` or a bare id, returns the id part.
pub fn file_id(name: &str) -> &str {
    name.strip_prefix(FILES).unwrap_or(name)
}

/// A name for skills and memory stores: 1–64 of `[A-Za-z0-9_-]`.
pub fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An agent id: 1–63 of `[a-z0-9-]`, starting with a letter (AIP-122).
pub fn is_agent_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Splits `agents/{id}@{version}`, `{id}@{version}`, `agents/{id}` or `{id}`
/// into the id and the pinned version (`None` = latest).
pub fn agent_ref(name: &str) -> Result<(&str, Option<i64>), String> {
    let bare = name.strip_prefix(AGENTS).unwrap_or(name);
    let (id, version) = match bare.split_once('@') {
        Some((id, v)) => {
            let v: i64 = v
                .parse()
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| format!("`{v}` is not a version (1, 2, …)"))?;
            (id, Some(v))
        }
        None => (bare, None),
    };
    if !is_agent_id(id) {
        return Err(format!(
            "`{id}` is not an agent id: 1–63 lowercase letters, digits and `-`, starting with a letter"
        ));
    }
    Ok((id, version))
}

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
    fn agent_refs_pin_versions_or_take_the_latest() {
        assert_eq!(agent_ref("agents/coder@3"), Ok(("coder", Some(3))));
        assert_eq!(agent_ref("coder"), Ok(("coder", None)));
        assert!(agent_ref("coder@0").is_err());
        assert!(agent_ref("coder@x").is_err());
        assert!(agent_ref("Coder").is_err());
        assert!(agent_ref("").is_err());
    }

    #[test]
    fn both_forms_name_the_same_session() {
        assert_eq!(session_id("sessions/abc"), "abc");
        assert_eq!(session_id("abc"), "abc");
        assert_eq!(session_name("abc"), "sessions/abc");
    }
}
