#!/usr/bin/env bash
# One command for a fresh node: installs everything (scripts/install.sh),
# then boots a pod VM and prints the guest's details and boot timeline.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh"
prefix=${RUNV_PREFIX:-/usr/local}
"$prefix/bin/runv-ctl" check
"$prefix/bin/runv-ctl" boot
