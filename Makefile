# kube-fledged (Python). `make test` and `make demo` work as the first command on a
# fresh machine: each builds what it needs (venv, generated protos are committed,
# the real Kubernetes/containerd/etcd/helm binaries via tools/build-testenv.sh).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export GOTOOLCHAIN := local

.PHONY: prereqs venv protos testenv test test-unit lint demo clean manifests image

# Debian packages the tests and the demo need (installed when missing; we are root).
prereqs:
	bash tools/prereqs.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: $(STAMP)
	$(PY) protos/generate.py

testenv: prereqs
	bash tools/build-testenv.sh

test: prereqs $(STAMP) testenv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m 'not env' $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The project's image from the Dockerfile, on a Debian-made base, saved under
# ~/.cache/kube-fledged/image/ (the install tests build it too, and push it).
image: prereqs
	bash tools/build-image.sh

demo: prereqs $(STAMP) testenv
	$(PY) -m tests.testenv.demo

clean:
	rm -rf $(VENV) .testenv .pytest_cache .mypy_cache .ruff_cache

# deploy/base is rendered from the Helm chart, so kustomize and Helm users get the
# same objects; a test fails when it is stale.
manifests: testenv
	.testenv/bin/helm template kube-fledged deploy/chart/kube-fledged --namespace kube-fledged \
	  --set createNamespace=true \
	  | sed '/^# Source:/d' > deploy/base/kube-fledged.yaml
