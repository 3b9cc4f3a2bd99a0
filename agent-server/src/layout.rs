//! Where a container's writable volumes are: its root filesystem is
//! read-only, and the workspace and the agent's home are its two writable
//! volumes, so every path a session names must lie under one of them.

use std::path::{Component, Path};

/// Where the writable volumes are and who owns what is copied in.
#[derive(Debug, Clone)]
pub struct Layout {
    pub workspace: String,
    pub home: String,
    pub uid: u64,
    pub gid: u64,
}

impl Layout {
    /// The layout of a container whose agent runs as `agent_user` (`uid:gid`)
    /// with these two writable volumes.
    pub fn new(agent_user: &str, workspace: &str, home: &str) -> Self {
        let mut ids = agent_user.split(':').map(|s| s.parse::<u64>().ok());
        let uid = ids.next().flatten().unwrap_or(1000);
        let gid = ids.next().flatten().unwrap_or(uid);
        Self {
            workspace: workspace.trim_end_matches('/').to_string(),
            home: home.trim_end_matches('/').to_string(),
            uid,
            gid,
        }
    }

    /// The two writable volumes.
    pub fn volumes(&self) -> [&str; 2] {
        [&self.workspace, &self.home]
    }

    /// The volume holding `path` and the path relative to it ("" for the
    /// volume itself), or `None` when `path` is outside both.
    pub fn locate<'a>(&'a self, path: &str) -> Option<(&'a str, String)> {
        let clean = clean_absolute(path)?;
        self.volumes().into_iter().find_map(|v| {
            let rest = clean.strip_prefix(v)?;
            if rest.is_empty() {
                Some((v, String::new()))
            } else {
                rest.strip_prefix('/').map(|r| (v, r.to_string()))
            }
        })
    }

    /// A path a session may name: absolute, normal, inside a volume.
    pub fn check(&self, path: &str) -> Result<(), String> {
        self.volume_of(path).map(|_| ())
    }

    /// [`Layout::locate`], with an error saying where paths may go.
    pub fn volume_of<'a>(&'a self, path: &str) -> Result<(&'a str, String), String> {
        self.locate(path).ok_or_else(|| {
            format!(
                "`{path}` must be an absolute path under {} or {} (the container's writable volumes), without `..`",
                self.workspace, self.home
            )
        })
    }
}

/// `path` without a trailing `/`, if it is absolute with only normal parts.
fn clean_absolute(path: &str) -> Option<String> {
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return None;
    }
    let mut out = String::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => {
                out.push('/');
                out.push_str(s.to_str()?);
            }
            _ => return None,
        }
    }
    Some(if out.is_empty() { "/".into() } else { out })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn layout() -> Layout {
        Layout::new("1000:1000", "/workspace/", "/home/agent")
    }

    #[test]
    fn paths_must_lie_in_a_volume() {
        let l = layout();
        assert_eq!(
            l.locate("/workspace/a/b.txt"),
            Some(("/workspace", "a/b.txt".into()))
        );
        assert_eq!(
            l.locate("/home/agent/.mem/"),
            Some(("/home/agent", ".mem".into()))
        );
        assert_eq!(l.locate("/workspace"), Some(("/workspace", String::new())));
        for bad in [
            "/etc/passwd",
            "workspace/a",
            "/workspace/../etc",
            "/workspacex/a",
            "/home",
        ] {
            assert!(l.check(bad).is_err(), "{bad} accepted");
        }
    }
}
