#!/usr/bin/env python3
"""What each VMM's DSDT costs the guest's ACPI interpreter to load.

Linux loads the DSDT object by object before it probes any device; under
emulated KVM that is seconds of the boot (the boot-bench timeline's "DSDT
load" phase), on hardware milliseconds. This measures it without the noise
of a boot: each VMM is started on the guest kit, its DSDT is copied out of
guest memory (/proc/PID/mem) as soon as it is there, the VMM is stopped, and
ACPICA's own interpreter (`acpiexec` from Debian's acpica-tools, the code
Linux carries) loads it under `valgrind --tool=callgrind`. Printed: the
table's size, the namespace objects it creates, and the instructions the
load takes beyond loading an empty DSDT. Instruction counts do not depend on
the machine's load, so one run per VMM is enough (a second run gives the
same numbers).

Needs: valgrind, acpiexec (apt-get install valgrind acpica-tools), and
permission to read the VMM's memory (root, or the VMM as a child of this
script under the default ptrace policy).
"""

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import BenchError, log  # noqa: E402

benchlib.PROG = "acpi-cost"

VMMS = ("arbor", "arbor-minimal", "qemu", "cloud-hypervisor")
MEM_MIB = 512
CHUNK = 16 << 20


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Copy each VMM's DSDT out of guest memory and count the instructions "
                    "ACPICA's acpiexec takes to load it (callgrind).",
        epilog="See resources/bench/README.md.")
    p.add_argument("--vmm", dest="vmms", action="append", choices=VMMS, metavar="NAME",
                   help="a VMM to measure (repeatable): arbor (default topology), "
                        "arbor-minimal (" + " ".join(benchlib.ARBOR_MINIMAL) + "), qemu (q35), "
                        "cloud-hypervisor. Default: arbor, arbor-minimal, qemu, and "
                        "cloud-hypervisor when --cloud-hypervisor is given")
    p.add_argument("--arbor", metavar="PATH", help="arbor binary (default target/release/arbor)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH")
    p.add_argument("--cloud-hypervisor", metavar="PATH",
                   help="Cloud Hypervisor binary (not installed by this project)")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir())
    p.add_argument("--timeout", type=benchlib.positive_float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the DSDT to appear in guest memory (default 60)")
    p.add_argument("--keep", metavar="DIR", help="also write each DSDT to DIR/<vmm>.aml")
    args = p.parse_args(argv)
    if not args.vmms:
        args.vmms = ["arbor", "arbor-minimal", "qemu"]
        if args.cloud_hypervisor:
            args.vmms.append("cloud-hypervisor")
    if "cloud-hypervisor" in args.vmms and not args.cloud_hypervisor:
        p.error("--vmm cloud-hypervisor needs --cloud-hypervisor PATH")
    return args


def commands(args, kernel, initramfs, cmdline):
    out = {}
    for name in args.vmms:
        if name.startswith("arbor"):
            arbor = benchlib.find_arbor(args.arbor)
            out[name] = [arbor, "--kernel", kernel, "--initramfs", initramfs, "--cmdline",
                         cmdline, "--memory", f"{MEM_MIB}M"]
            if name == "arbor-minimal":
                out[name] += benchlib.ARBOR_MINIMAL
        elif name == "qemu":
            qemu = benchlib.find_executable(args.qemu, "--qemu")
            out[name] = [qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m",
                         f"{MEM_MIB}M", "-nographic", "-nodefaults", "-no-reboot", "-serial",
                         "null", "-kernel", kernel, "-initrd", initramfs, "-append", cmdline]
        else:
            ch = benchlib.find_executable(args.cloud_hypervisor, "--cloud-hypervisor")
            out[name] = [ch, "--kernel", kernel, "--initramfs", initramfs, "--cmdline", cmdline,
                         "--memory", f"size={MEM_MIB}M", "--serial", "null", "--console", "off"]
    return out


def valid_table(data, at, sig):
    if data[at:at + 4] != sig or at + 36 > len(data):
        return None
    (length,) = struct.unpack_from("<I", data, at + 4)
    if not 36 <= length <= (1 << 20) or at + length > len(data):
        return None
    table = bytes(data[at:at + length])
    return table if sum(table) % 256 == 0 else None


def find_dsdt(pid):
    """The first DSDT with a valid header and checksum in the guest RAM."""
    maps, _ = benchlib.guest_ram_mappings(benchlib.read_smaps(pid), MEM_MIB << 20)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in sorted(maps, key=lambda m: m["start"]):
            for off in range(0, m["end"] - m["start"], CHUNK):
                mem.seek(m["start"] + off)
                # Overlap the chunks so a table across a boundary is seen.
                data = mem.read(min(CHUNK + (1 << 20), m["end"] - m["start"] - off))
                at = data.find(b"DSDT")
                while 0 <= at < CHUNK:
                    t = valid_table(data, at, b"DSDT")
                    if t:
                        return t
                    at = data.find(b"DSDT", at + 1)
    return None


def capture(name, cmd, timeout):
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}: "
                                 f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                t = find_dsdt(proc.pid)
            except (BenchError, OSError):
                t = None
            if t:
                return t
            time.sleep(0.2)
        raise BenchError(f"{name}: no DSDT in guest memory within {timeout:.0f} s")
    finally:
        benchlib.stop(proc, 5.0)


