#!/usr/bin/env bash
# Runs Kubernetes' CRI validation suite (critest) on runv: the offline
# runner in RUNV_CRITEST_DIR (default: ../shared/critest beside this
# checkout; its README says what it needs) with a private containerd, the
# shim built from this checkout and the guest images RUNV_KERNEL and
# RUNV_INITRAMFS, on the hypervisor `runv-ctl pick-hypervisor` names for
# this host (builtin where KVM boots the guest, else qemu, with TCG
# allowed).
#
#   scripts/critest.sh [--hypervisor builtin|qemu]
#
# Prints "critest (runv, HV): N passed, N failed, N skipped", then every
# failed spec. Fails when a spec fails that known_failures below does not
# list, or fails there without its expected message; says when a listed
# spec passes (then take it off the list). Says it skipped, and succeeds,
# where the runner is absent or the caller is not root.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"
cd "$repo"

# The specs runv fails on purpose or for now: a regular expression on the
# spec's name, the reason, and a text its failure message must hold ("" for
# any). docs/kubernetes.md says what each lacks.
known_failures=(
    'should support HostNetwork is true|runv refuses pods in the node namespaces|runv cannot run this pod'
    'should support HostIpc is true|runv refuses pods in the node namespaces|runv cannot run this pod'
    'should support HostPID$|runv refuses pods in the node namespaces|runv cannot run this pod'
    'portforward in host network|runv refuses pods in the node namespaces|runv cannot run this pod'
    "mount with 'rshared'|a mount made in the VM cannot reach the host (the host reads the volume)|len(fileInfo) should not be zero"
)

hypervisor=
case ${1:-} in
--hypervisor) hypervisor=${2:?--hypervisor needs builtin or qemu} ;;
"") ;;
*)
    echo "critest: unknown argument $1 (see the head of $0)" >&2
    exit 2
    ;;
esac

runner=${RUNV_CRITEST_DIR:-$repo/../shared/critest}
if [[ ! -x $runner/run.sh ]]; then
    echo "critest (runv): skipped: no runner at $runner (set RUNV_CRITEST_DIR to a copy of it)"
    exit 0
fi
if (($(id -u) != 0)); then
    echo "critest (runv): skipped: its private containerd, bridge and iptables need root"
    exit 0
fi
: "${RUNV_KERNEL:?set RUNV_KERNEL (scripts/build-kernel.sh prints it)}"
: "${RUNV_INITRAMFS:?set RUNV_INITRAMFS (scripts/build-initramfs.sh prints it)}"

cargo build --locked --quiet -p runv-shim -p runv-ctl --bin containerd-shim-runv-v2 --bin runv-ctl
bin=$(realpath "${CARGO_TARGET_DIR:-target}/debug")
# A short path: containerd's socket lies under it (at most 100 bytes). In
# the nested-KVM bed TMPDIR is the scratch disk: overlayfs cannot sit on
# its root, which is an overlay itself.
work=$(mktemp -d "${TMPDIR:-/tmp}/runv-critest.XXXXXX")
trap 'rm -rf "$work"' EXIT
boot_files="[vm]
kernel = \"$RUNV_KERNEL\"
initramfs = \"$RUNV_INITRAMFS\"
"
if [[ -z $hypervisor ]]; then
    printf '%s' "$boot_files" >"$work/boot.toml"
    hypervisor=$("$bin/runv-ctl" --config "$work/boot.toml" pick-hypervisor 2>/dev/null)
fi
# Emulated guests are slow: generous agent deadlines, as in the tests.
cat >"$work/runv.toml" <<EOF
hypervisor = "$hypervisor"
run_dir = "$work/runv"
[qemu]
allow_tcg = true
$boot_files
agent_timeout_secs = 180
EOF

set +e
PATH="$bin:$PATH" RUNV_CONFIG=$work/runv.toml CRITEST_WORK=$work/critest \
    "$runner/run.sh" runv >"$work/run.log" 2>&1
rc=$?
set -e
specs=$work/critest/specs-runv.txt
if ((rc != 0)) || [[ ! -s $specs ]]; then
    tail -n 40 "$work/run.log"
    echo "critest (runv, $hypervisor): the runner failed (exit $rc); its log ends above"
    exit 1
fi

python3 - "$specs" "$hypervisor" "${known_failures[@]}" <<'EOF'
import re, sys

specs, hypervisor, known = sys.argv[1], sys.argv[2], [k.split("|") for k in sys.argv[3:]]
counts = {"passed": 0, "failed": 0, "skipped": 0}
failed, passed = [], []
for line in open(specs):
    state, _, rest = line.rstrip("\n").partition(" ")
    name, _, message = rest.strip().partition("  -- ")
    state = {"PASSED": "passed", "SKIPPED": "skipped"}.get(state, "failed")
    counts[state] += 1
    {"failed": failed, "passed": passed}.get(state, []).append((name, message))

lines, new = [], 0
for name, message in failed:
    match = next((k for k in known if re.search(k[0], name)), None)
    if match is None:
        verdict, new = "NEW FAILURE", new + 1
    elif match[2] and match[2] not in message:
        verdict, new = f"FAILED WITHOUT '{match[2]}'", new + 1
    else:
        verdict = f"known: {match[1]}"
    lines.append(f"  {verdict}: {name}\n    {message[:400]}")
for name, _ in passed:
    if any(re.search(k[0], name) for k in known):
        lines.append(f"  now passes, take it off known_failures: {name}")
print(f"critest (runv, {hypervisor}): {counts['passed']} passed, {counts['failed']} failed "
      f"({counts['failed'] - new} known), {counts['skipped']} skipped")
print("\n".join(lines))
sys.exit(1 if new else 0)
EOF
