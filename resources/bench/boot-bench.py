#!/usr/bin/python3
"""Boot benchmark: arbor against QEMU, same kernel, initramfs and command line.

For each VMM, boots the guest kit N times (default 3) and reports the median
of:

  * init_s:     wall-clock seconds from VMM process start (just before fork)
                to the serial line "Run /init as init process";
  * first_s:    seconds from VMM process start to the first kernel line on
                the serial console ("Linux version");
  * overhead:   the VMM's own memory, in MiB: peak RSS (VmHWM in
                /proc/PID/status, read right after "Run /init" is seen, just
                before the VMM is stopped) minus the resident size of the
                guest RAM mapping(s) in /proc/PID/smaps at that moment;

and the ratio arbor/QEMU of each. Runs alternate between the VMMs (arbor,
QEMU, arbor, QEMU, ...) so that load from other users of the machine spreads
over both. Only one guest runs at a time.

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
    p.add_argument("--only", choices=("arbor", "qemu"), help="benchmark one VMM only")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest, "
                   "else /tmp/guest if only that exists)")
    p.add_argument("--arbor", metavar="PATH",
                   help="arbor binary (default target/release/arbor if it exists, else "
                   "target/debug/arbor; if neither exists, 'cargo build --release -p vmm' is run)")
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
    return p.parse_args(argv)


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
                from_ = max(0, len(console) - len(MARK_INIT))
                console += chunk
                window = bytes(console[from_:])
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


def fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:.2f} {unit}" if unit == "s" else f"{v:.1f} {unit}"


def main(argv):
    args = parse_args(argv)
    kernel, initramfs, cmdline = guest_kit(args)
    mem_mib = args.memory // MIB
    vmms = ["arbor", "qemu"] if args.only is None else [args.only]
    # Only q35 (the default) must boot; another machine type failing to boot
    # this guest is reported, not fatal.
    qemu_must_boot = args.qemu_machine.split(",")[0] == "q35"

    commands = {}
    if "arbor" in vmms:
        arbor = find_arbor(args)
        commands["arbor"] = [arbor, "--kernel", kernel, "--initramfs", initramfs,
                             "--cmdline", cmdline, "--cpus", str(args.cpus),
                             "--memory", f"{mem_mib}M"]
    if "qemu" in vmms:
        qemu = find_qemu(args)
        commands["qemu"] = [qemu, "-accel", "kvm", "-machine", args.qemu_machine,
                            "-cpu", args.qemu_cpu, "-m", f"{mem_mib}M", "-smp", str(args.cpus),
                            "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                            "-kernel", kernel, "-initrd", initramfs, "-append", cmdline]
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
    ratio = None
    if "arbor" in summary and "qemu" in summary:
        ratio = {key: (round(summary["arbor"][key] / summary["qemu"][key], 3)
                       if summary["qemu"][key] else None) for key, _, _ in FIGURES}

    # --- Table ------------------------------------------------------------
    qlabel = f"QEMU ({args.qemu_machine})"
    print()
    print(f"Boot benchmark: {os.path.basename(kernel)} + initramfs.cpio, {args.cpus} vCPU(s), "
          f"{mem_mib} MiB, median of {args.runs} run(s)")
    head = f"{'':28} {'arbor':>12} {qlabel:>16} {'arbor/QEMU':>11}"
    print(head)
    print("-" * len(head))
    for key, title, unit in FIGURES:
        a = summary.get("arbor", {}).get(key)
        q = summary.get("qemu", {}).get(key)
        rt = ratio.get(key) if ratio else None
        print(f"{title:28} {fmt(a, unit):>12} {fmt(q, unit):>16} "
              f"{(f'{rt:.2f}' if rt is not None else '-'):>11}")
    for name in vmms:
        if name in summary:
            s = summary[name]
            rs = results[name]
            print(f"  {name}: min-max over {len(rs)} run(s): /init "
                  f"{min(r['init_s'] for r in rs):.2f}-{max(r['init_s'] for r in rs):.2f} s, "
                  f"first line {min(r['first_s'] for r in rs):.2f}-{max(r['first_s'] for r in rs):.2f} s, "
                  f"overhead {min(r['overhead_mib'] for r in rs):.1f}-{max(r['overhead_mib'] for r in rs):.1f} MiB")
            print(f"  {name}: peak RSS {s['vm_hwm_mib']:.1f} MiB, guest RAM resident "
                  f"{s['guest_ram_rss_mib']:.1f} MiB (medians); per run /init: "
                  + ", ".join(f"{r['init_s']:.2f}" for r in rs) + " s")
    loads = [r["loadavg_at_start"] for rs in results.values() for r in rs
             if r.get("loadavg_at_start") is not None]
    if loads:
        print(f"  load average (1 min) at the start of the runs: {min(loads):.2f}-{max(loads):.2f}"
              f" (runs alternate {' and '.join(vmms)}, one guest at a time)")
    for reason in failed.values():
        print("NOTE: " + reason)
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
        "ratio_arbor_over_qemu": ratio,
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
