#!/usr/bin/env python3
"""Lints berth's Helm chart and renders it offline, with Helm's own engine
(helm-python-sdk: no cluster, no helm binary), once per node engine.

Usage: scripts/helm-render.py OUT_DIR
Writes OUT_DIR/<engine>.yaml for host, dind and sysbox, and the cloud
profile (values.yaml's optional parts on): its core objects in
OUT_DIR/cloud.yaml, its custom resources (the Prometheus Operator's,
cert-manager's) in OUT_DIR/custom.yaml; exits 1 on a lint error or a
render failure.
"""
import os, sys

import helm_python as helm

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "helm", "berth")
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
report = helm.lint(root, strict=True)
errors = report.get("errors") or [m["error"] for m in report.get("messages", []) if m.get("severity", 0) >= 2]
if errors:
    print("helm lint:", *errors, sep="\n  ", file=sys.stderr)
    sys.exit(1)
chart = helm.Chart.load(root)
for engine in ("host", "dind", "sysbox"):
    values = {"nodes": {"engine": engine}}
    chart.validate_schema(chart.merge_values(values))
    rendered = chart.render(values, name="berth", namespace="berth", is_install=True)
    with open(os.path.join(out, f"{engine}.yaml"), "w") as f:
        for path in sorted(rendered):
            text = rendered[path].strip()
            if text:
                f.write(f"---\n# {path}\n{text}\n")
# The cloud profile: a dind node pool, workload identity for S3, cert-manager
# certificates, every monitoring object and traces to a collector. Core objects go to cloud.yaml
# (validated against the API's schemas), custom resources to custom.yaml.
values = {
    "nodes": {"engine": "dind"},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/berth"}},
    "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "berth-ca", "kind": "ClusterIssuer"}}},
    "monitoring": {"serviceMonitor": True, "prometheusRule": True, "dashboard": True},
    "tracing": {"otlpEndpoint": "http://otel-collector.monitoring:4317", "sampler": "parentbased_traceidratio", "samplerArg": "0.1"},
}
chart.validate_schema(chart.merge_values(values))
rendered = chart.render(values, name="berth", namespace="berth", is_install=True)
core, custom = [], []
for path in sorted(rendered):
    for doc in rendered[path].split("\n---"):
        text = doc.strip().removeprefix("---").strip()
        if not text or all(l.startswith("#") or not l.strip() for l in text.splitlines()):
            continue
        kind = "custom" if ("monitoring.coreos.com/" in text or "cert-manager.io/v1\nkind" in text) else "core"
        (custom if kind == "custom" else core).append(f"---\n# {path}\n{text}\n")
with open(os.path.join(out, "cloud.yaml"), "w") as f:
    f.write("".join(core))
with open(os.path.join(out, "custom.yaml"), "w") as f:
    f.write("".join(custom))
