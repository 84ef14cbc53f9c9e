# berth: the two commands a person needs are `make demo` and `make test`.
# Both work on a fresh Debian machine: they install the Debian packages berth
# needs (apt-get update first, only when something is missing) and build .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# containerd: its `ctr` is the real client our wire-compatibility tests run,
# its shim and daemon are the yardstick for bench/. runc runs containers.
# docker-registry (+ skopeo) is the real registry images are pulled from in tests;
# busybox-static is what test images are built from; containernetworking-plugins (+ iptables for
# portmap) are the real CNI plugins pod networks are made with.
DEB_PACKAGES := containerd runc iproute2 util-linux procps busybox-static docker-registry skopeo openssl containernetworking-plugins iptables
STAMP := $(VENV)/.installed
PY_DIRS := daemon plugins protos tests $(wildcard bench)

.PHONY: all deps venv install protos protos-check lint typecheck test unit integration demo clean

all: test

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

install: deps venv

protos: venv
	$(BIN)/python protos/generate.py

protos-check: venv
	$(BIN)/python protos/generate.py --check

lint: install
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy
	$(BIN)/mypy protos/generate.py
	$(BIN)/python protos/generate.py --check

typecheck: install
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: install
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

integration: install
	$(BIN)/pytest -q -p no:cacheprovider tests/integration

demo: install
	$(BIN)/python -m daemon.cli.demo

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
