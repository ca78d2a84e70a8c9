# The two commands: `make run` and `make test`. Everything they need is installed from here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/appliance.yaml
# Debian packages the project needs, as "command-to-check:package".
HOST_TOOLS := wasm-validate:wabt gcc:gcc mosquitto_passwd:mosquitto openssl:openssl promtool:prometheus
# The SD-card image and its QEMU rig (make image, make image-test); files count as commands.
IMAGE_TOOLS := mmdebstrap:mmdebstrap update-binfmts:binfmt-support qemu-aarch64-static:qemu-user-static \
	qemu-system-aarch64:qemu-system-arm qemu-img:qemu-utils /usr/lib/u-boot/qemu_arm64/u-boot.bin:u-boot-qemu \
	mkfs.vfat:dosfstools mcopy:mtools sfdisk:fdisk mkfs.ext4:e2fsprogs bmaptool:bmap-tools xz:xz-utils
# Building the image needs root (mmdebstrap --mode=root, chroot, file ownership).
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench modules host-deps venv clean train-models image image-raw image-test image-deps

# Install the Debian packages whose command ($(1): "command:package" pairs) is missing.
define apt_ensure
	@missing=""; \
	for pair in $(1); do command -v $${pair%%:*} >/dev/null || [ -e $${pair%%:*} ] || missing="$$missing $${pair##*:}"; done; \
	$(2) \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "not root and no sudo: as root, run  apt-get install -y$$missing  then run make again"; exit 1; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

PYTHON_CHECKS := python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev";

host-deps:
	$(call apt_ensure,$(HOST_TOOLS),$(PYTHON_CHECKS))

$(STAMP): pyproject.toml
	$(MAKE) host-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# The trained models (modules/models) compiled to modules for configs/nn-*.yaml, again only when
# a model or the compiler changed.
NN_BUILT := modules/build/.nn-models
$(NN_BUILT): $(wildcard modules/models/*/*.onnx modules/models/*/report.json appliance/nn/*.py) \
             modules/sdk/ap_nn.h appliance/evaluation_nn.py $(STAMP)
	$(PY) -m appliance.evaluation_nn build
	touch $@

modules: host-deps $(STAMP)
	$(PY) -m appliance module build
	$(MAKE) $(NN_BUILT)

run: modules
	$(VENV)/bin/appliance run --config $(CONFIG)

test: modules
	$(PY) -m pytest -q tests

bench: modules
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_bearing.py
	$(PY) benchmarks/bench_motion.py
	$(PY) benchmarks/bench_nn.py

image-deps:
	$(call apt_ensure,$(IMAGE_TOOLS),)

# The flashable card: build/image/*.img, .img.xz, .bmap, SHA256SUMS (image/build.py).
image: modules image-deps
	$(AS_ROOT) $(PY) image/build.py

image-raw: modules image-deps
	$(AS_ROOT) $(PY) image/build.py --raw-only

# Boot the image under QEMU and check the appliance in it from the host (image/qemu_test.py).
image-test: image-raw
	$(PY) image/qemu_test.py

# The training stack for modules/models (torch, CPU only) in its own venv: `make test` never needs it.
TRAIN_VENV ?= .venv-train
TRAIN_STAMP := $(TRAIN_VENV)/.installed

$(TRAIN_STAMP): modules/models/requirements.txt
	$(MAKE) host-deps
	python3 -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRAIN_VENV)/bin/python -m pip install -q -r modules/models/requirements.txt
	touch $@

# Retrains both models from the recordings in ../shared/data and rewrites modules/models/*/ (a few minutes).
train-models: $(TRAIN_STAMP)
	$(TRAIN_VENV)/bin/python modules/models/train_bearing.py
	$(TRAIN_VENV)/bin/python modules/models/train_people.py

clean:
	rm -rf modules/build var .pytest_cache build/image
