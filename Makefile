# The two commands: `make run` and `make test`. Everything they need is installed from here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/appliance.yaml
# Debian packages the project needs, as "command-to-check:package".
HOST_TOOLS := wasm-validate:wabt gcc:gcc mosquitto_passwd:mosquitto openssl:openssl promtool:prometheus

.PHONY: run test bench modules host-deps venv clean

host-deps:
	@missing=""; \
	for pair in $(HOST_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "not root and no sudo: as root, run  apt-get install -y$$missing  then run make again"; exit 1; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) host-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

modules: host-deps $(STAMP)
	$(PY) -m appliance module build

run: modules
	$(VENV)/bin/appliance run --config $(CONFIG)

test: modules
	$(PY) -m pytest -q tests

bench: modules
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_bearing.py
	$(PY) benchmarks/bench_motion.py

clean:
	rm -rf modules/build var .pytest_cache