def empty_dsdt():
    head = bytearray(b"DSDT" + struct.pack("<I", 36) + bytes([2, 0]) + b"EMPTY " + b"EMPTYTBL"
                     + struct.pack("<I", 1) + b"NONE" + struct.pack("<I", 1))
    head[9] = (-sum(head)) % 256
    return bytes(head)


def cost(aml, workdir, label):
    path = os.path.join(workdir, f"{label}.aml")
    with open(path, "wb") as f:
        f.write(aml)
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          "acpiexec", "-b", "quit", path],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    text = out.stdout + out.stderr
    m = re.search(r"Collected : (\d+)", text)
    if out.returncode != 0 or not m:
        raise BenchError(f"acpiexec on {label} failed:\n{text[-2000:]}")
    objects = re.search(r"Namespace contains (\d+)", text)
    if "AE_" in out.stdout and "AE_OK" not in out.stdout:
        log(f"{label}: acpiexec reported: "
            + "; ".join(sorted(set(re.findall(r"AE_[A-Z_]+", out.stdout)))))
    return int(m.group(1)), int(objects.group(1)) if objects else None


def main(argv):
    args = parse_args(argv)
    for tool in ("valgrind", "acpiexec"):
        if not benchlib._which(tool):
            raise BenchError(f"{tool} not found (apt-get install valgrind acpica-tools)")
    benchlib.check_kvm()
    kernel, initramfs, cmdline = benchlib.guest_kit(args.guest_dir, "vmlinux")
    cmds = commands(args, kernel, initramfs, cmdline)
    results = {}
    with tempfile.TemporaryDirectory(prefix="acpi-cost-") as work:
        base, _ = cost(empty_dsdt(), work, "empty")
        for name, cmd in cmds.items():
            log(f"{name}: starting it to copy its DSDT")
            aml = capture(name, cmd, args.timeout)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                with open(os.path.join(args.keep, f"{name}.aml"), "wb") as f:
                    f.write(aml)
            instr, objects = cost(aml, work, name)
            results[name] = {"dsdt_bytes": len(aml), "objects": objects,
                             "load_instructions": instr - base}
    ref = "cloud-hypervisor" if "cloud-hypervisor" in results else None
    print(f"DSDT load cost in ACPICA's acpiexec (instructions beyond an empty DSDT's "
          f"{base:,}; one run, deterministic)")
    head = f"{'':16} {'bytes':>7} {'objects':>8} {'instructions':>14}" + (
        f" {'/CH':>6}" if ref else "")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        line = f"{name:16} {r['dsdt_bytes']:7} {r['objects'] or '-':>8} {r['load_instructions']:14,}"
        if ref:
            r["ratio_to_ch"] = round(r["load_instructions"] / results[ref]["load_instructions"], 3)
            line += f" {r['ratio_to_ch']:6.2f}"
        print(line)
    print(json.dumps({"baseline_instructions": base, "results": results},
                     separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
