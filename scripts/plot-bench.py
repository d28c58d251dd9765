#!/usr/bin/env python3
"""Collects runv's benchmark results and draws them.

usage: scripts/plot-bench.py [BENCH_DIR [PNG]]

Reads BENCH_DIR (default target/bench): the JSON the benches write
(runtime_compare.json, storage_io.json, network_io.json) and the logs
scripts/bench keeps of the benches that only print (pod_boot.log,
vmm.log), which it parses. Writes BENCH_DIR/results.json (everything,
labelled), BENCH_DIR/summary.md (the table of docs/benchmarks.md) and
PNG (default docs/bench/results.png), if matplotlib is there.
"""

import json
import os
import re
import sys
from datetime import datetime, timezone

GOALS = {
    "pod_start_ms": 100,
    "overhead_mib": 10,
    "cpu_ratio": 0.98,
    "pods_24_gib": 1000,
}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def parse_pod_boot(text):
    """pod_boot's printed milestones: {hypervisor: {accel, milestones}}."""
    if text is None:
        return None
    result = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^(\w+): not measured: (.*)$", line)
        if m:
            result[m.group(1)] = {"measured": False, "reason": m.group(2)}
            current = None
            continue
        m = re.match(r"^(\w+) with (.+):$", line)
        if m:
            current = {"measured": True, "accel": m.group(2), "milestones": {}}
            result[m.group(1)] = current
            continue
        m = re.match(r"^\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m and current is not None:
            current["milestones"][m.group(1)] = {
                "median_ms": float(m.group(2)),
                "min_ms": float(m.group(3)),
                "max_ms": float(m.group(4)),
            }
        m = re.match(r"^pod VM boot, (\d+) runs each, (.*)$", line)
        if m:
            result["runs"] = int(m.group(1))
            result["vm"] = m.group(2)
    return result or None


def parse_vmm(text):
    """runv-vmm's printed figures."""
    if text is None:
        return None
    result = {}
    for line in text.splitlines():
        m = re.match(r"^runv-vmm benchmarks on (.+?): (.*)$", line)
        if m:
            result["kvm"] = m.group(1)
            result["vm"] = m.group(2)
        m = re.match(r"^SKIPPED: (.*)$", line)
        if m:
            result["skipped"] = m.group(1)
        m = re.match(
            r"^VM start to the guest's first output: median ([\d.]+) ms, p95 ([\d.]+) ms", line
        )
        if m:
            result["start_median_ms"] = float(m.group(1))
            result["start_p95_ms"] = float(m.group(2))
        m = re.match(
            r"^VMM memory per idle VM with\s+(\d+) VMs: ([\d.]+) KiB heap in use, ([\d.]+) KiB "
            r"anonymous RSS growth; ([\d.]+) KiB of guest RAM touched",
            line,
        )
        if m:
            result.setdefault("memory", []).append(
                {
                    "vms": int(m.group(1)),
                    "heap_kib": float(m.group(2)),
                    "anon_rss_kib": float(m.group(3)),
                    "guest_touched_kib": float(m.group(4)),
                }
            )
    return result or None


def collect(bench_dir):
    results = {
        "collected": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "benches": {},
    }
    for name in ("runtime_compare", "storage_io", "network_io"):
        data = load_json(os.path.join(bench_dir, name + ".json"))
        if data is not None:
            results["benches"][name] = data
    pod_boot = parse_pod_boot(read(os.path.join(bench_dir, "pod_boot.log")))
    if pod_boot:
        results["benches"]["pod_boot"] = pod_boot
    vmm = parse_vmm(read(os.path.join(bench_dir, "vmm.log")))
    if vmm:
        results["benches"]["vmm"] = vmm
    status = read(os.path.join(bench_dir, "status.txt"))
    if status:
        results["runs"] = [line for line in status.splitlines() if line.strip()]
    return results


def fmt(value, unit="", digits=1):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def summary_table(results):
    b = results["benches"]
    rc = b.get("runtime_compare")
    rows = []
    label = "-"
    if rc:
        label = f"{rc['hypervisor']} with {rc['accel']}"
        start = rc["start_latency"]
        rows.append(
            (
                "`ctr run --rm busybox true`, median / p95",
                f"{fmt(start['runv']['median_ms'], ' ms', 0)} / "
                f"{fmt(start['runv']['p95_ms'], ' ms', 0)}",
                f"{fmt(start['runc']['median_ms'], ' ms', 0)} / "
                f"{fmt(start['runc']['p95_ms'], ' ms', 0)}",
                "",
            )
        )
        pod = rc["pod_start"]
        runv_first = pod["runv"]["first_pod"] or {}
        runc_first = pod["runc"]["first_pod"] or {}
        runv_total = runv_first.get("total_ms")
        rows.append(
            (
                "CRI pod start, RunPodSandbox to the app started (first pod)",
                f"{fmt(runv_total, ' ms', 0)} (sandbox {fmt(runv_first.get('run_pod_sandbox_ms'), '', 0)}"
                f" + create {fmt(runv_first.get('create_container_ms'), '', 0)}"
                f" + start {fmt(runv_first.get('start_container_ms'), '', 0)})",
                f"{fmt(runc_first.get('total_ms'), ' ms', 0)}",
                f"< {GOALS['pod_start_ms']} ms median: "
                + ("met" if runv_total is not None and runv_total < GOALS["pod_start_ms"] else "not met"),
            )
        )
        mem_runv = rc["memory"]["runv"]
        mem_runc = rc["memory"]["runc"]
        for runv, runc in zip(mem_runv, mem_runc):
            rows.append(
                (
                    f"host memory (PSS) per idle pod, {runv['pods']} pod(s)",
                    f"{fmt(runv['per_pod_mib'], ' MiB')}"
                    + (
                        f" (guest RAM {fmt(runv.get('guest_ram_per_pod_mib'), '')}, TCG code "
                        f"{fmt(runv.get('tcg_code_per_pod_mib'), '')}, the rest "
                        f"{fmt(runv['per_pod_mib'] - runv['guest_ram_per_pod_mib'] - (runv.get('tcg_code_per_pod_mib') or 0), '')})"
                        if runv.get("guest_ram_per_pod_mib") is not None
                        else ""
                    ),
                    f"{fmt(runc['shim_per_pod_mib'], ' MiB')} shim, "
                    f"{fmt(runc['per_pod_mib'], ' MiB')} with its containers",
                    f"< {GOALS['overhead_mib']} MiB: "
                    + ("met" if runv["per_pod_mib"] < GOALS["overhead_mib"] else "not met"),
                )
            )
        dens = rc["density"]
        if "fit_24_gib" in dens:
            rows.append(
                (
                    "idle runv pods in 24 GiB (ESTIMATE from the PSS above)",
                    f"{dens['fit_24_gib']} (if guests stay idle); "
                    f"{dens['fit_here_all_guest_ram_touched']} here if each guest touched "
                    f"all its RAM",
                    "",
                    f">= {GOALS['pods_24_gib']}: "
                    + ("met (estimate)" if dens["fit_24_gib"] >= GOALS["pods_24_gib"] else "not met (estimate)"),
                )
            )
            series = pod["runv"]["series_ms"]
            if series:
                rows.append(
                    (
                        f"pod creation time, pod 1 to pod {len(series)}",
                        f"{fmt(series[0], ' ms', 0)} to {fmt(series[-1], ' ms', 0)}",
                        f"{fmt(pod['runc']['series_ms'][0], ' ms', 0)} to "
                        f"{fmt(pod['runc']['series_ms'][-1], ' ms', 0)}"
                        if pod["runc"]["series_ms"]
                        else "-",
                        "",
                    )
                )
        cpu = rc["cpu"]
        ratio = cpu.get("ratio_runc_over_runv_time")
        if ratio is None:
            # RUNV_BENCH_CPU_RUNS=0: the job was skipped, with the reason.
            rows.append(("CPU-bound job", f"not run: {cpu.get('skipped', 'no figure')}", "-", ""))
        else:
            rows.append(
                (
                    f"CPU-bound ({cpu['job']}), time in the container",
                    f"{fmt(cpu['runv_s'], ' s', 2)} = {ratio * 100:.1f} % of runc's throughput",
                    f"{fmt(cpu['runc_s'], ' s', 2)}",
                    f">= {GOALS['cpu_ratio'] * 100:.0f} %: " + ("met" if ratio >= GOALS["cpu_ratio"] else "not met"),
                )
            )
    pb = b.get("pod_boot")
    if pb:
        for kind in ("qemu", "builtin"):
            entry = pb.get(kind)
            if not entry:
                continue
            if not entry.get("measured"):
                rows.append((f"pod VM boot to agent answering, {kind}", "not measured", "", entry["reason"]))
                continue
            ms = entry["milestones"]
            boot = ms.get("boot to agent answering", {}).get("median_ms")
            rows.append(
                (
                    f"pod VM boot to agent answering, {kind} with {entry['accel'].split(' (')[0]} (pod_boot)",
                    f"{fmt(boot, ' ms', 0)} (spawn {fmt(ms.get('hypervisor spawn', {}).get('median_ms'), '', 0)}"
                    f", kernel to init {fmt(ms.get('kernel start to init', {}).get('median_ms'), '', 0)}"
                    f", init to agent {fmt(ms.get('init to agent ready', {}).get('median_ms'), '', 0)})",
                    "",
                    "part of < 100 ms",
                )
            )
    vmm = b.get("vmm")
    if vmm and "start_median_ms" in vmm:
        rows.append(
            (
                "builtin VMM start to first guest output (runv-vmm, own payload)",
                f"{fmt(vmm['start_median_ms'], ' ms')} / p95 {fmt(vmm['start_p95_ms'], ' ms')}",
                "",
                "",
            )
        )
    st = b.get("storage_io")
    if st:
        parts = ", ".join(f"{r['job']} {r['target']} {r['ratio']:.2f}" for r in st["results"][:4])
        rows.append((f"fio guest/host ({st['hypervisor']} with {st['accel']}), virtio-blk", parts, "", ">= 0.9"))
    net = b.get("network_io")
    if net:
        parts = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in net.get("medians", {}).items())
        rows.append((f"iperf3/ping runv/runc ({net['hypervisor']} with {net['accel']})", parts, "", ""))
    lines = [
        "| figure | runv | runc | goal (KVM host, VT-x) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    head = ""
    if rc:
        head = (
            f"Measured {rc['date']} on {rc['machine']['summary']}; runv on {label}, "
            f"{rc['vcpus']} vCPUs, {rc['memory_mib']} MiB a pod.\n\n"
        )
    return head + "\n".join(lines) + "\n"


def plot(results, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot-bench: matplotlib not installed (apt-get install python3-matplotlib): no PNG")
        return False
    b = results["benches"]
    rc = b.get("runtime_compare")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    colors = {"runc": "#4c72b0", "runv": "#dd8452"}
    title = "runv benchmarks"
    if rc:
        title = (
            f"runv ({rc['hypervisor']} with {rc['accel']}) vs runc, {rc['date']}\n"
            f"{rc['machine']['summary']}"
        )
    fig.suptitle(title, fontsize=11)

    def note(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])

    # 1. start latency.
    ax = axes[0][0]
    if rc:
        start = rc["start_latency"]
        names = ["runc", "runv"]
        med = [start[n]["median_ms"] for n in names]
        p95 = [start[n]["p95_ms"] for n in names]
        ax.bar(names, med, color=[colors[n] for n in names], label="median")
        ax.scatter(names, p95, color="black", marker="_", s=400, zorder=3, label="p95")
        for i, v in enumerate(med):
            ax.annotate(f"{v:.0f} ms", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=10)
        ax.set_ylabel("ms (log)")
        ax.set_title(f"ctr run --rm busybox true ({start['runv']['runs']} runs each)", fontsize=10)
        ax.legend(fontsize=8)
    else:
        note(ax, "runtime_compare not run")

    # 2. CRI pod start breakdown.
    ax = axes[0][1]
    if rc:
        pod = rc["pod_start"]
        parts = [
            ("RunPodSandbox", "run_pod_sandbox_ms", "#55a868"),
            ("CreateContainer", "create_container_ms", "#8172b2"),
            ("StartContainer", "start_container_ms", "#c44e52"),
        ]
        names = ["runc", "runv"]
        bottoms = [0.0, 0.0]
        for label, key, color in parts:
            values = [(pod[n]["first_pod"] or {}).get(key) or 0.0 for n in names]
            ax.bar(names, values, bottom=bottoms, color=color, label=label)
            bottoms = [a + v for a, v in zip(bottoms, values)]
        pb = b.get("pod_boot", {}).get("qemu")
        if pb and pb.get("measured"):
            ms = pb["milestones"]
            seg = [
                ("hypervisor spawn", "#937860"),
                ("kernel start to init", "#da8bc3"),
                ("init to agent ready", "#8c8c8c"),
            ]
            bottom = 0.0
            for i, (name, color) in enumerate(seg):
                v = ms.get(name, {}).get("median_ms", 0.0)
                ax.bar(["qemu VM boot\n(pod_boot)"], [v], bottom=[bottom], color=color, label=name)
                bottom += v
            rest = ms.get("boot to agent answering", {}).get("median_ms", bottom) - bottom
            ax.bar(["qemu VM boot\n(pod_boot)"], [max(rest, 0)], bottom=[bottom], color="#ccb974",
                   label="host-side rest")
        ax.axhline(GOALS["pod_start_ms"], color="red", linestyle="--", linewidth=1, label="goal 100 ms")
        ax.set_ylabel("ms")
        ax.set_title("CRI pod start, first pod (host network)", fontsize=10)
        ax.legend(fontsize=7)
    else:
        note(ax, "runtime_compare not run")

    # 3. memory per idle pod.
    ax = axes[0][2]
    if rc:
        mem = rc["memory"]
        x = [m["pods"] for m in mem["runv"]]
        ax.plot(x, [m["per_pod_mib"] for m in mem["runv"]], "o-", color=colors["runv"],
                label="runv: shim + QEMU + helpers")
        rest = [
            (m["pods"], m["per_pod_mib"] - (m.get("guest_ram_per_pod_mib") or 0) - (m.get("tcg_code_per_pod_mib") or 0))
            for m in mem["runv"]
            if m.get("guest_ram_per_pod_mib") is not None
        ]
        if rest:
            ax.plot([r[0] for r in rest], [r[1] for r in rest], "o:", color=colors["runv"],
                    label="runv less guest RAM and TCG code")
        xr = [m["pods"] for m in mem["runc"]]
        ax.plot(xr, [m["shim_per_pod_mib"] for m in mem["runc"]], "o-", color=colors["runc"],
                label="runc: shim")
        ax.plot(xr, [m["per_pod_mib"] for m in mem["runc"]], "o--", color=colors["runc"],
                label="runc: shim + containers")
        ax.axhline(GOALS["overhead_mib"], color="red", linestyle="--", linewidth=1, label="goal 10 MiB")
        ax.set_xlabel("idle pods")
        ax.set_ylabel("MiB PSS per pod")
        ax.set_xticks(sorted(set(x + xr)))
        ax.set_title("host memory per idle pod", fontsize=10)
        ax.legend(fontsize=8)
    else:
        note(ax, "runtime_compare not run")

    # 4. density: creation time of pod k.
    ax = axes[1][0]
    if rc:
        for n in ("runc", "runv"):
            series = rc["pod_start"][n]["series_ms"]
            ax.plot(range(1, len(series) + 1), series, "o-", color=colors[n], label=n)
        dens = rc["density"]
        ax.set_xlabel("pod k (k-1 pods already running)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("ms, RunPodSandbox to app started")
        ax.set_yscale("log")
        t = "pod creation time as pods accumulate"
        if "fit_24_gib" in dens:
            t += f"\nestimate: {dens['fit_24_gib']} idle runv pods in 24 GiB"
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=8)
    else:
        note(ax, "runtime_compare not run")

    # 5. CPU-bound throughput.
    ax = axes[1][1]
    cpu = rc.get("cpu", {}) if rc else {}
    if "ratio_runc_over_runv_time" in cpu:
        ratio = cpu["ratio_runc_over_runv_time"]
        ax.bar(["runc", f"runv ({rc['accel']})"], [1.0, ratio], color=[colors["runc"], colors["runv"]])
        ax.axhline(GOALS["cpu_ratio"], color="red", linestyle="--", linewidth=1, label="goal 0.98")
        ax.annotate(f"{ratio:.3f}", (1, ratio), ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("throughput relative to runc")
        ax.set_title(f"CPU-bound: {cpu['job']}\nrunc {cpu['runc_s']:.2f} s, runv {cpu['runv_s']:.2f} s",
                     fontsize=10)
        ax.legend(fontsize=8)
    else:
        note(ax, "CPU-bound job not run" if rc else "runtime_compare not run")

    # 6. I/O ratios from the storage and network benches.
    ax = axes[1][2]
    labels, values, bar_colors = [], [], []
    st = b.get("storage_io")
    if st:
        for r in st["results"]:
            labels.append(f"fio {r['job']} {r['target'].replace('virtio-', '')}")
            values.append(r["ratio"])
            bar_colors.append("#64b5cd")
    net = b.get("network_io")
    if net:
        for key, v in net.get("medians", {}).items():
            labels.append(f"net {key}")
            values.append(v.get("ratio") or 0.0)
            bar_colors.append("#b47cc7")
    if labels:
        ax.barh(labels, values, color=bar_colors)
        ax.set_xscale("log")
        for y, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (v, y), va="center", fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("runv / host (fio), runv / runc (network), log; rtt: lower is better")
        ax.set_title("storage (fio) and network (iperf3, ping) ratios", fontsize=10)
    else:
        note(ax, "storage_io and network_io not run")

    fig.tight_layout(rect=(0, 0, 1, 0.94))
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=90)
    print(f"plot-bench: wrote {png}")
    return True


def main():
    bench_dir = sys.argv[1] if len(sys.argv) > 1 else "target/bench"
    png = sys.argv[2] if len(sys.argv) > 2 else "docs/bench/results.png"
    results = collect(bench_dir)
    with open(os.path.join(bench_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"plot-bench: wrote {os.path.join(bench_dir, 'results.json')} "
          f"({', '.join(sorted(results['benches'])) or 'no results'})")
    table = summary_table(results)
    with open(os.path.join(bench_dir, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    plot(results, png)


if __name__ == "__main__":
    main()
