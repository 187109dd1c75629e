#!/usr/bin/python3
"""Boot benchmark: arbor against QEMU (and Cloud Hypervisor), same kernel,
initramfs and command line.

For each VMM (arbor with its default topology, arbor with a minimal one,
QEMU q35 and, given --cloud-hypervisor PATH, Cloud Hypervisor), boots the
guest kit N times (default 3) and reports the median, minimum and maximum
of:

  * init_s:     wall-clock seconds from VMM process start (just before fork)
                to the serial line "Run /init as init process";
  * first_s:    seconds from VMM process start to the first kernel line on
                the serial console ("Linux version");
  * overhead:   the VMM's own memory, in MiB: peak RSS (VmHWM in
                /proc/PID/status, read right after "Run /init" is seen, just
                before the VMM is stopped) minus the resident size of the
                guest RAM mapping(s) in /proc/PID/smaps at that moment;

and the ratio of each VMM's median to the reference's (Cloud Hypervisor when
it runs, else QEMU), and a boot-phase timeline: the median arrival time of
the first console line of each boot phase (ACPI tables, PCI enumeration,
clock source switch, ... see PHASES) and the time spent between one phase
and the next. Runs alternate between the VMMs (arbor, arbor-minimal, QEMU,
Cloud Hypervisor, arbor, ...) so that load from other users of the machine
spreads over all of them. Only one guest runs at a time.

Prints a table, then one final line of JSON. Exits non-zero with a message on
any failure (timeout, VMM died, guest panicked, guest RAM not found). See
README.md beside this file for what exactly is measured and the caveats.

Python 3 standard library only.
"""

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, BenchError, log, parse_size, positive_int, positive_float,
    other_guests, loadavg, stop, tail_lines, read_smaps, guest_ram_mappings,
)

benchlib.PROG = "boot-bench"

MARK_FIRST = b"Linux version"
MARK_INIT = b"Run /init as init process"
# Boot-phase timeline: the first console line containing each text, in boot
# order. The kit's kernel prints no timestamps (no CONFIG_PRINTK_TIME), so a
# line's time is when it reached the host. Everything the kernel printed
# before console_init() reaches the console in one burst with "Linux
# version", so the first row is the end of the kernel's early setup.
PHASES = (
    ("console on", b"Linux version"),
    ("DSDT load starts", b"ACPI: Added _OSI(Processor Aggregator"),
    ("DSDT loaded", b"ACPI AML tables successfully acquired and loaded"),
    ("ACPI interpreter on", b"ACPI: Interpreter enabled"),
    ("ACPI devices scanned", b"ACPI: PCI Root Bridge"),
    ("PCI bus scan starts", b"PCI host bridge to bus"),
    ("clock source switched", b"clocksource: Switched to clocksource"),
    ("initramfs unpacked", b"Freeing initrd memory"),
    ("serial driver starts", b"Serial: 8250/16550"),
    ("kernel rodata protected", b"Write protecting the kernel read-only data"),
    ("Run /init", MARK_INIT),
)
ARBOR_MINIMAL = benchlib.ARBOR_MINIMAL
ARBOR_BRIDGE = benchlib.ARBOR_WITH_ACPI_BRIDGE
ARBOR_VARIANTS = {"arbor": [], "arbor-minimal": ARBOR_MINIMAL, "arbor-bridge": ARBOR_BRIDGE}
VMMS = ("arbor", "arbor-minimal", "arbor-bridge", "qemu", "cloud-hypervisor")
# Lines after which the boot cannot reach /init.
MARK_FATAL = (b"Kernel panic",)


