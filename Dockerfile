# One image runs either role: `fledged-coordinator` (the Deployment, non-root) or
# `fledged-agent` (the DaemonSet; its pod runs it as root only to open the runtime
# socket, with every capability dropped).
#
# BASE must hold Python 3.11+ with venv; the default is the official slim image.
# tools/build-image.sh builds it here on a Debian-made base; tests/realnodes/test_install.py
# runs it on real kubelet nodes.
ARG BASE=python:3.11-slim-bookworm

# The dependencies in a stage of their own: a change of the sources alone reuses it
# (they are read from pyproject.toml, the one place they are listed).
FROM ${BASE} AS deps
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -m venv /venv \
 && python3 -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /venv/bin/pip install --no-cache-dir -r requirements.txt

FROM deps AS build
COPY README.md ./
COPY agent agent
COPY common common
COPY coordinator coordinator
COPY protos protos
# Bytecode only for what the two commands import at start (the read-only pods cannot
# write it, and compile those modules at every start without it); not for the rest
# of the dependencies (pip's would add 50 MB for the kubernetes client alone). From /,
# so that the installed packages are imported, not the sources in /src.
RUN /venv/bin/pip install --no-cache-dir --no-deps . \
 && find /venv -name '__pycache__' -prune -exec rm -rf {} + \
 && cd / && /venv/bin/python -c "import agent.main, agent.server, agent.lease, agent.runtime.docker, coordinator.main"

FROM ${BASE}
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
CMD ["fledged-coordinator", "--help"]
