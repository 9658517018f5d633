#!/usr/bin/env bash
# System packages egolcd's extras need (Debian/Ubuntu):
#   memory-maze: MuJoCo through dm_control with MUJOCO_GL=osmesa (CPU, libosmesa6) or MUJOCO_GL=egl (GPU).
#   tabletop:    pybullet's CPU TinyRenderer needs no GL; libgl1 covers PyOpenGL's import.
#   chromium:    the browser the studio's end-to-end test drives through Playwright (at /usr/bin/chromium;
#                Playwright's own browser download cannot work offline).
# Idempotent: installs only what is missing. Needs root (or sudo) and Debian/Ubuntu apt.
set -euo pipefail

PACKAGES=(libosmesa6 libegl1 libgl1 chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "system deps: all present (${PACKAGES[*]})"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "system deps: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

echo "system deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
