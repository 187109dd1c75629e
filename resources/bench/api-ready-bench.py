#!/usr/bin/env python3
"""API readiness: how soon after a VMM process starts does its control
socket answer?

For arbor: from spawning `arbor --kernel ... --api-socket S` to the first
`GET /api/v1/vmm.ping` answered 200 on S. For QEMU: from spawning
`qemu-system-x86_64 ... -qmp unix:S,server=on,wait=off` to the answer of
`query-version` after `qmp_capabilities`. Both boot the guest kit with the
same kernel, initramfs and command line; runs alternate (arbor, QEMU,
arbor, ...), and each VMM is killed as soon as it answered. The figure
includes this script's own cost of spawning a process and polling (it
polls every 0.2 ms); the `floor` row measures that cost alone, spawning
`/bin/true` and waiting for it.

Prints median, min and max per VMM, the load average before and after,
the ratio arbor/QEMU, then one JSON line. Python 3 standard library only.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import BenchError, log  # noqa: E402

benchlib.PROG = "api-ready-bench"

POLL = 0.0002


def ask_arbor(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(path)
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: arbor\r\n\r\n")
        return s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        s.close()


def ask_qemu(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(path)
        f = s.makefile("rwb")
        if b"QMP" not in f.readline():
            return False
        for cmd in (b'{"execute":"qmp_capabilities"}\n', b'{"execute":"query-version"}\n'):
            f.write(cmd)
            f.flush()
            if b"return" not in f.readline():
                return False
        return True
    finally:
        s.close()


def one(cmd, sock, ask, limit):
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        while True:
            try:
                if ask(sock):
                    return (time.perf_counter() - t0) * 1000
            except OSError:
                pass
            if p.poll() is not None:
                raise BenchError(f"{cmd[0]} exited ({p.returncode}) before answering: "
                                 f"{p.stderr.read().decode(errors='replace')[-2000:]}")
            if time.perf_counter() - t0 > limit:
                raise BenchError(f"{cmd[0]} did not answer on {sock} within {limit} s")
            time.sleep(POLL)
    finally:
        p.kill()
        p.wait()
        if os.path.exists(sock):
            os.unlink(sock)


def floor():
    t0 = time.perf_counter()
    subprocess.run(["/bin/true"], check=True)
    return (time.perf_counter() - t0) * 1000


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=benchlib.positive_int, default=15)
    p.add_argument("--only", choices=("arbor", "qemu"))
    p.add_argument("--arbor")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir())
    p.add_argument("--timeout", type=benchlib.positive_float, default=10.0)
    a = p.parse_args(argv)
    benchlib.check_kvm()
    kernel, initramfs, cmdline = benchlib.guest_kit(a.guest_dir, "vmlinux")
    work = f"/tmp/api-ready-bench-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    cmds = {}
    if a.only != "qemu":
        arbor = benchlib.find_arbor(a.arbor)
        sock = os.path.join(work, "arbor.sock")
        cmds["arbor"] = ([arbor, "--kernel", kernel, "--initramfs", initramfs, "--cmdline",
                          cmdline, "--serial", "off", "--api-socket", sock], sock, ask_arbor)
    if a.only != "arbor":
        qemu = benchlib.find_qemu(a.qemu)
        sock = os.path.join(work, "qmp.sock")
        cmds["qemu"] = ([qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "512M",
                         "-smp", "1", "-nographic", "-nodefaults", "-no-reboot", "-serial", "null",
                         "-kernel", kernel, "-initrd", initramfs, "-append", cmdline,
                         "-qmp", f"unix:{sock},server=on,wait=off"], sock, ask_qemu)
    for name, (cmd, _, _) in cmds.items():
        log(f"{name}: {' '.join(benchlib.quote(c) for c in cmd)}")
    load_before = benchlib.loadavg()
    results = {name: [] for name in cmds}
    results["floor"] = []
    for i in range(a.runs):
        for name, (cmd, sock, ask) in cmds.items():
            results[name].append(one(cmd, sock, ask, a.timeout))
        results["floor"].append(floor())
        log(f"run {i + 1}/{a.runs}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in results.items()))
    load_after = benchlib.loadavg()
    os.rmdir(work)
    summary = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
               for n, v in results.items()}
    print(f"{'':8} {'median ms':>10} {'min':>8} {'max':>8}")
    for n, s in summary.items():
        print(f"{n:8} {s['median_ms']:10.2f} {s['min_ms']:8.2f} {s['max_ms']:8.2f}")
    ratio = None
    if "arbor" in summary and "qemu" in summary:
        ratio = summary["arbor"]["median_ms"] / summary["qemu"]["median_ms"]
        print(f"arbor/qemu (medians): {ratio:.3f}")
    print(f"load average: {load_before} before, {load_after} after; {a.runs} runs, interleaved")
    print(json.dumps({"runs": a.runs, "results": summary, "ratio_arbor_qemu": ratio,
                      "load_before": load_before, "load_after": load_after}))
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