# ---------------------------------------------------------------------------
# Arguments and inputs
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="boot-bench.py",
        description="Boot the guest kit under arbor and under QEMU and compare time to "
        "the first kernel line, time to 'Run /init', and VMM memory overhead "
        "(medians of N runs).",
        epilog="Timing starts just before the VMM process is started; serial output is "
        "read from the VMM's standard output as it arrives. See resources/bench/README.md.",
    )
    p.add_argument("--runs", type=positive_int, default=3, help="boots per VMM (default 3)")
    p.add_argument("--kernel", choices=("vmlinux", "bzImage"), default="vmlinux",
                   help="which kernel image of the guest kit to boot (default vmlinux, PVH entry)")
    p.add_argument("--cpus", type=positive_int, default=1, help="vCPUs (default 1)")
    p.add_argument("--memory", type=parse_size, default=512 * MIB, metavar="SIZE",
                   help="guest memory, e.g. 512M or 1G (default 512M; a plain number is MiB)")
    p.add_argument("--timeout", type=positive_float, default=180.0, metavar="SECONDS",
                   help="seconds each boot may take to reach 'Run /init' (default 180)")
    p.add_argument("--only", choices=VMMS, help="benchmark one VMM only")
    p.add_argument("--vmm", action="append", choices=VMMS, dest="vmms", metavar="NAME",
                   help="a VMM to benchmark (repeatable; in the order given): arbor, "
                   "arbor-minimal (one root port, no hotplug slot: "
                   + " ".join(ARBOR_MINIMAL) + "), arbor-bridge (the default topology and "
                   "an ACPI bridge br0 with 32 slots, the default before 1 Dec 2026), qemu, "
                   "cloud-hypervisor. Default: arbor, "
                   "arbor-minimal, qemu, and cloud-hypervisor when --cloud-hypervisor is given")
    p.add_argument("--cloud-hypervisor", metavar="PATH",
                   help="Cloud Hypervisor binary (not installed by this project; build it "
                   "from its source for comparison)")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest, "
                   "else /tmp/guest if only that exists)")
    p.add_argument("--arbor", metavar="PATH",
                   help="arbor binary (default target/release/arbor if it exists, else "
                   "target/debug/arbor; if neither exists, resources/build-release.sh is run)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                   help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--qemu-machine", default="q35", metavar="MACHINE",
                   help="QEMU -machine value (default q35); e.g. microvm or microvm,acpi=on. "
                   "If a machine other than q35 fails to boot the guest, the failure is "
                   "reported in the output instead of ending the benchmark")
    p.add_argument("--qemu-cpu", default="host", metavar="MODEL",
                   help="QEMU -cpu value (default host: like arbor, the guest sees the CPUID "
                   "that KVM supports)")
    p.add_argument("--stop-grace", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL when stopping a VMM (default 5)")
    args = p.parse_args(argv)
    if args.only and args.vmms:
        p.error("--only and --vmm exclude each other")
    if args.only:
        args.vmms = [args.only]
    check_vmms(p, args, ["arbor", "arbor-minimal", "qemu"])
    return args


def check_vmms(p, args, default):
    """Fills args.vmms with DEFAULT (and cloud-hypervisor when its binary
    is given) when no --vmm was, and refuses a list that cannot run."""
    if not args.vmms:
        args.vmms = list(default)
        if args.cloud_hypervisor:
            args.vmms.append("cloud-hypervisor")
    if "cloud-hypervisor" in args.vmms and not args.cloud_hypervisor:
        p.error("--vmm cloud-hypervisor needs --cloud-hypervisor PATH")
    if len(set(args.vmms)) != len(args.vmms):
        p.error("a VMM is named twice")


def guest_kit(args):
    return benchlib.guest_kit(args.guest_dir, args.kernel)


def find_arbor(args):
    return benchlib.find_arbor(args.arbor)


def find_qemu(args):
    return benchlib.find_qemu(args.qemu)


# ---------------------------------------------------------------------------
# /proc readers
# ---------------------------------------------------------------------------


def read_status_kib(pid):
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of PID, in KiB."""
    want = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in want:
                out[key] = int(rest.split()[0])
    if "VmHWM" not in out:
        raise BenchError(f"no VmHWM in /proc/{pid}/status")
    return out


# ---------------------------------------------------------------------------
# One boot
# ---------------------------------------------------------------------------


def boot_once(name, argv, mem_bytes, timeout, grace):
    """Boots one guest; returns a dict of measurements or raises BenchError."""
    others = other_guests(os.getpid())
    load = loadavg()
    console = bytearray()
    errout = bytearray()
    t_first = t_init = None
    phase_at = {}
    longest = max(len(m) for _, m in PHASES)
    fatal = None

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
    try:
        sel = selectors.DefaultSelector()
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        open_streams = 2
        deadline = t0 + timeout
        while t_init is None:
            now = time.monotonic()
            if now >= deadline:
                raise BenchError(
                    f"{name}: timeout: no '{MARK_INIT.decode()}' within {timeout:g} s "
                    f"(first kernel line {'at %.2f s' % t_first if t_first else 'never seen'})\n"
                    f"  last console lines:\n{tail_lines(console)}"
                    + (f"\n  stderr:\n{tail_lines(errout, 10)}" if errout.strip() else ""))
            if open_streams == 0:
                status = proc.wait()
                raise BenchError(
                    f"{name}: the VMM exited with status {status} before '{MARK_INIT.decode()}' "
                    f"(after {now - t0:.2f} s)\n  last console lines:\n{tail_lines(console)}"
                    + (f"\n  stderr:\n{tail_lines(errout, 10)}" if errout.strip() else ""))
            for key, _ in sel.select(timeout=min(1.0, deadline - now)):
                try:
                    chunk = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                t = time.monotonic()
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if key.fileobj is proc.stderr:
                    errout += chunk
                    continue
                # Search only the new bytes plus an overlap for a split marker.
                from_ = max(0, len(console) - longest)
                console += chunk
                window = bytes(console[from_:])
                for label, mark in PHASES:
                    if label not in phase_at and mark in window:
                        phase_at[label] = round(t - t0, 3)
                if t_first is None and MARK_FIRST in window:
                    t_first = t - t0
                if t_init is None and MARK_INIT in window:
                    t_init = t - t0
                for mark in MARK_FATAL:
                    if fatal is None and mark in window:
                        fatal = mark.decode()
            if fatal and t_init is None:
                # Let the rest of the oops reach the console, then give up.
                time.sleep(1.0)
                try:
                    console += os.read(proc.stdout.fileno(), 65536)
                except (BlockingIOError, OSError):
                    pass
                raise BenchError(
                    f"{name}: the guest failed ('{fatal}') after {time.monotonic() - t0:.2f} s\n"
                    f"  last console lines:\n{tail_lines(console, 40)}")
        if t_first is None:
            raise BenchError(f"{name}: '{MARK_INIT.decode()}' seen but no '{MARK_FIRST.decode()}' before it")

        # Memory, while the VMM still runs (the guest sits in /init's pause loop).
        if proc.poll() is not None:
            raise BenchError(f"{name}: the VMM exited (status {proc.returncode}) right after reaching /init")
        try:
            status = read_status_kib(proc.pid)
            maps = read_smaps(proc.pid)
        except OSError as e:
            raise BenchError(f"{name}: reading /proc/{proc.pid}: {e}")
        ram, method = guest_ram_mappings(maps, mem_bytes)
        ram_rss_kib = sum(m.get("Rss", 0) for m in ram)
        overhead_kib = status["VmHWM"] - ram_rss_kib
        return {
            "first_s": round(t_first, 3),
            "init_s": round(t_init, 3),
            "overhead_mib": round(overhead_kib / 1024, 2),
            "vm_hwm_mib": round(status["VmHWM"] / 1024, 2),
            "vm_rss_mib": round(status.get("VmRSS", 0) / 1024, 2),
            "rss_anon_mib": round(status.get("RssAnon", 0) / 1024, 2),
            "rss_file_mib": round(status.get("RssFile", 0) / 1024, 2),
            "guest_ram_rss_mib": round(ram_rss_kib / 1024, 2),
            "guest_ram_maps": [f"{m['start']:x}-{m['end']:x}" for m in ram],
            "guest_ram_method": method,
            "phases_s": phase_at,
            "loadavg_at_start": load,
            "other_vmms_at_start": others,
        }
    finally:
        stop(proc, grace)
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


FIGURES = (
    ("init_s", "time to 'Run /init'", "s"),
    ("first_s", "time to first kernel line", "s"),
    ("overhead_mib", "VMM memory overhead", "MiB"),
)


def summarize(runs):
    out = {key: statistics.median(r[key] for r in runs) for key, _, _ in FIGURES}
    for extra in ("vm_hwm_mib", "guest_ram_rss_mib"):
        out[extra] = statistics.median(r[extra] for r in runs)
    return out


def phase_medians(runs):
    """Median arrival time of each phase seen in every run, in PHASES order."""
    out = {}
    for label, _ in PHASES:
        ts = [r["phases_s"].get(label) for r in runs]
        if all(t is not None for t in ts):
            out[label] = round(statistics.median(ts), 3)
    return out


def fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:.2f} {unit}" if unit == "s" else f"{v:.1f} {unit}"


LABELS = {"arbor": "arbor", "arbor-minimal": "arbor-min", "arbor-bridge": "arbor-br",
          "qemu": "QEMU",
          "cloud-hypervisor": "CH"}


def commands_for(args, kernel, initramfs, cmdline, mem_mib):
    commands = {}
    for name in args.vmms:
        if name in ARBOR_VARIANTS:
            if not any(n in commands for n in ARBOR_VARIANTS):
                arbor = find_arbor(args)
            cmd = [arbor, "--kernel", kernel, "--initramfs", initramfs,
                   "--cmdline", cmdline, "--cpus", str(args.cpus), "--memory", f"{mem_mib}M"]
            commands[name] = cmd + ARBOR_VARIANTS[name]
        elif name == "qemu":
            qemu = find_qemu(args)
            commands[name] = [qemu, "-accel", "kvm", "-machine", args.qemu_machine,
                              "-cpu", args.qemu_cpu, "-m", f"{mem_mib}M", "-smp", str(args.cpus),
                              "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                              "-kernel", kernel, "-initrd", initramfs, "-append", cmdline]
        else:
            ch = benchlib.find_executable(args.cloud_hypervisor, "--cloud-hypervisor")
            commands[name] = [ch, "--kernel", kernel, "--initramfs", initramfs,
                              "--cmdline", cmdline, "--cpus", f"boot={args.cpus}",
                              "--memory", f"size={mem_mib}M", "--serial", "tty",
                              "--console", "off"]
    return commands


def main(argv):
    args = parse_args(argv)
    kernel, initramfs, cmdline = guest_kit(args)
    mem_mib = args.memory // MIB
    vmms = args.vmms
    # The reference of the ratios: Cloud Hypervisor when it runs, else QEMU.
    ref = next((v for v in ("cloud-hypervisor", "qemu") if v in vmms), None)
    # Only q35 (the default) must boot; another machine type failing to boot
    # this guest is reported, not fatal.
    qemu_must_boot = args.qemu_machine.split(",")[0] == "q35"

    commands = commands_for(args, kernel, initramfs, cmdline, mem_mib)
    benchlib.check_kvm()

    for name, cmd in commands.items():
        log(f"{name}: {' '.join(benchlib.quote(a) for a in cmd)}")

    results = {name: [] for name in vmms}
    failed = {}  # VMM -> reason, only for QEMU machines other than q35
    for i in range(args.runs):
        for name in vmms:
            if name in failed:
                continue
            label = f"run {i + 1}/{args.runs} {name}"
            log(f"{label}: booting (timeout {args.timeout:g} s)")
            try:
                r = boot_once(name, commands[name], args.memory, args.timeout, args.stop_grace)
            except BenchError as e:
                if name == "qemu" and not qemu_must_boot:
                    failed[name] = f"QEMU -machine {args.qemu_machine} did not boot this guest: {e}"
                    log(failed[name])
                    continue
                raise
            if r["other_vmms_at_start"]:
                log(f"{label}: warning: other VMMs were running: {', '.join(r['other_vmms_at_start'])}")
            if r["guest_ram_method"] not in ("exact", "memfd"):
                log(f"{label}: note: guest RAM found by method '{r['guest_ram_method']}': {r['guest_ram_maps']}")
            log(f"{label}: first line {r['first_s']:.2f} s, /init {r['init_s']:.2f} s, "
                f"VmHWM {r['vm_hwm_mib']:.1f} MiB - guest RAM {r['guest_ram_rss_mib']:.1f} MiB "
                f"= overhead {r['overhead_mib']:.1f} MiB")
            results[name].append(r)

    summary = {name: summarize(rs) for name, rs in results.items() if rs}
    ratios = {}
    if ref in summary:
        for name in summary:
            if name != ref:
                ratios[name] = {key: (round(summary[name][key] / summary[ref][key], 3)
                                      if summary[ref][key] else None) for key, _, _ in FIGURES}
    timeline = {name: phase_medians(rs) for name, rs in results.items() if rs}

    # --- Table ------------------------------------------------------------
    shown = [n for n in vmms if n in summary]
    heads = [LABELS[n] if n != "qemu" else f"QEMU {args.qemu_machine}" for n in shown]
    ratio_cols = [n for n in shown if n in ratios]
    ratio_heads = [f"{LABELS[n]}/{LABELS[ref]}" for n in ratio_cols]
    print()
    print(f"Boot benchmark: {os.path.basename(kernel)} + initramfs.cpio, {args.cpus} vCPU(s), "
          f"{mem_mib} MiB, median of {args.runs} run(s)")
    head = f"{'':28}" + "".join(f" {h:>14}" for h in heads + ratio_heads)
    print(head)
    print("-" * len(head))
    for key, title, unit in FIGURES:
        cells = [fmt(summary[n][key], unit) for n in shown]
        cells += [(f"{ratios[n][key]:.2f}" if ratios[n][key] is not None else "-")
                  for n in ratio_cols]
        print(f"{title:28}" + "".join(f" {c:>14}" for c in cells))
    for name in shown:
        rs = results[name]
        print(f"  {name}: min-max over {len(rs)} run(s): /init "
              f"{min(r['init_s'] for r in rs):.2f}-{max(r['init_s'] for r in rs):.2f} s, "
              f"first line {min(r['first_s'] for r in rs):.2f}-{max(r['first_s'] for r in rs):.2f} s, "
              f"overhead {min(r['overhead_mib'] for r in rs):.1f}-{max(r['overhead_mib'] for r in rs):.1f} MiB")
        print(f"  {name}: peak RSS {summary[name]['vm_hwm_mib']:.1f} MiB, guest RAM resident "
              f"{summary[name]['guest_ram_rss_mib']:.1f} MiB (medians); per run /init: "
              + ", ".join(f"{r['init_s']:.2f}" for r in rs) + " s")
    loads = [r["loadavg_at_start"] for rs in results.values() for r in rs
             if r.get("loadavg_at_start") is not None]
    if loads:
        print(f"  load average (1 min) at the start of the runs: {min(loads):.2f}-{max(loads):.2f}"
              f" (runs alternate {', '.join(shown)}; one guest at a time)")
    for reason in failed.values():
        print("NOTE: " + reason)

    # --- Boot-phase timeline ----------------------------------------------
    print()
    print("Boot-phase timeline: median seconds from the VMM's start to the first console line"
          " of each step (in brackets: since the previous step)")
    head = f"{'':28}" + "".join(f" {h:>18}" for h in heads)
    print(head)
    print("-" * len(head))
    prev = {n: 0.0 for n in shown}
    for label, _ in PHASES:
        cells = []
        for n in shown:
            t = timeline[n].get(label)
            if t is None:
                cells.append("-")
                continue
            cells.append(f"{t:6.2f} (+{t - prev[n]:5.2f})")
            prev[n] = t
        print(f"{label:28}" + "".join(f" {c:>18}" for c in cells))
    print()

    out = {
        "kernel": kernel,
        "kernel_sha256": benchlib.sha256(kernel),
        "initramfs": initramfs,
        "cmdline": cmdline,
        "cpus": args.cpus,
        "memory_mib": mem_mib,
        "runs": args.runs,
        "timeout_s": args.timeout,
        "qemu_machine": args.qemu_machine,
        "commands": commands,
        "median": summary,
        "min": {name: {key: min(r[key] for r in rs) for key, _, _ in FIGURES}
                for name, rs in results.items() if rs},
        "max": {name: {key: max(r[key] for r in rs) for key, _, _ in FIGURES}
                for name, rs in results.items() if rs},
        "ratio_reference": ref,
        "ratios": ratios,
        "timeline_median_s": timeline,
        "per_run": results,
        "failed": failed,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    if not summary:
        print("boot-bench: error: no VMM booted the guest", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
