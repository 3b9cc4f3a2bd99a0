//! Where git resources may come from (the SSRF guards): public `https://`
//! hosts by default, internal addresses only when the operator allowlists
//! them.

use super::FieldError;

/// Where git resources may come from. By default only `https://` to a
/// host that is not loopback, link-local, private or otherwise internal;
/// never a host path or `file://`. Hosts the operator allowlists
/// (`HOST` or `HOST:PORT`) may also be reached over `http://`, `git://` or
/// `ssh://`, whatever their address. `ssh://` to a public host needs a key
/// (`with_ssh_key`): a secret of the session's.
pub fn check_git_source(
    field: &'static str,
    url: &str,
    allow: &[String],
    with_ssh_key: bool,
) -> Result<(), FieldError> {
    let Some(target) = GitHost::of(url) else {
        return Err(FieldError::new(
            field,
            format!(
                "`{url}` is not a URL: git resources come from https:// (host paths are never cloned)"
            ),
        ));
    };
    let (scheme, host) = (target.scheme, target.host);
    if host.is_empty() {
        return Err(FieldError::new(field, format!("`{url}` names no host")));
    }
    let allowed = target.allowed_by(allow);
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "ssh" if with_ssh_key => {}
        "http" | "git" | "ssh" if allowed => {}
        other => {
            return Err(FieldError::new(
                field,
                format!(
                    "`{other}://` is not allowed: git resources come from https://, ssh:// with a key (ssh_key_secret), or a host the operator allowlists"
                ),
            ));
        }
    }
    if !allowed && is_internal_host(host) {
        return Err(FieldError::new(
            field,
            format!(
                "`{host}` is an internal address: git resources come from public hosts (or a host the operator allowlists)"
            ),
        ));
    }
    Ok(())
}

/// Where a git URL points: its scheme, its host as written (`HOST` or
/// `HOST:PORT`), and the bare host (no port, no IPv6 brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitHost<'a> {
    pub scheme: &'a str,
    pub hostport: &'a str,
    pub host: &'a str,
}

impl<'a> GitHost<'a> {
    /// `None` for anything without `scheme://` (a path, scp-like syntax).
    pub fn of(url: &'a str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
        };
        Some(Self {
            scheme,
            hostport,
            host,
        })
    }

    /// Whether the operator allowlists it (`HOST` or `HOST:PORT`).
    pub fn allowed_by(&self, allow: &[String]) -> bool {
        allow
            .iter()
            .any(|a| a.eq_ignore_ascii_case(self.hostport) || a.eq_ignore_ascii_case(self.host))
    }
}

/// Whether `host` (a name or an address) is loopback, link-local, private,
/// unspecified or otherwise not a public host.
pub fn is_internal_host(host: &str) -> bool {
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") || lower.ends_with(".local") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => is_internal_ip(ip),
        Err(_) => false,
    }
}

/// Whether an address is not a public one.
pub fn is_internal_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // 100.64.0.0/10, shared address space.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link-local.
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal_ip(v4.into()))
        }
    }
}

/// The host and port an `http(s)://` URL points at (`None` for anything
/// else).
pub fn target_of(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok().filter(|p| *p > 0)?,
        None => default,
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod git_sources {
    use super::check_git_source;

    #[test]
    fn only_public_https_unless_allowlisted() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "https://github.com/a/b.git",
            "https://user@example.com:8443/x",
        ] {
            assert!(check_git_source("f", ok, &none, false).is_ok(), "{ok}");
        }
        for bad in [
            "/etc",
            "./repo",
            "file:///etc",
            "http://example.com/x",
            "git://example.com/x",
            "ssh://git@example.com/x",
            "https://127.0.0.1/x",
            "https://localhost/x",
            "https://10.1.2.3/x",
            "https://192.168.0.1/x",
            "https://169.254.169.254/latest",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https:///x",
        ] {
            let e = check_git_source("resources.git.url", bad, &none, false).expect_err(bad);
            assert_eq!(e.field, "resources.git.url");
        }
        let allow = vec!["127.0.0.1:9418".to_string()];
        assert!(check_git_source("f", "http://127.0.0.1:9418/r.git", &allow, false).is_ok());
        assert!(check_git_source("f", "http://127.0.0.1:9419/r.git", &allow, false).is_err());
        assert!(check_git_source("f", "file:///etc", &allow, false).is_err());
        // ssh: a key opens public hosts, never internal ones by itself.
        assert!(check_git_source("f", "ssh://git@github.com/o/r.git", &none, false).is_err());
        assert!(check_git_source("f", "ssh://git@github.com/o/r.git", &none, true).is_ok());
        assert!(check_git_source("f", "ssh://git@127.0.0.1:22/r.git", &none, true).is_err());
    }
}
