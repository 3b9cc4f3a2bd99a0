//! Operability: metrics as Prometheus scrapes them, the dashboard and alert
//! rules against what is exported, the deploy manifests against the
//! binaries' flags, and graceful shutdown of nodes and dispatchers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_common::metrics::{Def, Kind};
use berth_proto::v1 as pb;
use berth_tests::{
    TEST_IMAGE, TestCluster, containers_labelled, events_of, fake_session, get, http_get,
    reply_after, stop_and_wait, turn, wait_for_session,
};
use clap::CommandFactory;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// One scrape: family name → type, and every sample line.
#[derive(Default, Debug)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut out = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.types.insert(name.into(), kind.into());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or((line, "nan"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.samples
            .push((name.into(), labels, value.parse().unwrap_or(f64::NAN)));
    }
    out
}

impl Scrape {
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether `name` (a family, or a histogram's `_bucket`/`_sum`/`_count`) is exported.
    fn exports(&self, name: &str) -> bool {
        self.types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    self.types.get(base).map(String::as_str) == Some("histogram")
                })
            })
    }
}

/// Every `berth_…` metric name in a PromQL text.
fn berth_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("berth_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

fn all_defs() -> Vec<&'static Def> {
    berth_dispatcher::metrics::ALL
        .iter()
        .chain(berth_agent_server::metrics::ALL)
        .chain(berth_common::metrics::COMMON)
        .collect()
}

