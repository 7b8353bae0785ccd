#!/usr/bin/env bash
# Builds a Debian bookworm base image with HAProxy without any image
# registry: debootstrap (from Debian's mirror) into a directory, HAProxy
# installed in the chroot, then `docker import`. The images' Dockerfiles
# take it as ARG BASE; with registry access the public debian image works
# as well. Idempotent: an existing image is kept.
set -euo pipefail
IMAGE="${1:-haconnect/debian-haproxy:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
	echo "debian-base: $IMAGE already present"
	exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if ! command -v debootstrap >/dev/null; then
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
fi
ROOTFS="$(mktemp -d /tmp/haconnect-rootfs.XXXXXX)"
trap '$SUDO rm -rf "$ROOTFS"' EXIT
echo "debian-base: debootstrap bookworm into $ROOTFS"
$SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
# No service may start inside the chroot while packages install.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$ROOTFS/usr/sbin/policy-rc.d" >/dev/null
$SUDO chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
$SUDO chroot "$ROOTFS" /bin/sh -c 'apt-get install -y -qq --no-install-recommends haproxy ca-certificates >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }; apt-get clean; rm -f /tmp/apt.log'
$SUDO rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS/usr/sbin/policy-rc.d" "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/*
$SUDO tar -C "$ROOTFS" -c . | docker import - "$IMAGE" >/dev/null
echo "debian-base: $IMAGE built"
