{{/* The image of berth's component `name`, at the chart's tag. */}}
{{- define "berth.image" -}}
{{ .root.Values.image.repository }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{/* Labels of a component. */}}
{{- define "berth.labels" -}}
app.kubernetes.io/name: berth
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A container's confinement. */}}
{{- define "berth.confined" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Probes on the metrics port. */}}
{{- define "berth.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 2
  failureThreshold: 30
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 6
{{- end }}

{{/* The pods' service account. */}}
{{- define "berth.serviceAccount" -}}
{{ .Values.serviceAccount.name | default .Release.Name }}
{{- end }}

{{/* The Secret with component `name`'s mTLS material ("dispatcher" or "node"). */}}
{{- define "berth.tlsSecret" -}}
{{- if .root.Values.tls.certManager.enabled -}}
{{ .root.Release.Name }}-{{ .name }}-tls
{{- else if eq .name "dispatcher" -}}
{{ required "secrets.dispatcherTls: the dispatchers' mTLS Secret is required (or tls.certManager.enabled)" .root.Values.secrets.dispatcherTls }}
{{- else -}}
{{ required "secrets.nodeTls: the nodes' mTLS Secret is required (or tls.certManager.enabled)" .root.Values.secrets.nodeTls }}
{{- end -}}
{{- end }}

{{/* The mTLS files' paths: cert-manager's key names, or the Secrets' own. */}}
{{- define "berth.tlsEnv" -}}
{{- $cm := .Values.tls.certManager.enabled -}}
- name: BERTH_TLS_CA
  value: /certs/{{ ternary "ca.crt" "ca.pem" $cm }}
- name: BERTH_TLS_CERT
  value: /certs/{{ ternary "tls.crt" "tls.pem" $cm }}
- name: BERTH_TLS_KEY
  value: /certs/{{ ternary "tls.key" "tls-key.pem" $cm }}
{{- end }}

{{- /* OpenTelemetry: where spans (and agents' own telemetry) go, and how
many traces are kept. Nothing when tracing.otlpEndpoint is empty. */ -}}
{{- define "berth.otelEnv" -}}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.Values.tracing.sampler | quote }}
{{- with $.Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: k8s.namespace.name={{ $.Release.Namespace }},service.namespace={{ $.Release.Name }}
{{- end }}
{{- end }}