#[tokio::test]
async fn metrics_are_exported_and_the_dashboard_and_alerts_use_only_them() -> anyhow::Result<()> {
    let cluster = TestCluster::builder()
        .warm_pool(&format!("{TEST_IMAGE}=1:2"))
        .metrics()
        .start()
        .await?;
    let dispatcher = cluster.dispatcher_metrics.expect("metrics on");
    let node = cluster.nodes[0].metrics.expect("metrics on");
    let mut c = cluster.client();
    cluster
        .wait_node(0, Duration::from_secs(30), |n| {
            n.warm.iter().any(|w| w.ready > 0)
        })
        .await?;
    // With an MCP server the gateway refuses (an internal address the
    // operator did not allow): the route counter gets its series.
    let mut req = fake_session("hello");
    req.spec.as_mut().expect("spec").mcp_servers = vec![pb::McpServer {
        name: "docs".into(),
        transport: Some(pb::mcp_server::Transport::Remote(pb::McpRemote {
            url: "http://127.0.0.1:9/mcp".into(),
            credential: String::new(),
        })),
    }];
    let s = c.create_session(req).await?.into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    // A tool approval: the confirmation series get samples too.
    let asked = berth_tests::send(&mut c, &s.name, "edit metrics.txt counted").await?;
    let events = berth_tests::collect_until(&mut c, &s.name, asked, Duration::from_secs(60), |e| {
        e.r#type == "agent.tool_permission"
    })
    .await?;
    let tool_use_id = berth_tests::payload(events.last().expect("the request"))["tool_use_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.confirm_tool(pb::ConfirmToolRequest {
        name: s.name.clone(),
        tool_use_id,
        decision: pb::ToolDecision::Allow as i32,
        ..Default::default()
    })
    .await?;
    // A stop takes a snapshot: the snapshot series get samples too.
    stop_and_wait(&mut c, &s.name).await?;

    // Sampled gauges refresh every few seconds: scrape until they caught up.
    let mut scrape = Scrape::default();
    for _ in 0..100 {
        let (status, body) = http_get(dispatcher, "/metrics").await?;
        assert_eq!(status, 200);
        scrape = parse_scrape(&body);
        if scrape.sum("berth_node_capacity_sessions", &[]) > 0.0
            && scrape.sum("berth_sessions_ended_total", &[("status", "stopped")]) >= 1.0
            && scrape
                .types
                .contains_key("berth_node_warm_ready_containers")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every defined metric is exported, with its kind; histograms carry
    // exactly their explicit buckets.
    for def in all_defs() {
        assert!(def.name.starts_with("berth_"), "{}", def.name);
        let kind = scrape.types.get(def.name).map(String::as_str);
        let want = match def.kind {
            Kind::Counter => {
                assert!(
                    def.name.ends_with("_total"),
                    "counter {} ends in _total",
                    def.name
                );
                "counter"
            }
            Kind::Gauge => {
                assert!(
                    !def.name.ends_with("_total"),
                    "gauge {} must not end in _total",
                    def.name
                );
                "gauge"
            }
            Kind::Histogram(buckets) => {
                let les: BTreeSet<String> = scrape
                    .samples
                    .iter()
                    .filter(|(n, _, _)| *n == format!("{}_bucket", def.name))
                    .filter_map(|(_, l, _)| l.get("le").cloned())
                    .filter(|le| le != "+Inf")
                    .collect();
                let want: BTreeSet<String> = buckets.iter().map(|b| b.to_string()).collect();
                assert_eq!(les, want, "{} buckets", def.name);
                "histogram"
            }
        };
        assert_eq!(kind, Some(want), "{} is exported as a {want}", def.name);
        let labels: BTreeSet<&str> = scrape
            .samples
            .iter()
            .filter(|(n, _, _)| n.starts_with(def.name))
            .flat_map(|(_, l, _)| l.keys().map(String::as_str))
            .filter(|k| *k != "le")
            .collect();
        let declared: BTreeSet<&str> = def.labels.iter().copied().collect();
        assert!(
            labels.is_subset(&declared),
            "{}: labels {labels:?} beyond {declared:?}",
            def.name
        );
    }
    for (name, labels, _) in &scrape.samples {
        for k in labels.keys() {
            assert!(
                !k.contains("session") && !k.contains("container"),
                "{name} has a high-cardinality label `{k}`"
            );
        }
    }
    // The session shows up where an operator would look.
    assert!(scrape.sum("berth_sessions_created_total", &[]) >= 1.0);
    assert!(scrape.sum("berth_pool_hits_total", &[("image", TEST_IMAGE)]) >= 1.0);
    assert!(
        scrape.sum(
            "berth_first_event_seconds_count",
            &[("start", "warm_container")]
        ) >= 1.0
    );
    assert!(scrape.sum("berth_tokens_total", &[("kind", "output")]) > 0.0);
    assert!(scrape.sum("berth_cost_microdollars_total", &[]) > 0.0);
    assert!(scrape.sum("berth_events_persisted_total", &[]) > 0.0);
    assert!(scrape.sum("berth_snapshot_seconds_count", &[("result", "ok")]) >= 1.0);
    assert!(
        scrape.sum(
            "berth_grpc_server_requests_total",
            &[("method", "CreateSession"), ("code", "OK")]
        ) >= 1.0
    );
    // (≥: the recorder is process-wide, and other tests' clusters run beside this one.)
    assert!(scrape.sum("berth_nodes", &[("state", "up")]) >= 1.0);
    // The node's own endpoint serves the same registry (one process here).
    let (status, body) = http_get(node, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        parse_scrape(&body)
            .types
            .contains_key("berth_pool_ready_containers")
    );
    // The process, the async runtime and the database pool, from the
    // dispatcher's own endpoint.
    let (_, body) = http_get(dispatcher, "/metrics").await?;
    let own = parse_scrape(&body);
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "berth_runtime_alive_tasks",
        "berth_runtime_workers",
        "berth_db_pool_connections",
    ] {
        assert!(own.types.contains_key(name), "{name} is not served");
    }
    assert!(own.sum("process_resident_memory_bytes", &[]) > 1e6);
    assert!(own.sum("berth_runtime_alive_tasks", &[]) >= 1.0);
    assert_eq!(http_get(dispatcher, "/healthz").await?.0, 200);
    assert_eq!(http_get(dispatcher, "/readyz").await?.0, 200);
    assert_eq!(http_get(node, "/readyz").await?.0, 200);

    // The dashboard: a datasource variable, a unit on every panel,
    // $__rate_interval in every rate, and only exported metrics.
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/berth.json"))?;
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has a Prometheus datasource variable"
    );
    for name in ["namespace", "job", "instance"] {
        assert!(
            vars.iter()
                .any(|v| v["name"] == name && v["type"] == "query"),
            "the dashboard has a `{name}` variable"
        );
    }
    let mut used = BTreeSet::new();
    let panels = dash["panels"].as_array().expect("panels");
    let mut shown = 0;
    let mut descriptions = BTreeSet::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        shown += 1;
        let title = p["title"].as_str().unwrap_or("?");
        // Each panel says what it shows (not a neighbour's words).
        let description = p["description"].as_str().unwrap_or_default();
        assert!(
            !description.is_empty() && descriptions.insert(description),
            "panel `{title}` has a description of its own: {description:?}"
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "panel `{title}` has a unit"
        );
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel `{title}` uses the variable"
        );
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains(r#"job=~"$job""#) && expr.contains(r#"instance=~"$instance""#),
                "panel `{title}` filters by the job and instance variables: {expr}"
            );
            if expr.contains("rate(") {
                assert!(
                    !expr.contains("rate(")
                        || expr.matches("[$__rate_interval]").count()
                            == expr.matches("rate(").count(),
                    "panel `{title}`: every rate uses $__rate_interval: {expr}"
                );
            }
            used.extend(berth_names(expr));
        }
    }
    assert!(shown >= 20, "{shown} panels");

    // The alert rules: the five the issue names, each complete.
    let rules = &yaml_docs("deploy/prometheus/alerts.yml")[0];
    let runbooks = std::fs::read_to_string(repo().join("docs/runbooks.md"))?;
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(rule["for"].as_str().is_some(), "{name} has `for`");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name} has a severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name} has a summary"
            );
            // Its runbook: a section of docs/runbooks.md named after it.
            let runbook = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            let anchor = runbook.rsplit_once("docs/runbooks.md#").map(|(_, a)| a);
            assert_eq!(
                anchor,
                Some(name.to_lowercase().as_str()),
                "{name}: {runbook}"
            );
            assert!(
                runbooks.contains(&format!("\n## {name}\n")),
                "docs/runbooks.md has no section for {name}"
            );
            used.extend(berth_names(expr));
            alerts.insert(name.to_string());
        }
    }
    for want in [
        "BerthNodeDown",
        "BerthQueueBackingUp",
        "BerthWarmPoolExhausted",
        "BerthErrorRateRising",
        "BerthPersistLag",
        "BerthDispatcherDown",
        "BerthPostgresUnreachable",
        "BerthNodesBelowMinimum",
        "BerthQueueWaitHigh",
        "BerthWebhookDeliveriesFailing",
        "BerthScheduleFiresMissed",
        "BerthEgressDenialsSpiking",
        "BerthApprovalsWaiting",
        "BerthApiRejections",
        "BerthAuditWriteFailures",
        "BerthOAuthRefreshFailing",
        "BerthWarmHitRatioLow",
    ] {
        assert!(alerts.contains(want), "alert {want} exists: {alerts:?}");
    }
    // The rules' own unit tests (deploy/prometheus/alerts.test.yml).
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "promtool (Debian's prometheus package; scripts/setup.sh installs it): {e}"
            )
        })?;
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Compose's dispatcher healthcheck passes against a live /readyz, and
    // fails where nothing listens.
    let compose = repo().join("deploy/compose/docker-compose.yml");
    let resolved = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .output()?;
    let resolved = &YamlLoader::load_from_str(&String::from_utf8_lossy(&resolved.stdout))?[0];
    let test = resolved["services"]["dispatcher"]["healthcheck"]["test"]
        .as_vec()
        .expect("the dispatcher has a healthcheck");
    assert_eq!(test[0].as_str(), Some("CMD"));
    let argv: Vec<&str> = test[1..].iter().filter_map(Yaml::as_str).collect();
    // Async: the dispatcher answering the probe runs on this test's runtime.
    let probe = |port: u16| {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("9400", &port.to_string()))
            .collect();
        async move {
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status();
            anyhow::Ok(
                tokio::time::timeout(Duration::from_secs(10), status)
                    .await??
                    .success(),
            )
        }
    };
    assert!(
        probe(dispatcher.port()).await?,
        "healthy against a serving dispatcher"
    );
    assert!(
        !probe(berth_tests::free_addr()?.port()).await?,
        "unhealthy where nothing listens"
    );

    let missing: Vec<_> = used.iter().filter(|n| !scrape.exports(n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard/alerts use metrics nobody exports: {missing:?}"
    );

    // The scrape configs parse and point at the metrics ports.
    let prom = &yaml_docs("deploy/prometheus/prometheus.yml")[0];
    assert_eq!(
        prom["rule_files"][0].as_str(),
        Some("/etc/prometheus/alerts.yml")
    );
    let targets: Vec<String> = prom["scrape_configs"]
        .as_vec()
        .expect("scrape_configs")
        .iter()
        .flat_map(|j| {
            j["static_configs"][0]["targets"]
                .as_vec()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    assert!(
        targets.iter().any(|t| t == "dispatcher:9400")
            && targets.iter().any(|t| t == "node-0:9401"),
        "{targets:?}"
    );
    let k8s = &yaml_docs("deploy/prometheus/kubernetes-scrape.yml")[0];
    assert!(
        k8s["scrape_configs"][0]["kubernetes_sd_configs"]
            .as_vec()
            .is_some()
    );
    cluster.shutdown().await
}

/// The env variable names a clap command reads.
fn env_names(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// A compose or Kubernetes env list/map as names.
fn env_keys(env: &Yaml) -> Vec<String> {
    match env {
        Yaml::Hash(h) => h
            .keys()
            .filter_map(|k| k.as_str().map(String::from))
            .filter(|k| k != "<<")
            .collect(),
        Yaml::Array(a) => a
            .iter()
            .filter_map(|e| e["name"].as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// `ENV K=V …` keys and the `ENTRYPOINT` of one stage of a Dockerfile.
fn dockerfile_stage(text: &str, stage: &str) -> (Vec<String>, String) {
    let joined = text.replace("\\\n", " ");
    let mut in_stage = false;
    let (mut env, mut entry) = (Vec::new(), String::new());
    for line in joined.lines().map(str::trim) {
        if let Some(from) = line.strip_prefix("FROM ") {
            in_stage = from.ends_with(&format!(" AS {stage}"));
            continue;
        }
        if !in_stage {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            env.extend(
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, _)| k.to_string()),
            );
        }
        if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entry = rest.to_string();
        }
    }
    (env, entry)
}

/// Variables the AWS SDK's default chain reads (the object store's
/// credentials), though no flag names them.
const AWS_CHAIN_ENV: [&str; 7] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
];

#[tokio::test]
async fn deploy_files_are_valid_and_match_the_binaries_flags() -> anyhow::Result<()> {
    let dispatcher = berth_dispatcher::Config::command();
    let node = berth_agent_server::Config::command();
    let (mut dispatcher_env, mut node_env) = (env_names(&dispatcher), env_names(&node));
    // What the AWS SDK's default credential chain reads for the object
    // store, in both binaries.
    // And what configures their traces (the OpenTelemetry variables).
    for sdk in AWS_CHAIN_ENV.iter().chain(berth_common::traces::ENV) {
        dispatcher_env.insert(sdk.to_string());
        node_env.insert(sdk.to_string());
    }
    let known = |service: &str| {
        if service.contains("node") || service.contains("agent-server") {
            &node_env
        } else {
            &dispatcher_env
        }
    };

    // Dockerfiles: the entrypoints are the binaries, their ENV are flags.
    let df = read("deploy/docker/Dockerfile");
    for (stage, bin) in [
        ("dispatcher", "berth-dispatcher"),
        ("agent-server", "berth-agent-server"),
    ] {
        let (env, entry) = dockerfile_stage(&df, stage);
        assert_eq!(
            entry,
            format!("[\"/usr/local/bin/{bin}\"]"),
            "{stage} entrypoint"
        );
        assert!(!env.is_empty());
        for k in env {
            assert!(
                known(stage).contains(&k),
                "{stage} image sets {k}, which {bin} does not read"
            );
        }
    }
    // Both of berth's images run as 10001 (a deployment that hands a node
    // the host's Docker socket runs it as root: see the compose file).
    assert_eq!(
        df.lines()
            .filter(|l| l.trim() == "USER 10001:10001")
            .count(),
        2,
        "the dispatcher and node stages are not root"
    );

    // Compose: `docker-compose config` accepts it, and each berth service's
    // env names flags its binary reads.
    let compose = repo().join("deploy/compose/docker-compose.yml");
    let out = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .args(["config", "-q"])
        .output()
        .map_err(|e| {
            anyhow::anyhow!("docker-compose (Debian's docker-compose package) is needed: {e}")
        })?;
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = &yaml_docs("deploy/compose/docker-compose.yml")[0];
    let services = doc["services"].as_hash().expect("services");
    for want in [
        "postgres",
        "minio",
        "dispatcher",
        "node-0",
        "node-1",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services.contains_key(&Yaml::String(want.into())),
            "compose has {want}"
        );
    }
    // docker-compose resolves anchors and merges; read env from its output.
    let out = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .output()?;
    let resolved = &YamlLoader::load_from_str(&String::from_utf8_lossy(&out.stdout))?[0];
    let mut node_names = Vec::new();
    for service in ["dispatcher", "node-0", "node-1"] {
        let env = &resolved["services"][service]["environment"];
        for k in env_keys(env) {
            assert!(
                known(service).contains(&k),
                "compose {service} sets {k}, which its binary does not read"
            );
        }
        if service.starts_with("node") {
            let cert = env["BERTH_TLS_CERT"].as_str().expect("node cert");
            assert_eq!(
                cert,
                format!("/certs/node-{service}.pem"),
                "`berth certs init` names"
            );
            node_names.push(service);
        }
    }
    // Every long-running service has a healthcheck; ports are published on
    // loopback unless BERTH_BIND says otherwise; images from a registry are
    // pinned; dependencies wait on health or completion.
    for (name, svc) in resolved["services"].as_hash().expect("services") {
        let name = name.as_str().unwrap_or_default();
        let one_shot = svc["restart"].as_str() == Some("no");
        assert!(
            one_shot || !svc["healthcheck"]["test"].is_badvalue(),
            "compose {name} has a healthcheck"
        );
        for p in svc["ports"].as_vec().into_iter().flatten() {
            let published = format!("{p:?}");
            assert!(
                published.contains("127.0.0.1"),
                "compose {name} publishes {published} on loopback"
            );
        }
        let image = svc["image"].as_str().unwrap_or_default();
        assert!(
            image.starts_with("berth-") || !image.ends_with(":latest") && image.contains(':'),
            "compose {name} pins {image}"
        );
        if let Some(deps) = svc["depends_on"].as_hash() {
            for (dep, how) in deps {
                assert!(
                    matches!(
                        how["condition"].as_str(),
                        Some("service_healthy" | "service_completed_successfully")
                    ),
                    "compose {name} waits for {dep:?} to be healthy or done: {how:?}"
                );
            }
        }
    }
    let servers = resolved["services"]["dispatcher"]["environment"]["AGENT_SERVERS"]
        .as_str()
        .expect("AGENT_SERVERS");
    for n in &node_names {
        assert!(servers.contains(&format!("https://{n}:7443")), "{servers}");
    }
    let certs = format!("{:?}", resolved["services"]["certs"]["entrypoint"]);
    for n in &node_names {
        assert!(
            certs.contains(&format!("--node {n}")),
            "a certificate for {n}: {certs}"
        );
    }

    // Kubernetes (the Helm chart, rendered): every document parses; env and
    // args match the flags; the nodes sit behind a headless service that
    // AGENT_SERVERS names.
    let mut kinds = BTreeMap::new();
    let mut headless = BTreeSet::new();
    let mut agent_servers = String::new();
    let chart = rendered_chart("host");
    for (file, docs) in [
        ("the chart", chart),
        (
            "secrets.example.yaml",
            yaml_docs("deploy/kubernetes/secrets.example.yaml"),
        ),
    ] {
        for doc in docs {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a document without kind"))
                .to_string();
            assert!(
                doc["apiVersion"].as_str().is_some(),
                "{file}: {kind} has apiVersion"
            );
            if kind == "Service" && doc["spec"]["clusterIP"].as_str() == Some("None") {
                headless.insert(doc["metadata"]["name"].as_str().expect("name").to_string());
            }
            if matches!(kind.as_str(), "Deployment" | "StatefulSet") {
                let tpl = &doc["spec"]["template"];
                let ann = &tpl["metadata"]["annotations"];
                assert_eq!(
                    ann["prometheus.io/scrape"].as_str(),
                    Some("true"),
                    "{kind} is scraped"
                );
                let port = ann["prometheus.io/port"].as_str().expect("scrape port");
                for c in tpl["spec"]["containers"].as_vec().expect("containers") {
                    let name = c["name"].as_str().expect("container name");
                    let cmd = if name == "dispatcher" {
                        &dispatcher
                    } else {
                        &node
                    };
                    for k in env_keys(&c["env"]) {
                        assert!(
                            known(name).contains(&k),
                            "k8s {name} sets {k}, which its binary does not read"
                        );
                    }
                    let listen = env_value(c, "BERTH_METRICS_LISTEN").expect("metrics listen");
                    assert!(
                        listen.ends_with(&format!(":{port}")),
                        "{name}: scrape port {port} vs {listen}"
                    );
                    if name == "agent-server" {
                        host_path_gateway(&tpl["spec"], c);
                    }
                    confined(name, c);
                    let args: Vec<String> = c["args"]
                        .as_vec()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    let argv = std::iter::once(cmd.get_name().to_string()).chain(args);
                    cmd.clone()
                        .try_get_matches_from(argv)
                        .map_err(|e| anyhow::anyhow!("{name} args: {e}"))?;
                    assert_eq!(
                        c["readinessProbe"]["httpGet"]["path"].as_str(),
                        Some("/readyz")
                    );
                    assert_eq!(
                        c["livenessProbe"]["httpGet"]["path"].as_str(),
                        Some("/healthz")
                    );
                    if let Some(v) = env_value(c, "AGENT_SERVERS") {
                        agent_servers = v.to_string();
                    }
                }
                if kind == "StatefulSet" {
                    let svc = doc["spec"]["serviceName"]
                        .as_str()
                        .expect("serviceName")
                        .to_string();
                    kinds.insert("statefulset-service".to_string(), svc);
                } else {
                    assert!(
                        doc["spec"]["replicas"].as_i64().unwrap_or(1) >= 2,
                        "dispatcher replicas"
                    );
                }
            }
            *kinds.entry(kind).or_default() += "+";
        }
    }
    let svc = kinds
        .get("statefulset-service")
        .expect("a StatefulSet of nodes");
    assert!(
        headless.contains(svc),
        "the StatefulSet's service {svc} is headless"
    );
    assert!(
        agent_servers.starts_with(&format!("https://{svc}.")),
        "AGENT_SERVERS resolves the headless service: {agent_servers}"
    );
    assert!(
        kinds.contains_key("Secret"),
        "certificates and credentials as secrets"
    );
    Ok(())
}

/// Long enough for a user's stop (and its snapshot) on a loaded CI machine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

#[tokio::test]
async fn sigterm_drains_a_node_letting_sessions_finish_and_moving_the_rest() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder()
        .nodes(2)
        .capacity(4)
        .lease(Duration::from_secs(1))
        .metrics()
        .configure_node(|_, cfg, _| cfg.drain_timeout = DRAIN_TIMEOUT)
        .start()
        .await?;
    let mut c = cluster.client();
    // Both sessions on node 0: node 1 is silent (down) while they start.
    cluster.nodes[1].proxy.set_paused(true);
    cluster
        .wait_node(1, Duration::from_secs(10), |n| {
            n.state == pb::NodeState::Down as i32
        })
        .await?;
    let moving = c
        .create_session(fake_session("write notes.txt kept"))
        .await?
        .into_inner();
    let finishing = c.create_session(fake_session("hello")).await?.into_inner();
    reply_after(&mut c, &moving.name, 0).await?;
    reply_after(&mut c, &finishing.name, 0).await?;
    let node0 = cluster.nodes[0].id.clone();
    let node1 = cluster.nodes[1].id.clone();
    assert_eq!(get(&mut c, &moving.name).await?.node, node0);
    assert_eq!(get(&mut c, &finishing.name).await?.node, node0);
    cluster.nodes[1].proxy.set_paused(false);
    cluster
        .wait_node(1, Duration::from_secs(10), |n| {
            n.state == pb::NodeState::Up as i32
        })
        .await?;

    let metrics = cluster.nodes[0].metrics.expect("metrics on");
    let sigterm = std::time::Instant::now();
    let task = cluster.sigterm_node(0);
    // Draining: readiness fails, dispatchers stop placing here.
    let mut ready = 200;
    for _ in 0..50 {
        ready = http_get(metrics, "/readyz").await?.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 503, "a draining node is not ready");
    cluster
        .wait_node(0, Duration::from_secs(5), |n| {
            n.state == pb::NodeState::Draining as i32
        })
        .await?;
    let refused = c.create_session(fake_session("new")).await?.into_inner();

    // One session finishes within the drain deadline.
    stop_and_wait(&mut c, &finishing.name).await?;
    assert!(
        sigterm.elapsed() < DRAIN_TIMEOUT,
        "it finished before the drain deadline"
    );

    // The other outlives the deadline: snapshotted, moved, resumed with its
    // files and its conversation.
    let moved = wait_for_session(
        &mut c,
        &moving.name,
        Duration::from_secs(60),
        "running on node 1",
        |s| s.node == node1 && s.status == pb::SessionStatus::Idle as i32,
    )
    .await?;
    assert!(
        sigterm.elapsed() >= DRAIN_TIMEOUT,
        "moved only after the drain deadline"
    );
    assert!(moved.epoch > moving.epoch);
    assert!(moved.snapshot.is_some(), "moved from a snapshot");
    assert_eq!(turn(&mut c, &moving.name, "read notes.txt").await?, "kept");
    let history = turn(&mut c, &moving.name, "history").await?;
    assert!(
        history.starts_with("write notes.txt kept | "),
        "conversation resumed: {history}"
    );
    let events = events_of(&mut c, &moving.name).await?;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "one gapless log"
    );
    assert!(
        events.iter().any(|e| berth_tests::payload(e)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("drained"))),
        "the log says why it moved"
    );

    // The node exits once it is empty, leaving no containers; the session
    // created during the drain ran on the other node.
    tokio::time::timeout(Duration::from_secs(60), task).await???;
    assert!(
        containers_labelled(&[format!("berth.node={node0}")])
            .await?
            .is_empty()
    );
    let placed = wait_for_session(
        &mut c,
        &refused.name,
        Duration::from_secs(30),
        "placed",
        |s| !s.node.is_empty(),
    )
    .await?;
    assert_eq!(
        placed.node, node1,
        "no new session lands on a draining node"
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn dispatcher_sigterm_ends_streams_retryably_and_hands_sessions_back() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().start().await?;
    let mut first = cluster.client();
    let s = first
        .create_session(fake_session("write notes.txt v1"))
        .await?
        .into_inner();
    reply_after(&mut first, &s.name, 0).await?;
    let before = get(&mut first, &s.name).await?;
    // A second dispatcher on the same database takes over.
    let mut second = cluster.add_dispatcher().await?;
    let mut stream = first
        .stream_events(pb::StreamEventsRequest {
            name: s.name.clone(),
            after_seq: before.last_seq,
        })
        .await?
        .into_inner();
    cluster.sigterm_dispatcher().await?;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        ended.code(),
        tonic::Code::Unavailable,
        "clients retry UNAVAILABLE: {ended:?}"
    );
    assert!(ended.message().contains("after_seq"), "{}", ended.message());

    let resumed = wait_for_session(
        &mut second,
        &s.name,
        Duration::from_secs(60),
        "resumed",
        |x| x.epoch > before.epoch && x.status == pb::SessionStatus::Idle as i32,
    )
    .await?;
    // Handed on without a restart: the next owner re-attached to the run
    // on its node (the agent was started once).
    assert!(resumed.epoch > before.epoch);
    let inits = events_of(&mut second, &s.name)
        .await?
        .iter()
        .filter(|e| e.r#type == "runtime.init")
        .count();
    assert_eq!(inits, 1, "the agent was started again");
    assert_eq!(turn(&mut second, &s.name, "read notes.txt").await?, "v1");
    let history = turn(&mut second, &s.name, "history").await?;
    assert!(
        history.starts_with("write notes.txt v1 | "),
        "conversation kept: {history}"
    );
    cluster.shutdown().await
}

