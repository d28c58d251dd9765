#!/usr/bin/env bash
# Runs runv's tests: installs what they need (scripts/install.sh), checks
# formatting and lints, then runs every unit and integration test against
# the guest images built from this checkout. Ends with a summary line.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# rustup's cargo and the helpers installed under /usr/local, whatever PATH
# the caller had (CI runs with a bare environment).
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"
cd "$repo"

scripts/install.sh
export RUNV_KERNEL=${RUNV_KERNEL:-$(scripts/build-kernel.sh)}
export RUNV_INITRAMFS=${RUNV_INITRAMFS:-$(scripts/build-initramfs.sh)}
echo "test: kernel $RUNV_KERNEL, initramfs $RUNV_INITRAMFS" >&2

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace --no-fail-fast -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One line for CI: the sums of every test binary's result line. Tests that
# cannot run on this host print "SKIPPED: <reason>" and count as skipped.
skipped=$(grep -c '^SKIPPED: ' "$log" || true)
awk -v skipped="$skipped" '
    /^test result:/ { passed += $4; failed += $6 }
    END { printf "summary: %d passed, %d failed, %d skipped\n", passed - skipped, failed, skipped }
' "$log"
exit "$status"
