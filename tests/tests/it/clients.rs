//! The clients, as their users meet them: the `berth` CLI run as a process
//! (Ctrl-C, pipes, output formats, attach, exit codes), the Python package
//! against a real dispatcher, and the API's admission limits.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::{TEST_IMAGE, TestCluster};

use berth_tests::{berth_bin, berth_command as berth};

fn sigint(pid: u32) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -INT {pid} failed");
    Ok(())
}

/// Runs `berth run` in the background; returns the child and the session
/// id it announced on stderr (the rest of stderr is collected).
fn spawn_run(
    cluster: &TestCluster,
    prompt: &str,
) -> anyhow::Result<(
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
)> {
    let mut child = berth(cluster)
        .args(["run", "--image", TEST_IMAGE, prompt])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30))?;
    let id = first
        .strip_prefix("session ")
        .and_then(|r| r.strip_suffix(" created"))
        .ok_or_else(|| anyhow::anyhow!("unexpected first stderr line: {first}"))?
        .to_string();
    Ok((child, id, rx))
}

/// Every stderr line still to come, up to the end of the stream (the
/// reader thread may lag behind the process's exit).
fn drain(stderr: &std::sync::mpsc::Receiver<String>) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(line) = stderr.recv_timeout(Duration::from_secs(10)) {
        lines.push(line);
    }
    lines
}

