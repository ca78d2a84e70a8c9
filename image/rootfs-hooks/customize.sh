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

echo "== Raspberry Pi boot files (raspi-firmware, u-boot-rpi): unpacked, not installed"
# Installed, raspi-firmware's kernel hooks would write to /boot/firmware at every kernel change;
# the image build puts these files on the FAT partition itself (image/build.py pi_boot_files).
pi=/usr/lib/appliance/pi-boot
mkdir -p "$root$pi" "$root/tmp/pi-debs"
# Fetched by the host's apt with the chroot's sources and architecture (the chroot has no DNS).
(cd "$root/tmp/pi-debs" && APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get download -qq raspi-firmware u-boot-rpi)
: > "$root$pi/VERSIONS"
for deb in "$root"/tmp/pi-debs/*.deb; do
    dpkg-deb -x "$deb" "$root$pi/unpacked"
    echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >> "$root$pi/VERSIONS"
done
install -m 0644 "$root$pi"/unpacked/usr/lib/raspi-firmware/{bootcode.bin,start.elf,fixup.dat,start4.elf,fixup4.dat} "$root$pi/"
install -m 0644 "$root$pi/unpacked/usr/lib/u-boot/rpi_arm64/u-boot.bin" "$root$pi/u-boot-rpi_arm64.bin"
for pkg in raspi-firmware u-boot-rpi; do   # their licences travel with them
    install -m 0644 "$root$pi/unpacked/usr/share/doc/$pkg/copyright" "$root$pi/$pkg.copyright"
done
rm -rf "$root$pi/unpacked" "$root/tmp/pi-debs"
cat "$root$pi/VERSIONS"

echo "== purge build tools"
# By name: the versioned kernel headers (installed for i2c-stub) would keep gcc-12 and binutils.
in_root sh -c 'apt-get purge -y -qq gcc make libc6-dev python3-dev linux-source-6.1 gcc-12 cpp-12 binutils \
    $(dpkg-query -W -f "\${Package}\n" "linux-headers-*" "linux-kbuild-*" 2>/dev/null) >/dev/null'
in_root apt-get autoremove -y -qq --purge >/dev/null
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/src/* "$root"/root/.cache

echo "== kernel modules the gateway never loads"
# Drivers for hardware no Pi or QEMU gateway has (GPUs, InfiniBand, SCSI HBAs, DVB, sound, most
# network cards) and file systems it never mounts. Kept: everything a Pi 3/4/CM4 and QEMU boot,
# USB serial/gadget/UVC, V4L2 (vivid), IIO, I2C, CAN, Broadcom Ethernet and Wi-Fi, ext4/vfat.
mods="$root/lib/modules/$kver/kernel"
before=$(du -sm "$root/lib/modules/$kver" | cut -f1)
for d in sound drivers/gpu drivers/infiniband drivers/isdn drivers/staging drivers/target drivers/md \
         drivers/ata drivers/firewire drivers/bluetooth drivers/nfc drivers/atm drivers/xen \
         drivers/media/dvb-frontends drivers/media/dvb-core drivers/media/pci drivers/media/tuners \
         drivers/media/firewire drivers/media/radio drivers/media/mmc drivers/media/spi \
         drivers/input/touchscreen drivers/input/joystick drivers/input/tablet \
         net/bluetooth net/ceph net/rds net/tipc net/sunrpc net/nfc net/9p net/batman-adv net/ieee802154 \
         fs/xfs fs/btrfs fs/smb fs/ocfs2 fs/f2fs fs/nfs fs/nfsd fs/nfs_common fs/lockd fs/ceph fs/gfs2 \
         fs/jfs fs/reiserfs fs/nilfs2 fs/ubifs fs/orangefs fs/afs fs/coda fs/dlm fs/ntfs3 fs/erofs \
         fs/hfs fs/hfsplus fs/9p fs/cachefiles fs/netfs fs/fscache fs/gfs2 fs/omfs fs/ufs fs/minix; do
    rm -rf "${mods:?}/$d"
done
find "$mods/drivers/scsi" -mindepth 1 -type d -prune -exec rm -rf {} +       # HBAs; scsi_mod, sd_mod stay
find "$mods/drivers/net/wireless" -mindepth 1 -maxdepth 1 ! -name broadcom -exec rm -rf {} +
find "$mods/drivers/net/ethernet" -mindepth 1 -maxdepth 1 ! -name broadcom -exec rm -rf {} +
rm -f "$mods"/lib/test_*.ko
in_root depmod "$kver"
# What the gateway and the rig load must still resolve, with every module it depends on.
for m in vivid i2c_stub uvcvideo i2c_dev i2c_bcm2835 sdhci_iproc bcm2835 fixed gpio_regulator virtio_blk \
         virtio_net ext4 vfat nls_cp437 nls_ascii genet smsc95xx lan78xx brcmfmac cdc_acm usb_f_acm \
         ftdi_sio cp210x pl2303 ch341 can_raw vcan gpio_keys bcm2835_wdt; do
    in_root modprobe -S "$kver" --show-depends "$m" >/dev/null \
        || { echo "kernel module $m (or a module it needs) was pruned" >&2; exit 1; }
done
echo "kernel modules: ${before} MiB -> $(du -sm "$root/lib/modules/$kver" | cut -f1) MiB"
