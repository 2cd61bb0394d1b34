#!/bin/sh
# The container's entrypoint: scripts/gateway for a pod. Both listeners on 0.0.0.0, a port of its own for
# metrics and probes, rules from the ConfigMap, the CA from the Secret, usage and egress records as JSON
# lines on standard output and mitmproxy's own log on standard error (llm-gateway-dump).
# Settings come from the environment (deploy/k8s/deployment.yaml sets them); arguments go to mitmdump,
# e.g. `--set termlog_verbosity=warn`.
set -eu

host=${LLM_GATEWAY_HOST:-0.0.0.0}
egress_port=${LLM_GATEWAY_EGRESS_PORT:-8080}
base_port=${LLM_GATEWAY_BASE_PORT:-8081}
metrics_port=${LLM_GATEWAY_METRICS_PORT:-9090}
upstream=${LLM_GATEWAY_UPSTREAM:-https://api.anthropic.com}
rules=${LLM_GATEWAY_RULES:-/etc/llm-gateway/rules.yaml}
ca=${LLM_GATEWAY_CA-/etc/llm-gateway/ca}            # empty: each replica makes a CA of its own
confdir=${LLM_GATEWAY_CONFDIR:-/tmp/mitmproxy}       # writable (an emptyDir); the shared CA is copied beside it
script=${LLM_GATEWAY_SCRIPT:-/app/addons/gateway.py}
drain_grace=${LLM_GATEWAY_DRAIN_GRACE:-25}           # seconds; below the pod's terminationGracePeriodSeconds
nofile=${LLM_GATEWAY_NOFILE:-65536}                  # open files: two per connection (docs/reliability.md)
# mitmproxy buffers every body it does not stream: a non-API upload or download (egress mode) is held whole.
# body_size_limit ends one over this size instead of letting it fill the pod's memory; keep it above the rule
# file's limits.request_body (32m by default; API requests get the gateway's native 413 below that) and well
# below the memory limit (docs/reliability.md, "Hostile input").
body_size_limit=${LLM_GATEWAY_BODY_SIZE_LIMIT:-64m}
# mitmproxy also buffers a request or answer head until its blank line comes, however long; a longer head is
# refused (a request: native 431; an answer: the exchange fails). Client heads are a few kB (docs/reliability.md).
head_size_limit=${LLM_GATEWAY_HEAD_SIZE_LIMIT:-256k}

# The open-file limit: as high as asked, within the hard limit the container runtime gives.
ulimit -n "$nofile" 2>/dev/null || echo "llm-gateway: cannot raise the open-file limit to $nofile (hard limit $(ulimit -Hn))" >&2

# connection_strategy=lazy: connect upstream only for a request that needs it, so the probes answered
# on the base-URL listener never depend on the upstream being reachable.
exec llm-gateway-dump -s "$script" \
  --mode "regular@$host:$egress_port" \
  --mode "reverse:$upstream@$host:$base_port" \
  --set "confdir=$confdir" \
  --set "gateway_rules=$rules" \
  --set "gateway_ca=$ca" \
  --set gateway_log=- \
  --set "gateway_metrics_host=$host" \
  --set "gateway_metrics_port=$metrics_port" \
  --set "gateway_drain_grace=$drain_grace" \
  --set connection_strategy=lazy \
  --set flow_detail=0 \
  --set "body_size_limit=$body_size_limit" \
  --set "gateway_head_size_limit=$head_size_limit" \
  "$@"
