# The production agent image: Node 20 with the Claude Code CLI, run as a
# non-root user. berth starts it with a keep-alive process, copies the
# session's files in through the Docker API and execs `claude` with the
# session's env (ANTHROPIC_API_KEY comes from the session spec or agent).
#
#   docker build -f deploy/docker/agent.Dockerfile -t berth-agent:latest deploy/docker
#
# berth mounts writable volumes at /workspace and /home/agent and makes the
# root filesystem read-only, so nothing else needs to be writable.

ARG NODE_IMAGE=node:20-bookworm-slim
FROM ${NODE_IMAGE}

# Pin the CLI for reproducible sessions; bump deliberately.
ARG CLAUDE_CODE_VERSION=2.0.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git ripgrep procps \
 && rm -rf /var/lib/apt/lists/* \
 && npm install -g "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && npm cache clean --force \
 # The node image's `node` user is uid 1000; berth execs as 1000:1000.
 && usermod --login agent --home /home/agent --move-home node \
 && groupmod --new-name agent node \
 && mkdir -p /workspace /home/agent \
 && chown 1000:1000 /workspace /home/agent

USER 1000:1000
ENV HOME=/home/agent \
    DISABLE_AUTOUPDATER=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
WORKDIR /workspace
# berth replaces this with its keep-alive (--keepalive-cmd) and execs the
# agent; run by hand, the image just waits.
CMD ["tail", "-f", "/dev/null"]
