# One image runs either role: `fledged-coordinator` (the Deployment, non-root) or
# `fledged-agent` (the DaemonSet; its pod runs it as root only to open the runtime
# socket, with every capability dropped).
#
# BASE must hold Python 3.11+ with venv; the default is the official slim image.
# tools/check-image.sh builds this file on a Debian-made base to prove it works here.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent agent
COPY common common
COPY coordinator coordinator
COPY protos protos
RUN python3 -m venv /venv \
 && /venv/bin/pip install --no-cache-dir . \
 && find /venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
CMD ["fledged-coordinator", "--help"]
