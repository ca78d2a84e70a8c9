#!/bin/bash
# mmdebstrap --customize-hook for the cached base: $1 = the root directory, $2 = a wheelhouse the
# host downloaded (aarch64 wheels, build.txt and requirements.txt pinned with hashes from the
# lock, pywasm3's source mended): the host's network and certificates fetch, the chroot installs
# offline.
# Builds what Debian's arm64 kernel and PyPI lack (the i2c-stub module, pywasm3 has no wheel),
# installs the appliance's third-party Python packages into a venv, then purges the build tools.
set -euo pipefail
root=$1
wheelhouse=$2
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

kver=$(basename "$(ls -d "$root"/lib/modules/*-arm64 | head -n1)")
echo "== i2c-stub for $kver (CONFIG_I2C_STUB is off in Debian's arm64 kernel)"
src=$(mktemp -d)
tar -xJf "$root"/usr/src/linux-source-6.1.tar.xz -C "$src" --wildcards '*/drivers/i2c/i2c-stub.c'
mkdir -p "$root/tmp/i2c-stub"
cp "$src"/*/drivers/i2c/i2c-stub.c "$root/tmp/i2c-stub/"
rm -rf "$src"
echo 'obj-m := i2c-stub.o' > "$root/tmp/i2c-stub/Makefile"
in_root make -s -C "/lib/modules/$kver/build" M=/tmp/i2c-stub modules
install -D -m 0644 "$root/tmp/i2c-stub/i2c-stub.ko" "$root/lib/modules/$kver/updates/i2c-stub.ko"
in_root depmod "$kver"
rm -rf "$root/tmp/i2c-stub"

echo "== Python venv /opt/appliance/venv"
in_root python3 -m venv /opt/appliance/venv
cp -r "$wheelhouse" "$root/tmp/wheelhouse"
# Exactly the lock (requirements/build.txt, gateway.txt), every file checked against its sha256;
# the build tools first, so pywasm3's sdist builds with the locked setuptools.
pip_locked() {
    in_root /opt/appliance/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-index \
        --find-links /tmp/wheelhouse --require-hashes --no-deps "$@"
}
pip_locked -r /tmp/wheelhouse/build.txt
pip_locked --no-build-isolation -r /tmp/wheelhouse/requirements.txt
# pywasm3: the locked sdist, checked and mended on the host (requirements/pywasm3_fix.py)
in_root /opt/appliance/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-index \
    --no-deps --no-build-isolation /tmp/wheelhouse/pywasm3
in_root /opt/appliance/venv/bin/pip check
rm -rf "$root/tmp/wheelhouse"
in_root /opt/appliance/venv/bin/python -c 'import wasm3, numpy, cv2, pydantic, smbus2, serial; print("venv ok: numpy", numpy.__version__, "opencv", cv2.__version__)'

echo "== purge build tools"
in_root apt-get purge -y -qq gcc make libc6-dev python3-dev linux-headers-arm64 linux-source-6.1 >/dev/null
in_root apt-get autoremove -y -qq --purge >/dev/null
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/src/* "$root"/root/.cache
