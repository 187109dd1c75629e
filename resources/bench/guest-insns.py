#!/usr/bin/python3
"""Guest instruction counts per boot phase: arbor against Cloud Hypervisor
(and QEMU), same kernel, initramfs and command line.

On this project's machines KVM is a software implementation (kvm_pvm) that
emulates a non-PVM guest instruction by instruction, and each emulated
instruction passes the host's `kvm:kvm_emulate_insn` tracepoint. Counting
those events from the VMM's start to the guest's "Run /init" line counts
the guest's work, and unlike wall-clock time the count hardly depends on
what else the machine is doing: it is what a rerun reproduces. (On hardware
KVM the tracepoint fires only for the few instructions KVM emulates, and the
counts mean nothing.)

For each boot, and for each boot phase (the same console lines as
boot-bench.py's timeline), it reports:

  * insns:  guest instructions executed (emulated);
  * ticks:  timer interrupts the guest programmed (writes of the TSC-deadline
            MSR 0x6e0): the guest's periodic tick costs it about 2,000
            instructions each, and the number of ticks grows with the
            boot's wall-clock time, so it is the one part of the count
            that load can change;
  * pio, mmio: port and memory-mapped I/O accesses that left the guest.

and, with --top N, the N guest kernel functions (from the guest kit's
vmlinux symbols) that executed most instructions in each phase. Boots
alternate between the VMMs; with --runs above 1 the medians are printed.

Needs root (it writes to tracefs; it uses its own trace instance, so other
tracing is left alone) and about --buffer-mib MiB of memory per host CPU
for the trace buffer. Only the VMM's own threads are traced. Prints a
table, then one final line of JSON.

Python 3 standard library only (and `nm` from binutils for --top).
"""

import argparse
import bisect
import collections
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import BenchError, MIB, log, parse_size, positive_int, positive_float  # noqa: E402

boot_bench = benchlib.load_script("boot-bench.py", "boot_bench")
benchlib.PROG = "guest-insns"

VMMS = boot_bench.VMMS
PHASES = (("start", None),) + boot_bench.PHASES
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
INSTANCE = "arbor-guest-insns"
TSC_DEADLINE_MSR = "6e0"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="guest-insns.py",
        description="Count the guest instructions each VMM's boot executes up to "
        "'Run /init', per boot phase (emulated KVM only; needs root).",
        epilog="See resources/bench/README.md.")
    p.add_argument("--runs", type=positive_int, default=1, help="boots per VMM (default 1)")
    p.add_argument("--vmm", action="append", choices=VMMS, dest="vmms", metavar="NAME",
                   help="a VMM to measure (repeatable, in the order given): "
                   + ", ".join(VMMS) + ". Default: arbor, arbor-minimal, and "
                   "cloud-hypervisor when --cloud-hypervisor is given")
    p.add_argument("--cloud-hypervisor", metavar="PATH",
                   help="Cloud Hypervisor binary (built from its source for comparison; "
                   "never part of this project)")
    p.add_argument("--arbor", metavar="PATH", help="arbor binary (default as boot-bench.py)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                   help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--qemu-cpu", default="host", metavar="MODEL",
                   help="QEMU -cpu value (default host; on a host whose KVM refuses QEMU's "
                   "IA32_ARCH_CAPABILITIES write, host,-arch-capabilities)")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR, else <repo>/target/guest)")
    p.add_argument("--cpus", type=positive_int, default=1, help="vCPUs (default 1)")
    p.add_argument("--memory", type=parse_size, default=512 * MIB, metavar="SIZE",
                   help="guest memory (default 512M)")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="print the N guest functions with most instructions in each phase "
                   "(default 0: none)")
    p.add_argument("--buffer-mib", type=positive_int, default=3000, metavar="MIB",
                   help="trace buffer per host CPU (default 3000; a boot of the kit's "
                   "kernel is about 40 million events)")
    p.add_argument("--timeout", type=positive_float, default=300.0, metavar="SECONDS",
                   help="seconds each boot may take to reach 'Run /init' (default 300)")
    args = p.parse_args(argv)
    boot_bench.check_vmms(p, args, ["arbor", "arbor-minimal"])
    if args.top < 0:
        p.error("--top must not be negative")
    # What boot-bench.commands_for reads.
    args.kernel = "vmlinux"
    args.qemu_machine = "q35"
    return args


