//! The warm container's launcher: a shell exec'd ahead of demand that waits
//! for one line on stdin (the session's env as `export`s, then `exec` of the
//! agent), so a warm start costs one write instead of a Docker exec. The env
//! never appears in a container's or an exec's config.

/// The launcher's script: read one line, run it (it ends in `exec`); at
/// end of input (the pool removed the container), exit quietly.
pub(super) const LAUNCHER: &str = r#"IFS= read -r berth_launch || exit 0; eval "$berth_launch""#;

/// `export K='v'; … exec 'cmd' 'arg' …` and a newline, or `None` when a
/// value holds a newline (one line only) or a name is not a shell identifier.
pub(super) fn launch_line(cmd: &[String], env: &[String]) -> Option<String> {
    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
    let identifier = |k: &str| {
        let mut c = k.chars();
        c.next()
            .is_some_and(|f| f == '_' || f.is_ascii_alphabetic())
            && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
    };
    let mut line = String::new();
    for kv in env {
        let (k, v) = kv.split_once('=')?;
        if !identifier(k) || v.contains('\n') {
            return None;
        }
        line.push_str(&format!("export {k}={}; ", quote(v)));
    }
    line.push_str("exec");
    for a in cmd {
        if a.contains('\n') {
            return None;
        }
        line.push(' ');
        line.push_str(&quote(a));
    }
    line.push('\n');
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launcher, fed its line and then the agent's input, on the host's `sh`.
    fn through_launcher(cmd: &[&str], env: &[&str], input: &str) -> String {
        use std::io::Write;
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        let line = launch_line(&cmd, &env).expect("fits a line");
        let mut child = std::process::Command::new("sh")
            .args(["-c", LAUNCHER])
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{line}{input}").as_bytes())
            .expect("write");
        drop(stdin);
        let out = child.wait_with_output().expect("sh ends");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_launcher_passes_env_and_arguments_verbatim_and_leaves_stdin_to_the_agent() {
        let tricky = r#"it's "$HOME" `id` $(id) \ ;"#;
        let out = through_launcher(
            &[
                "sh",
                "-c",
                r#"printf '%s|%s|' "$SECRET" "$1"; cat"#,
                "argv0",
                tricky,
            ],
            &["SECRET=a 'b' $c", "HOME=/home/agent"],
            "first line\nsecond line\n",
        );
        assert_eq!(out, format!("a 'b' $c|{tricky}|first line\nsecond line\n"));
    }

    #[test]
    fn a_command_that_cannot_go_on_one_line_is_refused() {
        let cmd = vec!["claude".to_string()];
        assert!(launch_line(&cmd, &["K=two\nlines".into()]).is_none());
        assert!(launch_line(&cmd, &["1BAD=x".into()]).is_none());
        assert!(launch_line(&["a\nb".into()], &[]).is_none());
        assert!(launch_line(&cmd, &["OK_1=x".into()]).is_some());
    }

    #[test]
    fn at_end_of_input_the_launcher_exits_quietly() {
        let out = std::process::Command::new("sh")
            .args(["-c", LAUNCHER])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh runs");
        assert!(out.status.success());
        assert!(out.stdout.is_empty());
    }
}
