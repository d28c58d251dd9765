#!/usr/bin/env bash
# Runs runv's end-to-end tests (tests/, the runv-tests package) on a
# hypervisor that needs a KVM able to boot the guest: the builtin VMM, or
# the qemu backend with KVM. They run in the nested-KVM bed
# (scripts/nested-kvm.sh): on the host where its /dev/kvm can, else in L1.
#
#   scripts/e2e-nested.sh [--hypervisor builtin|qemu] [--threads N] [--full]
#                         [--timeout S] [--budget S] [TEST[:FILTER,...]]...
#
# TEST names a test binary of tests/Cargo.toml (`containerd`), FILTERs the
# tests of it to run (`cri:pod_runs_in_one_vm,block_volume`); with no TEST,
# the CI set below runs, and `--full` runs every test of every binary.
# --timeout bounds each L1 (default 900 s, 3600 s with --full): a test that
# hangs in L1 fails instead of holding the run. --budget bounds the whole
# run: no L1 starts once it is spent, and what was left counts as failed.
# Prints each binary's output and ends with `nested (HYPERVISOR): N passed,
# N failed, N skipped`. Needs RUNV_KERNEL and RUNV_INITRAMFS (scripts/test.sh
# sets them) or the installed guest images.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"
cd "$repo"

# What CI runs in L1, about 15 minutes: every builtin device (vsock, block
# with hot-plug, net, fs, pmem, SMP), the pod lifecycle through containerd
# and CRI, and the attack on the shared root image. Everything is emulated there, so the slowest tests (100 MiB through
# stdout, an OOM kill, raw block devices, namespaces) are left to --full.
ci_set=(
    builtin_boot vm_boot agent_containers block_devices
    containerd:runv_runs_busybox,runv_task_lifecycle,runv_log_uris,runv_faults_leave_nothing,runv_guest_panic_ends_its_tasks
    cri:pod_runs_in_one_vm,block_volume_hot_plugs,pod_vm_is_sized
    storage:block_and_bind_volumes
    shared_fs:agent_mounts_the_share,files_travel_both_ways
    network:pods_reach_the_host_and_each_other
    root_image
)
# Every test binary of tests/, all of its tests.
full_set=(
    builtin_boot vm_boot agent_containers block_devices containerd cri storage shared_fs network
    host_mounts host_cgroup vsock_isolation exec_security host_confinement chaos concurrency soak
    root_image
)

hypervisor=builtin threads=2 tests=() timeout= budget=
while (($#)); do
    case $1 in
    --hypervisor) hypervisor=$2 && shift 2 ;;
    --threads) threads=$2 && shift 2 ;;
    --full) tests=("${full_set[@]}") && timeout=${timeout:-3600} && shift ;;
    --timeout) timeout=$2 && shift 2 ;;
    --budget) budget=$2 && shift 2 ;;
    -*)
        echo "e2e-nested: unknown option $1 (see the head of $0)" >&2
        exit 2
        ;;
    *) tests+=("$1") && shift ;;
    esac
done
((${#tests[@]})) || tests=("${ci_set[@]}")
timeout=${timeout:-900}
deadline=$((SECONDS + ${budget:-1000000}))

# Everything is built here: L1 has the host's files but no build to spare
# (a build under TCG takes many times as long).
cargo build --locked --quiet -p runv-shim --bin containerd-shim-runv-v2
binaries=$(cargo test --locked --quiet -p runv-tests --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and "test" in message["target"]["kind"]:
        print(message["target"]["name"], message["executable"])
')

# Under target/, beside the binaries it runs.
mkdir -p target/e2e-nested
job=$(mktemp -d "$repo/target/e2e-nested/run.XXXXXX")
trap 'rm -rf "$job"' EXIT
log=$job/log
: >"$log"

# Each test binary in an L1 of its own, and again in a fresh one (three
# times at most) when it fails there. L1 is an emulated machine with faults of its
# own: under load its kernel has crashed inside KVM, and guests have reset
# themselves (docs/testing.md). A failure that is runv's fails every time;
# a failed run's lines are printed marked, so that no summary counts them.
for test in "${tests[@]}"; do
    name=${test%%:*} filters=()
    [[ $test == *:* ]] && IFS=, read -r -a filters <<<"${test#*:}"
    rc=0
    exe=$(awk -v name="$name" '$1 == name { print $2 }' <<<"$binaries")
    [[ -n $exe ]] || {
        echo "e2e-nested: no test binary $name in tests/Cargo.toml" >&2
        exit 2
    }
    for attempt in 1 2 3 4; do
        left=$((deadline - SECONDS))
        if ((left < 60)); then
            echo "e2e-nested: $name died (exit 124): the run's --budget is spent" | tee -a "$log"
            break
        fi
        echo "=== $name on $hypervisor (L1 attempt $attempt)" | tee -a "$log"
        set +e
        RUNV_TEST_HYPERVISOR=$hypervisor RUNV_TEST_SHIM_DIR=$repo/target/debug \
            scripts/nested-kvm.sh run ${RUNV_L1_CPUS:+--cpus "$RUNV_L1_CPUS"} \
            --timeout $((left < timeout ? left : timeout)) -- \
            "$exe" --test-threads="$threads" --nocapture "${filters[@]}" >"$job/binary.log" 2>&1
        rc=$?
        set -e
        if ((rc == 0 || attempt == 4)); then
            tee -a "$log" <"$job/binary.log"
            break
        fi
        sed "s/^/(attempt $attempt) /" "$job/binary.log"
        # 101: a test failed; 124, 125: L1 timed out or failed.
        echo "e2e-nested: $name failed in L1 (exit $rc), these tests: " \
            "$(grep -E '^test .* FAILED$' "$job/binary.log" | awk '{ printf "%s ", $2 }')"
        echo "e2e-nested: running $name again in a fresh L1"
    done
    # 101: a test failed (it says which); anything else: the binary itself
    # died, or L1, which counts as one more failure.
    ((left < 60 || rc == 0 || rc == 101)) || echo "e2e-nested: $name died (exit $rc)" | tee -a "$log"
done

skipped=$(grep -c '^SKIPPED: ' "$log" || true)
awk -v skipped="$skipped" -v hv="$hypervisor" '
    /^test result:/ { passed += $4; failed += $6 }
    /^e2e-nested: .* died/ { failed++ }
    END { printf "nested (%s): %d passed, %d failed, %d skipped\n", hv, passed - skipped, failed, skipped }
' "$log"
! grep -q -E '^(test result: FAILED|e2e-nested: .* died)' "$log"
