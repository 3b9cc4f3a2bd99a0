# syntax=docker/dockerfile:1
# The production agent image: the Claude Code CLI that berth's tests run,
# taken from the same pinned `claude-agent-sdk` wheel (its manylinux x86_64
# build bundles the CLI as `claude_agent_sdk/_bundled/claude`, a glibc
# binary: no Node.js), checked against its sha256, on Debian slim, run as a
# non-root user. berth starts it with a keep-alive process, copies the
# session's files in through the Docker API and execs `claude` with the
# session's env (the model API key stays in the node's egress gateway).
#
#   docker build -f deploy/docker/agent.Dockerfile -t berth-agent:latest deploy/docker
#
# The version and sha256 are deploy/test-image/build-claude.sh's: bump both
# together, deliberately. berth mounts writable volumes at /workspace and
# /home/agent and makes the root filesystem read-only, so nothing else needs
# to be writable.

ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS wheel
ARG CLAUDE_AGENT_SDK_VERSION=0.2.189
ARG CLAUDE_AGENT_SDK_SHA256=b26a6a30a4e2cb025a6f5c95e1ce4469b38fcc51015c392f627bea7c948d67ad
ADD --checksum=sha256:${CLAUDE_AGENT_SDK_SHA256} \
    https://files.pythonhosted.org/packages/py3/c/claude-agent-sdk/claude_agent_sdk-${CLAUDE_AGENT_SDK_VERSION}-py3-none-manylinux_2_17_x86_64.whl \
    /claude_agent_sdk.whl
RUN apt-get update \
 && apt-get install -y --no-install-recommends unzip \
 && rm -rf /var/lib/apt/lists/* \
 && unzip -p /claude_agent_sdk.whl claude_agent_sdk/_bundled/claude > /claude \
 && chmod 0755 /claude

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git ripgrep procps \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/agent agent \
 && mkdir -p /workspace \
 && chown 1000:1000 /workspace /home/agent
COPY --from=wheel /claude /usr/local/bin/claude

USER 1000:1000
ENV HOME=/home/agent \
    DISABLE_AUTOUPDATER=1 \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
WORKDIR /workspace
# berth replaces this with its keep-alive (--keepalive-cmd) and execs the
# agent; run by hand, the image just waits.
CMD ["tail", "-f", "/dev/null"]