/// Waits for `child` to exit, within `timeout`.
fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            anyhow::bail!("berth did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the session's agent is working on its turn.
async fn wait_working(cluster: &TestCluster, id: &str) -> anyhow::Result<()> {
    let mut c = cluster.client();
    berth_tests::wait_for_session(
        &mut c,
        &format!("sessions/{id}"),
        Duration::from_secs(60),
        "running and working",
        |s| {
            s.status == pb::SessionStatus::Running as i32
                && s.activity == pb::Activity::Working as i32
        },
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_run_a_second_leaves_it_and_a_closed_pipe_ends_quietly() -> anyhow::Result<()>
{
    let cluster = TestCluster::builder().capacity(6).start().await?;
    let mut c = cluster.client();

    // One Ctrl-C: the session is stopped, the CLI exits 130.
    let (mut child, id, stderr) = spawn_run(&cluster, "hang")?;
    wait_working(&cluster, &id).await?;
    sigint(child.id())?;
    let status = wait_exit(&mut child, Duration::from_secs(60))?;
    let said = drain(&stderr);
    assert_eq!(status.code(), Some(130), "{said:?}");
    assert!(
        said.iter().any(|l| l.contains("stopping session")),
        "{said:?}"
    );
    berth_tests::wait_for_status(
        &mut c,
        &format!("sessions/{id}"),
        pb::SessionStatus::Stopped,
        Duration::from_secs(60),
    )
    .await?;

    // Two Ctrl-Cs: the session keeps running, and the CLI says how to attach.
    // The second comes once the first is answered, as a person presses it.
    let (mut child, id, stderr) = spawn_run(&cluster, "hang")?;
    wait_working(&cluster, &id).await?;
    sigint(child.id())?;
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.contains("stopping session")) {
        said.push(stderr.recv_timeout(Duration::from_secs(30))?);
    }
    sigint(child.id())?;
    let status = wait_exit(&mut child, Duration::from_secs(30))?;
    said.extend(drain(&stderr));
    assert_eq!(status.code(), Some(130), "{said:?}");
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("berth attach {id}"))),
        "{said:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = berth_tests::get(&mut c, &format!("sessions/{id}")).await?;
    assert_eq!(s.status, pb::SessionStatus::Running as i32, "left running");
    berth_tests::stop_and_wait(&mut c, &s.name).await?;

    // `| head -1`: one line out, no panic, exit 141, and the session stopped.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' -o json run --image {TEST_IMAGE} 'events 200 64' | head -1; echo \"exit=${{PIPESTATUS[0]}}\" >&2",
            berth_bin().display()
        ))
        .env("BERTH_DISPATCHER", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .env("BERTH_CONFIG", "/nonexistent/berth-config.json")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exit=141"), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
    let first: serde_json::Value = serde_json::from_str(stdout.trim())?;
    let id = first["sessionId"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("proto3 JSON names the session: {first}"))?;
    berth_tests::wait_for_status(
        &mut c,
        &format!("sessions/{id}"),
        pb::SessionStatus::Stopped,
        Duration::from_secs(60),
    )
    .await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_runs_detaches_attaches_and_reads_every_output_format() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let run = |args: &[&str], stdin: Option<&str>| -> anyhow::Result<(i32, String, String)> {
        let mut child = berth(&cluster)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        {
            use std::io::Write;
            let mut input = child.stdin.take().expect("piped");
            if let Some(text) = stdin {
                input.write_all(text.as_bytes())?;
            }
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    // --detach: the session's name, and it keeps running.
    let (code, out, err) = run(
        &[
            "-o",
            "name",
            "run",
            "--detach",
            "--image",
            TEST_IMAGE,
            "--inactivity-timeout",
            "10m",
            "echo first",
        ],
        None,
    )?;
    assert_eq!(code, 0, "{err}");
    let name = out.trim().to_string();
    let id = name
        .strip_prefix("sessions/")
        .ok_or_else(|| anyhow::anyhow!("-o name prints the name: {out}"))?
        .to_string();
    assert!(err.contains(&format!("berth attach {id}")), "{err}");
    berth_tests::wait_for_status(
        &mut c,
        &name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await?;

    // attach: a line in is a message; the reply comes out; at the end of
    // input attach waits for that turn, then leaves the session running.
    let (code, out, err) = run(&["attach", &id, "--tail", "0"], Some("echo second\n"))?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("> echo second"), "{out}");
    assert!(out.contains("second"), "{out}");
    assert!(err.contains("detached"), "{err}");
    // The turn ended (attach left after its usage); the session settles
    // idle, still running its agent.
    let s = berth_tests::wait_for_status(
        &mut c,
        &name,
        pb::SessionStatus::Idle,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(s.usage.as_ref().map(|u| u.turns), Some(2));

    // YAML and JSON are the proto3 mapping; wide has more columns.
    let (code, out, err) = run(&["-o", "yaml", "sessions", "get", &id], None)?;
    assert_eq!(code, 0, "{err}");
    let doc = yaml_rust2::YamlLoader::load_from_str(&out)?;
    assert_eq!(doc[0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(doc[0]["status"].as_str(), Some("SESSION_STATUS_IDLE"));
    let (_, out, _) = run(&["-o", "json", "sessions", "list"], None)?;
    let first: serde_json::Value = serde_json::from_str(
        out.lines()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no sessions listed"))?,
    )?;
    assert_eq!(first["name"], name.as_str());
    assert_eq!(first["lastSeq"].as_str().map(|s| !s.is_empty()), Some(true));
    let (_, out, _) = run(&["sessions", "list"], None)?;
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains("STATUS") && header.contains("AGE") && !header.contains("ACTIVITY"),
        "{out}"
    );
    assert!(out.contains(&id) && out.contains("idle"), "{out}");
    let (_, out, _) = run(&["-o", "wide", "sessions", "list"], None)?;
    assert!(
        out.lines().next().unwrap_or_default().contains("ACTIVITY"),
        "{out}"
    );

    // Exit codes: not found 3, usage 2; errors say what to do.
    let (code, _, err) = run(
        &["sessions", "get", "00000000-0000-0000-0000-000000000000"],
        None,
    )?;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not found"), "{err}");
    let (code, _, _) = run(&["run", "--timeout", "soon", "x"], None)?;
    assert_eq!(code, 2);
    let (code, _, err) = run(&["run", "--image", "", "x"], None)?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("field spec.image"),
        "the violation is shown: {err}"
    );

    // Completions.
    let (code, out, _) = run(&["completions", "bash"], None)?;
    assert_eq!(code, 0);
    assert!(out.contains("_berth()"), "{}", &out[..out.len().min(200)]);

    berth_tests::stop_and_wait(&mut c, &name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_package_works_against_a_real_dispatcher() -> anyhow::Result<()> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.berth/venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{}: scripts/setup.sh installs clients/python into it",
        python.display()
    );
    let cluster = TestCluster::builder().capacity(6).start().await?;
    // From the tests' directory: `berth` is the installed package (with its
    // generated stubs), not the source tree.
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/tests");
    let out = tokio::process::Command::new(&python)
        .args(["-m", "unittest", "-v", "test_client"])
        .current_dir(&tests)
        .env("BERTH_DISPATCHER", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .env("BERTH_TEST_IMAGE", TEST_IMAGE)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python tests failed:\n{stderr}");
    assert!(stderr.contains("Ran 10 tests"), "{stderr}");
    cluster.shutdown().await
}

/// `python -m build` makes the sdist, then the wheel from the sdist alone
/// (it carries the protos), and the wheel holds the generated stubs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_package_builds_as_an_sdist_and_a_wheel() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("berth-pybuild-{}", uuid::Uuid::new_v4().simple()));
    let built = tokio::process::Command::new(root.join(".berth/venv/bin/python"))
        .args(["-m", "build", "--no-isolation", "--outdir"])
        .arg(&out)
        .arg(root.join("clients/python"))
        .output()
        .await?;
    let log = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "python -m build failed:\n{log}");
    let files: Vec<String> = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    let wheel = files.iter().find(|f| f.ends_with(".whl")).expect("a wheel");
    assert!(
        files.iter().any(|f| f.ends_with(".tar.gz")),
        "an sdist: {files:?}"
    );
    let listing = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-l"])
        .arg(out.join(wheel))
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for stub in [
        "berth/v1/sessions_pb2.py",
        "berth/v1/sessions_pb2_grpc.py",
        "berth/aio.py",
        "berth/rpc.py",
    ] {
        assert!(listing.contains(stub), "{stub} in the wheel:\n{listing}");
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_resource_exhausted_with_retry_info() -> anyhow::Result<()> {
    let cluster = TestCluster::builder()
        .configure_dispatcher(|cfg| {
            cfg.api_rate_limit = 2;
            cfg.api_rate_burst = 3;
        })
        .start()
        .await?;
    let mut keys = pb::api_keys_client::ApiKeysClient::new(cluster.api());
    let mut limited = None;
    for _ in 0..10 {
        if let Err(s) = keys.who_am_i(pb::WhoAmIRequest {}).await {
            limited = Some(s);
            break;
        }
    }
    let s = limited.ok_or_else(|| anyhow::anyhow!("10 calls at once were all admitted"))?;
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        berth_cli::errors::reason(&s).as_deref(),
        Some("RATE_LIMITED")
    );
    let details = berth_cli::errors::describe(&s);
    assert!(
        details.iter().any(|d| d.starts_with("retry after")),
        "{details:?}"
    );
    // Waiting as told is enough.
    tokio::time::sleep(Duration::from_millis(600)).await;
    keys.who_am_i(pb::WhoAmIRequest {}).await?;
    // Health probes carry no key and are never limited.
    let mut health = tonic_health::pb::health_client::HealthClient::new(cluster.api());
    for _ in 0..10 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
    }
    cluster.shutdown().await
}