class Tracer:
    """A tracefs instance recording kvm_emulate_insn, kvm_msr, kvm_pio and
    kvm_mmio for one process and its threads."""

    def __init__(self, buffer_mib):
        root = next((t for t in TRACEFS if os.path.isdir(os.path.join(t, "instances"))), None)
        if root is None:
            raise BenchError("no tracefs (mount it, or run as root)")
        if not os.path.isdir(os.path.join(root, "events", "kvm", "kvm_emulate_insn")):
            raise BenchError("the host kernel has no kvm:kvm_emulate_insn tracepoint")
        self.dir = os.path.join(root, "instances", INSTANCE)
        try:
            if os.path.isdir(self.dir):
                os.rmdir(self.dir)
            os.mkdir(self.dir)
        except OSError as e:
            raise BenchError(f"cannot create the trace instance {self.dir}: {e}")
        self.buffer_mib = buffer_mib

    def write(self, name, value):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def arm(self):
        self.write("tracing_on", "0")
        self.write("buffer_size_kb", str(self.buffer_mib * 1024))
        self.write("trace", "")
        self.write("options/event-fork", "1")
        for e in ("kvm_emulate_insn", "kvm_msr", "kvm_pio", "kvm_mmio"):
            self.write(f"events/kvm/{e}/enable", "1")

    def follow(self, pid):
        self.write("set_event_pid", str(pid))
        self.write("tracing_on", "1")

    def stop(self):
        self.write("tracing_on", "0")

    def lost(self):
        n = 0
        for cpu in os.listdir(os.path.join(self.dir, "per_cpu")):
            with open(os.path.join(self.dir, "per_cpu", cpu, "stats")) as f:
                for line in f:
                    if line.startswith("overrun:"):
                        n += int(line.split()[1])
        return n

    def close(self):
        try:
            self.write("tracing_on", "0")
            self.write("buffer_size_kb", "4")
            os.rmdir(self.dir)
        except OSError:
            pass


