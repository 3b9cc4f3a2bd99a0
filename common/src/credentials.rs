//! Credentials the node's egress gateway attaches to a session's HTTP
//! requests: a header (`Authorization: Bearer …` by default) sent only to
//! the hosts the credential names. The sandbox never holds the value.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::field::FieldError;
pub use crate::spec::target_of;
use crate::spec::{check_host_pattern, host_matches};

/// Most hosts one credential may name.
pub const MAX_HOSTS: usize = 16;
/// Longest header name or prefix.
pub const MAX_HEADER_CHARS: usize = 128;

/// How a credential is sent: `{name}: {prefix}{value}`, where a `Basic `
/// prefix base64-encodes the value (`user:password`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    pub prefix: String,
}

impl Default for HttpHeader {
    fn default() -> Self {
        Self {
            name: "Authorization".into(),
            prefix: "Bearer ".into(),
        }
    }
}

impl HttpHeader {
    /// The header as asked, with the defaults filled in: `Authorization`,
    /// and `Bearer ` for it when no prefix is given.
    pub fn with_defaults(name: &str, prefix: &str) -> Self {
        let name = if name.is_empty() {
            "Authorization"
        } else {
            name
        };
        let prefix = if prefix.is_empty() && name.eq_ignore_ascii_case("authorization") {
            "Bearer "
        } else {
            prefix
        };
        Self {
            name: name.to_string(),
            prefix: prefix.to_string(),
        }
    }

    /// A header name is an HTTP token; a prefix is printable ASCII. Neither
    /// may be a header the gateway owns (`Host`, hop-by-hop headers).
    pub fn validate(&self, field: &'static str) -> Result<(), FieldError> {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if self.name.is_empty()
            || self.name.len() > MAX_HEADER_CHARS
            || !self.name.chars().all(token)
        {
            return Err(FieldError::new(
                field,
                format!("`{}` is not an HTTP header name", self.name),
            ));
        }
        let owned = [
            "host",
            "connection",
            "content-length",
            "transfer-encoding",
            "upgrade",
            "te",
            "trailer",
            "keep-alive",
            "proxy-authorization",
        ];
        if owned.iter().any(|h| self.name.eq_ignore_ascii_case(h)) {
            return Err(FieldError::new(
                field,
                format!("`{}` is set by the gateway itself", self.name),
            ));
        }
        if self.prefix.len() > MAX_HEADER_CHARS
            || !self
                .prefix
                .chars()
                .all(|c| c == ' ' || c.is_ascii_graphic())
        {
            return Err(FieldError::new(
                field,
                "the prefix must be printable ASCII, up to 128 characters",
            ));
        }
        Ok(())
    }

    /// The header's value for `secret`.
    pub fn value(&self, secret: &str) -> String {
        if self.prefix.eq_ignore_ascii_case("basic ") {
            let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
            format!("{}{encoded}", self.prefix)
        } else {
            format!("{}{secret}", self.prefix)
        }
    }
}

/// Checks a credential's hosts: 1 to [`MAX_HOSTS`] patterns (`host`,
/// `host:port`, `*.domain[:port]`).
pub fn validate_hosts(field: &'static str, hosts: &[String]) -> Result<(), FieldError> {
    if hosts.is_empty() {
        return Err(FieldError::new(
            field,
            "required: the hosts the credential may be sent to",
        ));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(FieldError::new(field, format!("at most {MAX_HOSTS} hosts")));
    }
    hosts.iter().try_for_each(|h| check_host_pattern(field, h))
}

/// Whether a credential for `hosts` may be sent to `host:port`.
pub fn covers(hosts: &[String], host: &str, port: u16) -> bool {
    hosts.iter().any(|p| host_matches(p, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_default_to_a_bearer_token_and_basic_is_encoded() {
        let h = HttpHeader::with_defaults("", "");
        assert_eq!(h.value("t0k"), "Bearer t0k");
        let h = HttpHeader::with_defaults("X-Api-Key", "");
        assert_eq!(h.value("t0k"), "t0k");
        let h = HttpHeader::with_defaults("", "Basic ");
        assert_eq!(
            h.value("x-access-token:t"),
            "Basic eC1hY2Nlc3MtdG9rZW46dA=="
        );
        assert!(HttpHeader::with_defaults("Host", "").validate("h").is_err());
        assert!(HttpHeader::with_defaults("a b", "").validate("h").is_err());
        assert!(
            HttpHeader::with_defaults("X", "a\r\nb")
                .validate("h")
                .is_err()
        );
    }

    #[test]
    fn a_credential_goes_only_to_its_hosts() {
        let hosts = vec!["api.example.com".to_string(), "127.0.0.1:8080".to_string()];
        assert!(covers(&hosts, "api.example.com", 443));
        assert!(!covers(&hosts, "api.example.com", 8443));
        assert!(!covers(&hosts, "evil.example.com", 443));
        assert!(covers(&hosts, "127.0.0.1", 8080));
        assert_eq!(
            target_of("https://Api.Example.com/mcp"),
            Some(("api.example.com".into(), 443))
        );
        assert_eq!(
            target_of("http://127.0.0.1:8080"),
            Some(("127.0.0.1".into(), 8080))
        );
        assert_eq!(target_of("ftp://x/y"), None);
        assert_eq!(target_of("https://user:pw@x/"), None);
        assert!(validate_hosts("hosts", &[]).is_err());
        assert!(validate_hosts("hosts", &["a b".into()]).is_err());
    }
}