/// The node's gateway directory (`BERTH_GATEWAY_DIR`, else its default) is
/// mounted from the host at the same path: the host's Docker daemon
/// bind-mounts it into each session container, so both must see it there.
fn host_path_gateway(pod: &yaml_rust2::Yaml, container: &yaml_rust2::Yaml) {
    let dir = env_value(container, "BERTH_GATEWAY_DIR").unwrap_or("/run/berth/gateway");
    let mount = container["volumeMounts"]
        .as_vec()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| {
            panic!("agent-server: no volume mounted at its gateway directory {dir}")
        });
    let volume = pod["volumes"]
        .as_vec()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .expect("the gateway directory's volume");
    assert_eq!(
        volume["hostPath"]["path"].as_str(),
        Some(dir),
        "agent-server: the gateway directory is the host's {dir}"
    );
}

/// A workload's container runs confined: no privilege escalation, every
/// capability dropped, a read-only root, and a startup probe before
/// liveness counts.
fn confined(name: &str, c: &yaml_rust2::Yaml) {
    let sc = &c["securityContext"];
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{name}: allowPrivilegeEscalation false"
    );
    assert_eq!(
        sc["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{name}: a read-only root"
    );
    assert!(
        sc["capabilities"]["drop"]
            .as_vec()
            .is_some_and(|d| d.iter().any(|x| x.as_str() == Some("ALL"))),
        "{name}: every capability dropped"
    );
    assert!(
        c["startupProbe"]["httpGet"]["path"].as_str().is_some(),
        "{name}: a startup probe"
    );
}