class Symbols:
    def __init__(self, vmlinux):
        try:
            out = subprocess.run(["nm", vmlinux], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise BenchError(f"nm {vmlinux}: {e}")
        syms = []
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3 and f[1] in "tTwW":
                syms.append((int(f[0], 16), f[2]))
        syms.sort()
        self.addrs = [a for a, _ in syms]
        self.names = [n for _, n in syms]
        self.cache = {}

    def name(self, rip):
        s = self.cache.get(rip)
        if s is None:
            i = bisect.bisect_right(self.addrs, int(rip, 16)) - 1
            s = self.names[i] if i >= 0 else "?"
            self.cache[rip] = s
        return s


def boot_once(tracer, cmd, timeout):
    """Boots CMD under tracing until "Run /init"; returns (seconds, error)."""
    tracer.arm()
    marker = open(os.path.join(tracer.dir, "trace_marker"), "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    error = None
    try:
        tracer.follow(proc.pid)
        console = benchlib.Stream(proc.stdout)
        deadline = t0 + timeout
        i = 0
        while True:
            try:
                i, _, text, _ = console.wait_for(lambda ln: True, i, deadline, ())
                i += 1
            except benchlib.StreamTimeout:
                error = f"no 'Run /init' within {timeout:g} s"
                break
            except benchlib.StreamEof:
                error = "the VMM exited before 'Run /init'"
                break
            text = text.rstrip()
            marker.write("CONSOLE " + text[:200] + "\n")
            marker.flush()
            if boot_bench.MARK_INIT.decode() in text:
                break
            if any(f.decode() in text for f in boot_bench.MARK_FATAL):
                error = f"the guest failed: {text}"
                break
    finally:
        tracer.stop()
        marker.close()
        benchlib.stop(proc, 5.0)
    return time.monotonic() - t0, error


def count(tracer, symbols):
    """Per-phase counts from the instance's trace buffer."""
    marks = [(name, m.decode()) for name, m in PHASES[1:]]
    phase = "start"
    seen = set()
    insns = collections.Counter()
    ticks = collections.Counter()
    pio = collections.Counter()
    mmio = collections.Counter()
    funcs = collections.defaultdict(collections.Counter)
    with open(os.path.join(tracer.dir, "trace"), errors="replace") as f:
        for line in f:
            i = line.find("kvm_emulate_insn: ")
            if i >= 0:
                insns[phase] += 1
                if symbols:
                    # "kvm_emulate_insn: 0:ffffffff81052e29:31 c0 (prot64)"
                    j = line.find(":", i + 20)
                    funcs[phase][symbols.name(line[i + 20:j])] += 1
                continue
            if "tracing_mark_write: CONSOLE " in line:
                for name, m in marks:
                    if name not in seen and m in line:
                        seen.add(name)
                        phase = name
                        break
            elif "kvm_msr: msr_write " + TSC_DEADLINE_MSR + " " in line:
                ticks[phase] += 1
            elif "kvm_pio: " in line:
                pio[phase] += 1
            elif "kvm_mmio: " in line:
                mmio[phase] += 1
    missing = [name for name, _ in marks if name not in seen]
    return {"insns": dict(insns), "ticks": dict(ticks), "pio": dict(pio), "mmio": dict(mmio),
            "funcs": {p: c.most_common(50) for p, c in funcs.items()}, "missing": missing}


def med(xs):
    return statistics.median(xs) if xs else None


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("needs root (tracefs)")
    kernel, initramfs, cmdline = benchlib.guest_kit(args.guest_dir, "vmlinux")
    commands = boot_bench.commands_for(args, kernel, initramfs, cmdline, args.memory // MIB)
    benchlib.check_kvm()
    symbols = Symbols(kernel) if args.top else None
    for name, cmd in commands.items():
        log(f"{name}: {' '.join(benchlib.quote(a) for a in cmd)}")
    results = {name: [] for name in args.vmms}
    for run in range(args.runs):
        for name in args.vmms:
            load = benchlib.loadavg()
            # A new instance for every boot: its pid filter and buffer start empty.
            tracer = Tracer(args.buffer_mib)
            try:
                secs, error = boot_once(tracer, commands[name], args.timeout)
                if error:
                    raise BenchError(f"{name}: {error}")
                lost = tracer.lost()
                if lost:
                    raise BenchError(f"{name}: the trace buffer lost {lost} events; "
                                     "raise --buffer-mib")
                r = count(tracer, symbols)
            finally:
                tracer.close()
            total = sum(r["insns"].values())
            if total == 0:
                raise BenchError(f"{name}: no guest instruction was traced (is this KVM "
                                 "one that emulates the guest?)")
            r["wall_s"] = secs
            r["loadavg"] = load
            results[name].append(r)
            log(f"run {run + 1}/{args.runs} {name}: {total / 1e6:.2f} M instructions, "
                f"{sum(r['ticks'].values())} ticks, {secs:.1f} s under tracing, "
                f"load {load}")
    report(args, results)
    return 0


def report(args, results):
    vmms = args.vmms
    ref = next((v for v in ("cloud-hypervisor", "qemu") if v in vmms), None)
    names = [n for n, _ in PHASES]
    print(f"\nguest instructions (millions) per boot phase, median of {args.runs}; "
          "a phase runs from its console line to the next one's")
    print(f"{'phase':28s}" + "".join(f"{v[:16]:>18s}" for v in vmms))
    summary = {}
    for p in names:
        row = f"{p[:28]:28s}"
        for v in vmms:
            ins = med([r["insns"].get(p, 0) for r in results[v]])
            tk = med([r["ticks"].get(p, 0) for r in results[v]])
            row += f"{ins / 1e6:12.2f} ({tk:4.0f}t)"
        print(row)
    print("-" * (28 + 18 * len(vmms)))
    for key, label, scale in (("insns", "instructions (M)", 1e6), ("ticks", "timer ticks", 1),
                              ("pio", "port I/O", 1), ("mmio", "MMIO", 1)):
        row = f"{label:28s}"
        for v in vmms:
            xs = [sum(r[key].values()) for r in results[v]]
            row += f"{med(xs) / scale:18.2f}" if scale != 1 else f"{med(xs):18.0f}"
            summary.setdefault(v, {})[key] = {"median": med(xs), "min": min(xs), "max": max(xs)}
        print(row)
    row = f"{'wall s under tracing':28s}"
    for v in vmms:
        row += f"{med([r['wall_s'] for r in results[v]]):18.1f}"
    print(row)
    if ref:
        row = f"{'instructions / ' + ref[:12]:28s}"
        base = summary[ref]["insns"]["median"]
        for v in vmms:
            row += f"{summary[v]['insns']['median'] / base:18.3f}"
        print(row)
    if args.top:
        for v in vmms:
            last = results[v][-1]
            print(f"\n{v}: top {args.top} guest functions per phase (last boot)")
            for p in names:
                top = last["funcs"].get(p, [])[:args.top]
                if not top:
                    continue
                n = max(last["insns"].get(p, 0), 1)
                print(f"  {p} ({n / 1e6:.2f} M): " + ", ".join(
                    f"{f} {100 * k / n:.1f}%" for f, k in top))
    print(json.dumps({"runs": args.runs, "reference": ref, "summary": summary,
                      "phases": {v: [{k: r[k] for k in ("insns", "ticks", "pio", "mmio",
                                                        "wall_s", "loadavg")}
                                     for r in results[v]] for v in vmms}}))


if __name__ == "__main__":
    benchlib.run_main(main)
