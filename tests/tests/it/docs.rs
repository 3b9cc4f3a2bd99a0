//! Every documented command runs. The `berth …` commands of README.md and
//! `docs/` are read from the files themselves (code blocks, inline code,
//! and the CLI's command synopsis), their placeholders filled from a live
//! cluster, and each run as a user would run it:
//!
//! - no command may panic, nor fail as a usage error (a flag or subcommand
//!   that no longer exists, a value the CLI no longer takes);
//! - a command of a code block (a tour a reader copies) must succeed;
//! - an inline command may end with another documented exit code (its ids
//!   are filled in, but e.g. approving needs a waiting request);
//! - every subcommand and flag of the synopsis must exist (`--help`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use berth_tests::doc_commands::{Documented, Kind, commands_in, doc_files, expand};
use std::process::Stdio;
use std::time::Duration;

use berth_proto::v1::{self as pb, api_keys_client::ApiKeysClient, secrets_client::SecretsClient};
use berth_tests::*;

/// The exit codes the README documents (`berth --help` lists them too).
const DOCUMENTED_EXITS: [i32; 8] = [0, 1, 3, 4, 5, 6, 130, 141];

/// What the placeholders stand for, in a live cluster.
struct Fixtures {
    session: String,
    node: String,
    secret: String,
    /// A credential (SECRET_USAGE_HTTP_HEADER) for the docs' MCP server
    /// host, Slack's API and the docs' git server.
    credential: String,
    spare_key: String,
    dispatcher: String,
    token_file: PathBuf,
    repo_url: String,
}

/// Fills a command's placeholders; `Err` names one the test does not know
/// (so a new placeholder in the docs must be taught here, not skipped).
fn fill(words: &[String], f: &Fixtures) -> Result<Vec<String>, String> {
    let path: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
    let area = path.first().copied().unwrap_or("");
    let mut out = Vec::new();
    let mut prev = "";
    for w in words {
        let filled = match w.as_str() {
            "<id>" | "ID" | "SESSION" | "<session>" => match (area, prev) {
                (_, "--secret" | "--git-ssh-key") => f.secret.clone(),
                (_, "--git-credential" | "--slack-bot-token") => f.credential.clone(),
                ("keys", _) => f.spare_key.clone(),
                _ => f.session.clone(),
            },
            "TOOL_USE_ID" => "toolu_docs_none".into(),
            "RESOURCE" => format!("sessions/{}", f.session),
            "NAME" => match area {
                "certs" => "docs-client".into(),
                "secrets" => "docs-secret".into(),
                _ => "docs".into(),
            },
            "NODE" => f.node.clone(),
            "OTHER" => "other.example".into(),
            "URL" => f.dispatcher.clone(),
            "FILE" if prev == "--output-file" => f
                .token_file
                .with_file_name("export.out")
                .display()
                .to_string(),
            "FILE" => f.token_file.display().to_string(),
            "P" => "default".into(),
            "N" => "4".into(),
            "T" => "1".into(),
            "TEXT" => "from the docs".into(),
            "QUERY" => "hello".into(),
            "HOST" => "pypi.org".into(),
            "D" => "10m".into(),
            "USD" => "1".into(),
            "berth-agent:latest" => TEST_IMAGE.into(),
            // A git resource: the tests' loopback server, never a public host.
            // An MCP server's credential: `NAME=URL@secrets/ID`.
            w if w.ends_with("@secrets/ID") => {
                format!("{}{}", w.trim_end_matches("ID"), f.credential)
            }
            w if w.contains("github.com/") || w.starts_with("PATH=") => {
                let (target, url) = w.split_once('=').unwrap_or(("/workspace/repo", w));
                let target = if target == "PATH" {
                    "/workspace/repo"
                } else {
                    target
                };
                let reference = url.split_once('#').map(|(_, r)| format!("#{r}"));
                if url.starts_with("ssh://") {
                    format!("{target}=ssh://git@127.0.0.1:9/none.git")
                } else {
                    format!("{target}={}{}", f.repo_url, reference.unwrap_or_default())
                }
            }
            w if w.len() > 1
                && w.chars().any(|c| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()) =>
            {
                return Err(format!("placeholder `{w}`"));
            }
            w => w.to_string(),
        };
        prev = w.as_str();
        out.push(filled);
    }
    // A bare `berth run` in the prose: on the test image, with a prompt.
    if area == "run" {
        if !out.iter().any(|w| w == "--image" || w == "--agent") {
            out.extend(["--image".into(), TEST_IMAGE.into()]);
        }
        let has_prompt = words
            .last()
            .is_some_and(|w| w.contains(' ') || w == "hello");
        if !has_prompt {
            out.push("echo hi".into());
        }
    }
    Ok(out)
}

