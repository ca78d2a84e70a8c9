#!/bin/bash
# mmdebstrap --setup-hook: runs before any package is installed. $1 = the root directory.
# The initramfs only needs what mounts the root: listing modules (instead of MODULES=most)
# makes mkinitramfs under emulation take seconds, not minutes.
set -euo pipefail
root=$1
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
echo "MODULES=list" > "$root/etc/initramfs-tools/conf.d/appliance"
cat > "$root/usr/share/initramfs-tools/modules.d/appliance" <<'LIST'
# QEMU virt: virtio disks and the SD card behind sdhci-pci
virtio_pci
virtio_mmio
virtio_blk
sdhci_pci
# Raspberry Pi 4 / CM4: EMMC2 (sdhci-iproc), which probes only once its supplies' regulator
# drivers are in (regulator-fixed, regulator-gpio); Pi 3: the SD host (bcm2835 sdhost)
sdhci_iproc
fixed
gpio_regulator
bcm2835
mmc_block
# file systems of the card
ext4
vfat
nls_cp437
nls_ascii
LIST
