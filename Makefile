# The two commands: `make run` and `make test`. Everything they need is installed from here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/appliance.yaml
# Debian packages the project needs, as "command-to-check:package".
HOST_TOOLS := git:git wasm-validate:wabt gcc:gcc mosquitto_passwd:mosquitto openssl:openssl promtool:prometheus \
	qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support update-ca-certificates:ca-certificates \
	nats-server:nats-server
# The SD-card image and its QEMU rig (make image, make image-test); files count as commands.
IMAGE_TOOLS := mmdebstrap:mmdebstrap arch-test:arch-test update-binfmts:binfmt-support qemu-aarch64-static:qemu-user-static \
	qemu-system-aarch64:qemu-system-arm qemu-img:qemu-utils /usr/lib/u-boot/qemu_arm64/u-boot.bin:u-boot-qemu \
	mkfs.vfat:dosfstools mcopy:mtools sfdisk:fdisk mkfs.ext4:e2fsprogs bmaptool:bmap-tools xz:xz-utils \
	dtc:device-tree-compiler fdtoverlay:device-tree-compiler mkenvimage:u-boot-tools
# Building the image needs root (mmdebstrap --mode=root, chroot, file ownership).
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: fleet-demo run test bench modules host-deps binfmt venv clean train-models image image-raw image-test image-powercut image-deps lock cleanroom soak soak-long fuzz-config fuzz-modules

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

