#!/usr/bin/env python3
"""Lints berth's Helm chart and renders it offline, with Helm's own engine
(helm-python-sdk: no cluster, no helm binary), once per node engine.

Usage: scripts/helm-render.py OUT_DIR
Writes OUT_DIR/<engine>.yaml for host, dind and sysbox, and
OUT_DIR/monitoring.yaml (the Prometheus Operator's objects, on their own:
they are custom resources); exits 1 on a lint error or a render failure.
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
# The monitoring objects alone (custom resources, not in the API's schemas).
values = {"monitoring": {"serviceMonitor": True}}
chart.validate_schema(chart.merge_values(values))
rendered = chart.render(values, name="berth", namespace="berth", is_install=True)
with open(os.path.join(out, "monitoring.yaml"), "w") as f:
    f.write(rendered.get("berth/templates/monitoring.yaml", ""))
