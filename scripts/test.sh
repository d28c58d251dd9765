#!/usr/bin/env bash
# Runs runv's tests: installs what they need (scripts/install.sh), checks
# formatting and lints, then runs every unit and integration test against
# the guest images built from this checkout (end-to-end tests on the qemu
# hypervisor), then the end-to-end suite on the builtin hypervisor and on
# qemu with KVM in the nested-KVM bed (scripts/e2e-nested.sh), then
# Kubernetes' CRI validation suite (scripts/critest.sh), then every fuzz
# target for 30 s (scripts/fuzz). Ends with a summary line.
#
#   scripts/test.sh          what CI runs
#   scripts/test.sh --full   every end-to-end test on builtin and on qemu
#                            with KVM too (docs/testing.md)
set -euo pipefail
full=
case ${1:-} in
--full) full=--full ;;
"") ;;
*)
    echo "test: unknown argument $1 (use --full or nothing)" >&2
    exit 2
    ;;
esac
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
# The builtin VMM needs a KVM that boots the guest; so does qemu's KVM path.
# In CI: builtin's set, and qemu with KVM through containerd, each within a
# budget that keeps CI under an hour even when L1 misbehaves (they take 15
# and 2 minutes); --full: everything, unbounded.
nested_builtin=(--timeout 600 --budget 2100)
# shellcheck disable=SC2054 # commas separate the test names of one argument
nested_qemu=(--timeout 300 --budget 900 containerd:runv_runs_busybox,runv_task_lifecycle,runv_faults_leave_nothing)
[[ -n $full ]] && nested_builtin=(--full) nested_qemu=(--full)
for run in "--hypervisor builtin ${nested_builtin[*]}" "--hypervisor qemu ${nested_qemu[*]}"; do
    # shellcheck disable=SC2086 # $run is a list of arguments
    scripts/e2e-nested.sh $run 2>&1 | tee -a "$log"
    nested_status=${PIPESTATUS[0]}
    ((status != 0)) || status=$nested_status
done
# Kubernetes' CRI validation suite on runv: a spec that fails and is not
# known to fail fails CI (scripts/critest.sh). About 7 minutes.
scripts/critest.sh 2>&1 | tee -a "$log"
critest_status=${PIPESTATUS[0]}
((status != 0)) || status=$critest_status
# Coverage-guided fuzzing of what the host parses from a guest and the
# agent from the host, each target 30 s from its corpus (docs/fuzzing.md).
scripts/fuzz --seconds 30 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
((status != 0)) || status=$fuzz_status
set -e

# One line for CI: the sums of every test binary's result line. Tests that
# cannot run on this host print "SKIPPED: <reason>" and count as skipped.
skipped=$(grep -c '^SKIPPED: ' "$log" || true)
awk -v skipped="$skipped" '
    /^test result:/ { passed += $4; failed += $6 }
    /^e2e-nested: .* died/ { failed++ }
    /^fuzz: [0-9]+ passed, [0-9]+ failed$/ { passed += $2; failed += $4 }
    END { printf "summary: %d passed, %d failed, %d skipped\n", passed - skipped, failed, skipped }
' "$log"
exit "$status"