# aarch64 programs run here through qemu-user (the native-twin parity tests, the image's chroot):
# binfmt_misc is not always mounted, and the registration is the kernel's, so this needs root.
binfmt: host-deps
	@if [ "$$(uname -m)" != aarch64 ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then \
	  echo "enabling binfmt_misc for qemu-aarch64"; \
	  $(AS_ROOT) sh -c '[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
	    update-binfmts --enable qemu-aarch64'; \
	fi

# The workstation's venv: the appliance and its tools (tools/, a second distribution the gateway
# never installs), both editable. It holds exactly the lock (requirements/, `make lock`; requirements/install.py): every
# file checked against its sha256, nothing resolved here. A changed lock rebuilds the venv from
# nothing, so no package of an older lock lingers. Where pip.conf names a mirror, the hashes
# still decide.
LOCK := requirements/dev.txt
PIP_LOCKED = -m pip install -q --disable-pip-version-check --require-hashes --no-deps
$(STAMP): pyproject.toml tools/pyproject.toml requirements/build.txt $(LOCK) requirements/install.py \
          requirements/pywasm3_fix.py
	$(MAKE) host-deps
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	python3 requirements/install.py $(VENV) $(LOCK)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . -e tools
	touch $@

# The previous OpenCV major beside the venv (not in it): tests run the camera worker under both.
OPENCV4 := $(VENV)/opencv4
$(OPENCV4)/.installed: requirements/opencv4.txt $(STAMP)
	rm -rf $(OPENCV4)
	$(PY) $(PIP_LOCKED) --target $(OPENCV4) -r requirements/opencv4.txt
	touch $@

venv: $(STAMP)

# The trained models (modules/models) compiled to modules for configs/nn-*.yaml, again only when
# a model or the compiler changed.
NN_BUILT := modules/build/.nn-models
$(NN_BUILT): $(wildcard modules/models/*/*.onnx modules/models/*/report.json tools/appliance_tools/nn/*.py) \
             modules/sdk/ap_nn.h tools/appliance_tools/evaluation/nn.py $(STAMP)
	$(PY) -m appliance_tools.evaluation.nn build
	touch $@

modules: host-deps $(STAMP)
	$(PY) -m appliance module build
	$(MAKE) $(NN_BUILT)

run: modules
	$(VENV)/bin/appliance run --config $(CONFIG)

test: modules $(OPENCV4)/.installed binfmt
	$(PY) -m pytest -q tests

# The default config accelerated, every process's memory watched (benchmarks/soak.py): fails on
# growth above 1 % after warm-up or on any restart. CI runs 10 minutes; the long one is 2 hours.
SOAK_MINUTES ?= 10
soak: modules
	$(PY) benchmarks/soak.py --minutes $(SOAK_MINUTES)

soak-long: modules
	$(PY) benchmarks/soak.py --minutes 120

# Mutated copies of the shipped configs through `appliance validate`'s code path: every one loads or
# is refused with file:line, never a traceback (benchmarks/fuzz_config.py; about 25 minutes).
FUZZ_COUNT ?= 10000
fuzz-config: modules
	$(PY) benchmarks/fuzz_config.py --count $(FUZZ_COUNT)

# Mutated modules through the real worker path (zygote, sandbox, wasm3): the supervisor survives
# every one and no worker runs outside its sandbox.
fuzz-modules: modules
	$(PY) benchmarks/fuzz_modules.py --count $(FUZZ_COUNT)

# 20 gateway processes on a 3-node NATS cluster: a staged rollout with a broker node killed after
# the canary, then a bad canary halted (docs/fleet.md).
fleet-demo: modules host-deps
	$(PY) -m appliance_tools.fleet.demo --gateways $(or $(GATEWAYS),20) --kill-node

bench: modules
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_bearing.py
	$(PY) benchmarks/bench_motion.py
	$(PY) benchmarks/bench_nn.py

image-deps:
	$(call apt_ensure,$(IMAGE_TOOLS),)

# The flashable card: build/image/*.img, .img.xz, .bmap, SHA256SUMS (image/build.py).
image: modules image-deps binfmt
	$(AS_ROOT) $(PY) image/build.py $(if $(RECORD_MANIFEST),--record-manifest)

image-raw: modules image-deps binfmt
	$(AS_ROOT) $(PY) image/build.py --raw-only $(if $(RECORD_MANIFEST),--record-manifest)

# Boot the image under QEMU and check the appliance in it from the host (image/qemu_test.py).
image-test: image-raw
	$(PY) image/qemu_test.py

# Pull the plug N times with events piling up in the spool; nothing committed may be lost
# (image/powercut.py). DURABILITY=off proves the drill can fail: it must then see losses.
N ?= 3
DURABILITY ?= full
image-powercut: image-raw
	$(PY) image/powercut.py --pulls $(N) --durability $(DURABILITY) $(if $(filter off,$(DURABILITY)),--expect-loss)

# The training stack for modules/models (torch, CPU only) in its own venv: `make test` never needs it.
TRAIN_VENV ?= .venv-train
TRAIN_STAMP := $(TRAIN_VENV)/.installed

$(TRAIN_STAMP): requirements/build.txt requirements/train.txt
	$(MAKE) host-deps
	rm -rf $(TRAIN_VENV)
	python3 -m venv $(TRAIN_VENV)
	python3 requirements/install.py $(TRAIN_VENV) requirements/train.txt
	touch $@

# Retrains both models from the recordings in ../shared/data and rewrites modules/models/*/ (a few minutes).
train-models: $(TRAIN_STAMP)
	$(TRAIN_VENV)/bin/python modules/models/train_bearing.py
	$(TRAIN_VENV)/bin/python modules/models/train_people.py

# `make test` on a fresh Debian 12 root (mmdebstrap, cached) from a clone of HEAD: what a new
# machine does. Needs root; .ci/cleanroom.py.
cleanroom: image-deps
	$(AS_ROOT) python3 .ci/cleanroom.py

# Re-resolve every lock in requirements/ (uv, both machines, hashes): `make lock` keeps what the
# ranges still allow, `make lock UPGRADE=1` takes the newest. Commit the result on its own, after
# `make test` passes with it (README, "Moving a dependency").
TOOLS_VENV := .venv-tools
$(TOOLS_VENV)/.installed: requirements/build.txt requirements/tools.txt
	rm -rf $(TOOLS_VENV)
	python3 -m venv $(TOOLS_VENV)
	python3 requirements/install.py $(TOOLS_VENV) requirements/tools.txt
	touch $@

lock: $(TOOLS_VENV)/.installed
	$(TOOLS_VENV)/bin/python requirements/lock.py $(if $(UPGRADE),--upgrade)

clean:
	rm -rf modules/build var .pytest_cache build/image