/// How one run ended.
struct Ran {
    code: Option<i32>,
    stderr: String,
    /// Still running at the deadline (a follower), and killed.
    following: bool,
}

async fn run_cli(
    cluster: &TestCluster,
    cwd: &Path,
    config: &Path,
    args: &[String],
    stdin: Option<&str>,
    follow: bool,
) -> anyhow::Result<Ran> {
    let mut cmd = tokio::process::Command::from(berth_command(cluster));
    cmd.args(&args[1..])
        .current_dir(cwd)
        .env("BERTH_CONFIG", config)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        pipe.write_all(text.as_bytes()).await?;
    }
    let limit = if follow {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(90)
    };
    let mut stderr = child.stderr.take().expect("piped");
    let read = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let (code, following) = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => (status?.code(), false),
        Err(_) => {
            child.kill().await?;
            (None, true)
        }
    };
    Ok(Ran {
        code,
        stderr: read.await.unwrap_or_default(),
        following,
    })
}

/// The fixtures a run of the docs needs: a session, a secret, a key to
/// revoke, a token file, a git repository on loopback.
async fn fixtures(cluster: &TestCluster, cwd: &Path, repo_url: String) -> anyhow::Result<Fixtures> {
    let mut c = cluster.client();
    let session = idle_session(&mut c, fake_session("echo ready")).await?;
    let secret = SecretsClient::new(cluster.api())
        .create_secret(pb::CreateSecretRequest {
            display_name: "docs key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: "sk-docs-test".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .name;
    let repo_host = repo_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let credential = SecretsClient::new(cluster.api())
        .create_secret(pb::CreateSecretRequest {
            display_name: "docs credential".into(),
            usage: pb::SecretUsage::HttpHeader as i32,
            value: "docs-token".into(),
            hosts: vec!["mcp.example.com".into(), "slack.com".into(), repo_host],
            ..Default::default()
        })
        .await?
        .into_inner()
        .name;
    let key = ApiKeysClient::new(cluster.api())
        .create_api_key(pb::CreateApiKeyRequest {
            display_name: "to revoke".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .key
        .expect("a key");
    let token_file = cwd.join("token");
    std::fs::write(&token_file, &cluster.token)?;
    std::fs::write(cwd.join("local.txt"), "from the docs")?;
    std::fs::write(cwd.join("client.txt"), "docs-client-secret")?;
    Ok(Fixtures {
        session: session.id,
        node: cluster.nodes[0].id.clone(),
        secret: secret.trim_start_matches("secrets/").to_string(),
        credential: credential.trim_start_matches("secrets/").to_string(),
        spare_key: key.name.trim_start_matches("keys/").to_string(),
        dispatcher: cluster.dispatcher_url.clone(),
        token_file,
        repo_url,
    })
}

/// A bare repository with a `main` branch, served over git's dumb HTTP.
fn publish_repo(served: &Path) -> anyhow::Result<()> {
    let work = served.join("work");
    std::fs::create_dir_all(&work)?;
    git_http::git(&work, &["init", "-q"])?;
    std::fs::write(work.join("README.md"), "docs repo")?;
    git_http::git(&work, &["add", "."])?;
    git_http::git(&work, &["commit", "-qm", "main"])?;
    let bare = served.join("repo.git");
    git_http::git(
        &work,
        &["clone", "-q", "--bare", ".", &bare.to_string_lossy()],
    )?;
    git_http::git(&bare, &["update-server-info"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_berth_command_runs() -> anyhow::Result<()> {
    let mut documented = Vec::new();
    for f in doc_files() {
        let text = std::fs::read_to_string(&f)?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        documented.extend(commands_in(&name, &text));
    }
    assert!(
        documented.len() > 20,
        "found only {} commands",
        documented.len()
    );
    let scratch =
        std::env::temp_dir().join(format!("berth-docs-{}", uuid::Uuid::new_v4().simple()));
    let served = scratch.join("git");
    std::fs::create_dir_all(&served)?;
    publish_repo(&served)?;
    let server = git_http::GitServer::start(served).await?;
    let (allow_d, allow_n) = (server.host(), server.host());
    let cluster = TestCluster::builder()
        .nodes(1)
        .capacity(8)
        .configure_dispatcher(move |cfg| cfg.git_allow_hosts = vec![allow_d.clone()])
        .configure_node(move |_, cfg, _| cfg.git_allow_hosts = vec![allow_n.clone()])
        .start()
        .await?;
    let cwd = scratch.join("cwd");
    std::fs::create_dir_all(&cwd)?;
    let config = scratch.join("config.json");
    let mut fx = fixtures(&cluster, &cwd, server.url("repo.git")).await?;
    let mut failures = Vec::new();
    let mut ran = 0;
    let mut seen = BTreeSet::new();
    for d in &documented {
        for form in expand(&d.text) {
            let with_env = form.replace("$ANTHROPIC_API_KEY", "sk-docs-test");
            // `< FILE`: the file's content on stdin.
            let (line, stdin) = match with_env.split_once(" < ") {
                Some((cmd, _)) => (cmd.to_string(), Some("sk-docs-test")),
                None => (with_env, None),
            };
            let Some(words) = shlex::split(&line) else {
                failures.push(format!("{}:{}: cannot split `{line}`", d.file, d.line));
                continue;
            };
            let args = match fill(&words, &fx) {
                Ok(a) => a,
                Err(why) => {
                    failures.push(format!(
                        "{}:{}: `{}`: unknown {why}",
                        d.file, d.line, d.text
                    ));
                    continue;
                }
            };
            if !seen.insert(args.clone()) {
                continue;
            }
            ran += 1;
            if let Some(why) = check(&cluster, &cwd, &config, d, &args, stdin).await? {
                failures.push(why);
            }
            // The README deletes its session on the way: later commands get a fresh one.
            if args.get(1..3) == Some(&["sessions".to_string(), "delete".to_string()]) {
                let mut c = cluster.client();
                fx.session = idle_session(&mut c, fake_session("echo ready")).await?.id;
            }
        }
    }
    eprintln!("ran {ran} documented commands");
    assert!(
        failures.is_empty(),
        "{} documented commands failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&scratch);
    cluster.shutdown().await?;
    server.stop().await;
    Ok(())
}

/// Runs one filled-in command and judges how it ended: `Some` says what is
/// wrong with it.
async fn check(
    cluster: &TestCluster,
    cwd: &Path,
    config: &Path,
    d: &Documented,
    args: &[String],
    stdin: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let follow = args.iter().any(|a| a == "--follow");
    let r = run_cli(cluster, cwd, config, args, stdin, follow).await?;
    let shown = args.join(" ");
    let usage_gap = r.code == Some(2)
        && (r.stderr.contains("required arguments were not provided")
            || r.stderr.contains("requires a subcommand"))
        && d.kind == Kind::Inline;
    let verdict = match (r.code, r.following) {
        // A follower that keeps following is doing its job.
        (None, true) if follow => None,
        (None, _) => Some("did not end within 90 s".to_string()),
        (Some(_), _) if r.stderr.contains("panicked at") => Some("panicked".into()),
        // The prose names a command that needs arguments it leaves out: it
        // must exist (its --help answers).
        (Some(2), _) if usage_gap => {
            let mut help = args.to_vec();
            help.truncate(args.iter().take_while(|a| !a.starts_with('-')).count());
            help.push("--help".into());
            let h = run_cli(cluster, cwd, config, &help, None, false).await?;
            (h.code != Some(0)).then(|| format!("`{}` fails: {}", help.join(" "), h.stderr))
        }
        (Some(2), _) => Some("usage error (a flag or subcommand that no longer exists?)".into()),
        (Some(0), _) => None,
        (Some(c), _) if d.kind == Kind::Block => Some(format!("exit {c} in a code block")),
        (Some(c), _) if !DOCUMENTED_EXITS.contains(&c) => Some(format!("undocumented exit {c}")),
        (Some(_), _) => None,
    };
    let following = if r.following { " (following)" } else { "" };
    eprintln!("{}:{} {shown} -> {:?}{following}", d.file, d.line, r.code);
    Ok(verdict.map(|why| {
        format!(
            "{}:{}: `{shown}`: {why}\n    stderr: {}",
            d.file,
            d.line,
            r.stderr.trim()
        )
    }))
}

/// The synopsis of the CLI's commands ("Commands: `run [--agent …]`, …"):
/// every subcommand it names answers `--help`, and every flag it names is
/// in that help.
#[tokio::test]
async fn every_subcommand_and_flag_of_the_synopsis_exists() -> anyhow::Result<()> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md"))?;
    let start = readme
        .find("\nCommands: `")
        .expect("docs/cli.md has a command synopsis");
    let paragraph = &readme[start..];
    let paragraph = &paragraph[..paragraph.find("\n\n").unwrap_or(paragraph.len())];
    let bin = berth_bin();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (i, span) in paragraph.split('`').enumerate() {
        if i % 2 == 0 || span.starts_with("source ") {
            continue;
        }
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        for form in expand(&format!("berth {span}")) {
            let words: Vec<&str> = form.split_whitespace().collect();
            // The subcommand path: the words before the first flag or placeholder.
            let path: Vec<&str> = words[1..]
                .iter()
                .copied()
                .take_while(|w| {
                    w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
                })
                .collect();
            let flags: Vec<&str> = words
                .iter()
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split('=').next().unwrap_or(w))
                .collect();
            let out = std::process::Command::new(&bin)
                .args(&path)
                .arg("--help")
                .env("BERTH_CONFIG", "/nonexistent/berth-config.json")
                .output()?;
            checked += 1;
            let help = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                failures.push(format!(
                    "`berth {} --help`: {}",
                    path.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                continue;
            }
            for flag in flags {
                if !help.contains(flag) {
                    failures.push(format!(
                        "`berth {}` has no {flag} (synopsis: `{span}`)",
                        path.join(" ")
                    ));
                }
            }
        }
    }
    assert!(checked > 30, "checked only {checked} forms");
    assert!(
        failures.is_empty(),
        "the synopsis is out of date:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// `docs/configuration.md` is what the binaries' definitions say (see
/// `berth_tests::config_reference`); `BERTH_UPDATE_DOCS=1` rewrites it.
#[test]
fn the_configuration_reference_is_current() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let fresh = berth_tests::config_reference::markdown();
    if std::env::var_os("BERTH_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &fresh)?;
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == fresh,
        "docs/configuration.md is out of date with the binaries' flags: run \
         BERTH_UPDATE_DOCS=1 cargo test -p berth-tests --test it docs::the_configuration_reference_is_current"
    );
    Ok(())
}