/// The example secrets are valid against the Kubernetes API's schemas
/// (strict: no unknown field), checked offline by `kubernetes-validate`,
/// which `scripts/setup.sh` installs (the chart's output is checked in
/// `the_helm_chart_renders_every_node_engine`).
#[test]
fn the_example_secrets_match_the_api_schemas() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let validator = root.join(".berth/venv/bin/kubernetes-validate");
    let out = std::process::Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(root.join("deploy/kubernetes/secrets.example.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", validator.display()));
    assert!(
        out.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every workload has a disruption budget, and the nodes take their API's
/// connections from dispatcher pods only.
#[test]
fn workloads_have_budgets_and_nodes_a_network_policy() {
    let docs = rendered_chart("host");
    for component in ["dispatcher", "agent-server"] {
        assert!(
            docs.iter()
                .any(|d| d["kind"].as_str() == Some("PodDisruptionBudget")
                    && d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
                        .as_str()
                        == Some(component)
                    && d["spec"]["maxUnavailable"].as_i64() == Some(1)),
            "a disruption budget for the {component}s"
        );
    }
    let node_policy = docs
        .iter()
        .find(|d| {
            d["kind"].as_str() == Some("NetworkPolicy")
                && d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str()
                    == Some("agent-server")
        })
        .expect("a network policy for the nodes");
    let api_rule = node_policy["spec"]["ingress"]
        .as_vec()
        .expect("ingress rules")
        .iter()
        .find(|r| {
            r["ports"]
                .as_vec()
                .is_some_and(|p| p.iter().any(|p| p["port"].as_i64() == Some(7443)))
        })
        .expect("a rule for the node API");
    let from = api_rule["from"].as_vec().expect("the node API has sources");
    assert!(
        from.iter().all(
            |f| f["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str()
                == Some("dispatcher")
        ),
        "only dispatchers reach the node API: {from:?}"
    );
}

/// The Helm chart lints clean and renders, for each node engine, manifests
/// valid against the Kubernetes schemas, in which the node reaches its
/// engine and shares the gateway directory's volume with it (the engine
/// seeing it where the node's `BERTH_GATEWAY_ENGINE_DIR` says).
#[test]
fn the_helm_chart_renders_every_node_engine() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let validator = root.join(".berth/venv/bin/kubernetes-validate");
    for engine in ["host", "dind", "sysbox"] {
        let docs = rendered_chart(engine);
        let file = chart_dir().join(format!("{engine}.yaml"));
        let o = std::process::Command::new(&validator)
            .args(["--strict", "--quiet"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", validator.display()));
        assert!(
            o.status.success(),
            "kubernetes-validate {engine}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let node = docs
            .iter()
            .find(|d| d["kind"].as_str() == Some("StatefulSet"))
            .expect("the nodes");
        let pod = &node["spec"]["template"]["spec"];
        for workload in docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        {
            assert_eq!(
                workload["spec"]["template"]["spec"]["automountServiceAccountToken"].as_bool(),
                Some(false),
                "{engine}: no service account token in berth's pods"
            );
        }
        let containers = pod["containers"].as_vec().expect("containers");
        let by_name = |n: &str| containers.iter().find(|c| c["name"].as_str() == Some(n));
        let agent = by_name("agent-server").expect("the node container");
        for c in containers
            .iter()
            .filter(|c| c["name"].as_str() != Some("engine"))
        {
            confined(c["name"].as_str().unwrap_or_default(), c);
        }
        let image = agent["image"].as_str().expect("image");
        assert!(
            image.ends_with(":0.1.0"),
            "{engine}: image at the chart's version: {image}"
        );
        let env = |name: &str| env_value(agent, name).map(String::from);
        let mounts_gateway_at = |c: &yaml_rust2::Yaml, path: &str| {
            c["volumeMounts"].as_vec().into_iter().flatten().any(|m| {
                m["mountPath"].as_str() == Some(path) && m["name"].as_str() == Some("gateway")
            })
        };
        let mounts_gateway = |c: &yaml_rust2::Yaml| mounts_gateway_at(c, "/run/berth/gateway");
        assert_eq!(
            env("BERTH_GATEWAY_DIR").as_deref(),
            Some("/run/berth/gateway")
        );
        assert!(
            mounts_gateway(agent),
            "{engine}: the node mounts its gateway directory"
        );
        match engine {
            "host" => {
                host_path_gateway(pod, agent);
                assert_eq!(env("DOCKER_HOST"), None, "host: the machine's socket");
                assert_eq!(
                    env("BERTH_GATEWAY_ENGINE_DIR"),
                    None,
                    "host: the machine's Docker sees the host path"
                );
            }
            _ => {
                let sidecar = by_name("engine").expect("an engine sidecar");
                let seen_at = env("BERTH_GATEWAY_ENGINE_DIR")
                    .unwrap_or_else(|| panic!("{engine}: BERTH_GATEWAY_ENGINE_DIR"));
                assert!(
                    mounts_gateway_at(sidecar, &seen_at),
                    "{engine}: the engine mounts the gateway volume at {seen_at}"
                );
                assert_eq!(
                    env("DOCKER_HOST").as_deref(),
                    Some("unix:///var/run/engine/docker.sock"),
                    "{engine}: the node reaches its own engine"
                );
                // The node itself is not root: the engine gives its socket
                // to the node's group, and the pod's volumes are its group's.
                assert_eq!(
                    agent["securityContext"]["runAsNonRoot"].as_bool(),
                    Some(true)
                );
                let uid = agent["securityContext"]["runAsUser"]
                    .as_i64()
                    .expect("runAsUser");
                assert_ne!(uid, 0, "{engine}: the node runs as a user");
                let group = format!(
                    "--group={}",
                    agent["securityContext"]["runAsGroup"]
                        .as_i64()
                        .expect("runAsGroup")
                );
                assert!(
                    sidecar["args"]
                        .as_vec()
                        .expect("args")
                        .iter()
                        .any(|a| a.as_str() == Some(group.as_str())),
                    "{engine}: the engine's socket is the node's group's ({group})"
                );
                assert_eq!(
                    pod["securityContext"]["fsGroup"].as_i64(),
                    agent["securityContext"]["runAsGroup"].as_i64()
                );
                let privileged = sidecar["securityContext"]["privileged"].as_bool() == Some(true);
                assert_eq!(
                    privileged,
                    engine == "dind",
                    "{engine}: privileged only for dind"
                );
                assert_eq!(
                    pod["runtimeClassName"].as_str().is_some(),
                    engine == "sysbox",
                    "{engine}: the sysbox RuntimeClass only for sysbox"
                );
                let claim = &node["spec"]["volumeClaimTemplates"][0];
                assert_eq!(
                    claim["spec"]["resources"]["requests"]["storage"].as_str(),
                    Some("50Gi"),
                    "{engine}: the engine's storage is sized by a value"
                );
            }
        }
    }
}

/// A container's env var `name`, as a Kubernetes manifest sets it.
fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a str> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
}

/// The Helm chart rendered (by `scripts/helm-render.py`, once per test
/// process) for node engine `which` (`host`, `dind`, `sysbox`), or its
/// cloud profile (`cloud`: core objects, `custom`: custom resources), as
/// YAML documents.
fn rendered_chart(which: &str) -> Vec<Yaml> {
    let text =
        std::fs::read_to_string(chart_dir().join(format!("{which}.yaml"))).expect("rendered");
    YamlLoader::load_from_str(&text)
        .expect("yaml")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Where the chart was rendered (rendered on first use in this process).
fn chart_dir() -> &'static std::path::Path {
    static RENDERED: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::env::temp_dir().join(format!("berth-chart-{}", std::process::id()));
        let o = std::process::Command::new(root.join(".berth/venv/bin/python"))
            .arg(root.join("scripts/helm-render.py"))
            .arg(&out)
            .output()
            .expect("the venv's python (run scripts/setup.sh)");
        assert!(
            o.status.success(),
            "helm-render.py: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// With `monitoring.serviceMonitor`, a ServiceMonitor scrapes each
/// component on the port its Service names `metrics`, which is the port
/// the component serves its metrics on.
#[test]
fn the_chart_s_service_monitors_scrape_the_metrics_ports() {
    let monitors: Vec<Yaml> = rendered_chart("custom")
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some("ServiceMonitor"))
        .collect();
    assert_eq!(monitors.len(), 2, "one per component");
    let docs = rendered_chart("host");
    for m in &monitors {
        let component = m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
            .as_str()
            .expect("component");
        let port_name = m["spec"]["endpoints"][0]["port"].as_str().expect("port");
        let service = docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some("Service")
                    && d["spec"]["selector"]["app.kubernetes.io/component"].as_str()
                        == Some(component)
            })
            .expect("the component's service");
        let port = service["spec"]["ports"]
            .as_vec()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(port_name))
            .and_then(|p| p["port"].as_i64())
            .unwrap_or_else(|| panic!("{component}: no service port named {port_name}"));
        let workload = docs
            .iter()
            .find(|d| {
                matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet"))
                    && d["metadata"]["labels"]["app.kubernetes.io/component"].as_str()
                        == Some(component)
            })
            .expect("the component's workload");
        let container = &workload["spec"]["template"]["spec"]["containers"][0];
        let listen = env_value(container, "BERTH_METRICS_LISTEN").expect("metrics listen");
        assert!(
            listen.ends_with(&format!(":{port}")),
            "{component}: the monitor scrapes {port}, the component serves {listen}"
        );
    }
}

/// Bad chart values fail at template time with an error that names the
/// value: a missing Secret, an engine the chart does not know.
#[test]
fn bad_chart_values_fail_naming_the_value() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = r#"
import json, sys
import helm_python as helm
chart = helm.Chart.load(sys.argv[1])
out = {}
for name, values in [
    ("no secrets key", {"secrets": {"secretsKey": ""}}),
    ("no node certificates", {"secrets": {"nodeTls": ""}}),
    ("an unknown engine", {"nodes": {"engine": "kata"}}),
    ("a latest tag", {"image": {"tag": "latest"}}),
]:
    try:
        chart.validate_schema(chart.merge_values(values))
        chart.render(values, name="berth", namespace="berth")
        out[name] = ""
    except helm.HelmError as e:
        out[name] = str(e)
print(json.dumps(out))
"#;
    let o = std::process::Command::new(root.join(".berth/venv/bin/python"))
        .args(["-c", script])
        .arg(root.join("deploy/helm/berth"))
        .output()
        .expect("the venv's python (run scripts/setup.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let errors: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&o.stdout).expect("json");
    for (case, names) in [
        ("no secrets key", "secrets.secretsKey"),
        ("no node certificates", "secrets.nodeTls"),
        ("an unknown engine", "/nodes/engine"),
        ("a latest tag", "/image/tag"),
    ] {
        let err = &errors[case];
        assert!(
            err.contains(names),
            "{case}: the error names {names}: {err:?}"
        );
    }
}

/// The chart's cloud profile (a dind node pool, workload identity,
/// cert-manager, every monitoring object) validates, and each optional part
/// is wired to what it serves:
/// - the PrometheusRule holds the alert rules of `deploy/prometheus`, and
///   the dashboard ConfigMap the dashboard of `deploy/grafana`, with the
///   label Grafana's sidecar watches;
/// - cert-manager's certificates name what each side checks (the node's the
///   host in `AGENT_SERVERS`, the dispatcher's a name nodes allow), and
///   the pods read them from the Secrets they fill, under their key names;
/// - the pods run as the annotated service account, with no API token.
#[test]
fn the_chart_s_cloud_profile_wires_identity_certificates_and_monitoring() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let validator = root.join(".berth/venv/bin/kubernetes-validate");
    let o = std::process::Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(chart_dir().join("cloud.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", validator.display()));
    assert!(
        o.status.success(),
        "kubernetes-validate cloud: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let core = rendered_chart("cloud");
    let custom = rendered_chart("custom");
    let kind = |docs: &[Yaml], k: &str| -> Vec<Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .cloned()
            .collect()
    };

    let rules = &kind(&custom, "PrometheusRule")[0];
    let shipped = &yaml_docs("deploy/prometheus/alerts.yml")[0];
    assert_eq!(
        rules["spec"]["groups"], shipped["groups"],
        "the shipped alert rules"
    );
    let dashboard = &kind(&core, "ConfigMap")[0];
    assert_eq!(
        dashboard["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json: serde_json::Value = serde_json::from_str(
        dashboard["data"]["berth.json"]
            .as_str()
            .expect("the dashboard"),
    )
    .expect("JSON");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/berth.json")).expect("read"),
    )
    .expect("JSON");
    assert_eq!(json, file, "the shipped dashboard");

    let certs = kind(&custom, "Certificate");
    let cert = |name: &str| {
        certs
            .iter()
            .find(|c| c["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("certificate {name}"))
    };
    let workload = |k: &str| kind(&core, k).pop().unwrap_or_else(|| panic!("a {k}"));
    let (dispatcher, nodes) = (workload("Deployment"), workload("StatefulSet"));
    let first = |w: &Yaml| w["spec"]["template"]["spec"]["containers"][0].clone();
    // Both export their spans to the collector (the nodes forward agents'
    // own telemetry there too), sampled as the profile says.
    for w in [&dispatcher, &nodes] {
        let c = first(w);
        assert_eq!(
            env_value(&c, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("http://otel-collector.monitoring:4317")
        );
        assert_eq!(env_value(&c, "OTEL_TRACES_SAMPLER_ARG"), Some("0.1"));
    }
    let host = rendered_chart("host");
    assert!(
        host.iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")))
            .all(|w| env_value(&first(w), "OTEL_EXPORTER_OTLP_ENDPOINT").is_none()),
        "traces are off by default"
    );
    let agent_servers = env_value(&first(&dispatcher), "AGENT_SERVERS")
        .expect("AGENT_SERVERS")
        .to_string();
    let node_host = agent_servers
        .trim_start_matches("https://")
        .rsplit_once(':')
        .expect("host:port")
        .0
        .to_string();
    let names = |c: &Yaml| -> Vec<String> {
        c["spec"]["dnsNames"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(String::from))
            .collect()
    };
    assert!(
        names(cert("berth-node")).contains(&node_host),
        "the node certificate names {node_host}"
    );
    assert_eq!(
        cert("berth-dispatcher")["spec"]["commonName"].as_str(),
        Some(berth_common::tls::DISPATCHER_NAME),
        "the name nodes allow by default"
    );
    for (w, c) in [(&dispatcher, "berth-dispatcher"), (&nodes, "berth-node")] {
        let pod = &w["spec"]["template"]["spec"];
        let secret = cert(c)["spec"]["secretName"].as_str().expect("secretName");
        let certs_volume = pod["volumes"]
            .as_vec()
            .expect("volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some("certs"))
            .expect("the certs volume");
        assert_eq!(
            certs_volume["secret"]["secretName"].as_str(),
            Some(secret),
            "{c}"
        );
        let container = first(w);
        for (var, key) in [
            ("BERTH_TLS_CA", "ca.crt"),
            ("BERTH_TLS_CERT", "tls.crt"),
            ("BERTH_TLS_KEY", "tls.key"),
        ] {
            assert_eq!(
                env_value(&container, var),
                Some(format!("/certs/{key}").as_str()),
                "{c}: cert-manager's key names"
            );
        }
        assert_eq!(pod["serviceAccountName"].as_str(), Some("berth"));
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    }
    let account = &kind(&core, "ServiceAccount")[0];
    assert_eq!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].as_str(),
        Some("arn:aws:iam::123456789012:role/berth")
    );
}

/// The shipped agent image runs the CLI the tests run: the same wheel
/// version and sha256 as the real-CLI test image.
#[test]
fn the_agent_image_pins_the_tested_cli() {
    let test_image = read("deploy/test-image/build-claude.sh");
    let shipped = read("deploy/docker/agent.Dockerfile");
    let after = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no `{key}`"))
            .trim()
            .to_string()
    };
    assert_eq!(
        after(&shipped, "ARG CLAUDE_AGENT_SDK_VERSION="),
        after(&test_image, "version=")
    );
    assert_eq!(
        after(&shipped, "ARG CLAUDE_AGENT_SDK_SHA256="),
        after(&test_image, "sha256=")
    );
    assert!(!shipped.contains("node:"), "no Node.js image");
    assert!(shipped.contains("USER 1000:1000"), "the agent is not root");
}
