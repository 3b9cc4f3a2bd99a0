//! The Postgres URL's TLS parameters, checked before a connection is
//! tried, with libpq's meaning:
//! - `sslmode`: `disable`, `allow`, `prefer`, `require`, `verify-ca` or
//!   `verify-full`;
//! - `sslrootcert`: the CA to check the server against; `verify-ca` and
//!   `verify-full` need one. `system` (as libpq 16 spells it) trusts the
//!   system's roots instead;
//! - `sslcert` with `sslkey`: a client certificate, for servers that
//!   authenticate by certificate (`hostssl … cert`).
//!
//! Each error names the parameter, never the password.

/// Why a URL is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct UrlError(pub String);

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DATABASE_URL: {}", self.0)
    }
}

/// The URL to hand to sqlx: `url` checked, with `sslrootcert=system`
/// removed (sqlx trusts the system's roots when no CA file is given).
pub fn for_sqlx(url: &str) -> Result<String, UrlError> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        UrlError(format!(
            "not a URL ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=…"
        ))
    })?;
    let params: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    let get = |k: &str| {
        params
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let mode = get("sslmode").unwrap_or("prefer");
    const MODES: [&str; 6] = [
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ];
    if !MODES.contains(&mode) {
        return Err(UrlError(format!(
            "sslmode={mode} is not one of {}",
            MODES.join(", ")
        )));
    }
    let root = get("sslrootcert");
    if mode.starts_with("verify") && root.is_none_or(str::is_empty) {
        return Err(UrlError(format!(
            "sslmode={mode} needs sslrootcert=/path/ca.pem (the CA that signed the server's \
             certificate, as RDS, Cloud SQL and Azure publish it), or sslrootcert=system for \
             the system's roots"
        )));
    }
    if get("sslcert").is_some() != get("sslkey").is_some() {
        return Err(UrlError(
            "sslcert and sslkey go together (a client certificate and its key)".into(),
        ));
    }
    for name in ["sslrootcert", "sslcert", "sslkey"] {
        let path = get(name).filter(|p| !(name == "sslrootcert" && *p == "system"));
        if let Some(path) = path
            && let Err(e) = std::fs::metadata(path)
        {
            return Err(UrlError(format!("{name}={path}: {e}")));
        }
    }
    if root == Some("system") {
        let kept = params
            .iter()
            .filter(|(n, v)| !(n == "sslrootcert" && v == "system"));
        parsed.query_pairs_mut().clear().extend_pairs(kept);
        if parsed.query() == Some("") {
            parsed.set_query(None);
        }
    }
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "postgres://berth:secret@db:5432/berth";

    #[test]
    fn verification_needs_a_ca_or_the_system_roots() {
        let err = for_sqlx(&format!("{BASE}?sslmode=verify-full")).expect_err("no CA");
        assert!(err.to_string().contains("needs sslrootcert"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(
            for_sqlx(&format!("{BASE}?sslmode=verify-full&sslrootcert=system")),
            Ok(format!("{BASE}?sslmode=verify-full"))
        );
        assert_eq!(
            for_sqlx(&format!("{BASE}?sslmode=require")),
            Ok(format!("{BASE}?sslmode=require"))
        );
        assert_eq!(for_sqlx(BASE), Ok(BASE.to_string()));
    }

    #[test]
    fn bad_tls_parameters_name_themselves() {
        let err = for_sqlx(&format!("{BASE}?sslmode=verify")).expect_err("bad mode");
        assert!(
            err.to_string().contains("sslmode=verify is not one of"),
            "{err}"
        );
        let err = for_sqlx(&format!("{BASE}?sslcert=/c.pem")).expect_err("half a pair");
        assert!(err.to_string().contains("sslcert and sslkey"), "{err}");
        let err = for_sqlx(&format!(
            "{BASE}?sslmode=verify-ca&sslrootcert=%2Fnonexistent%2Fca.pem"
        ))
        .expect_err("missing file");
        assert!(
            err.to_string().contains("sslrootcert=/nonexistent/ca.pem"),
            "{err}"
        );
    }
}
