#!/usr/bin/env python3
"""API readiness: how soon after a VMM process starts does its control
socket answer?

For arbor: from spawning `arbor --kernel ... --api-socket S` to the first
`GET /api/v1/vmm.ping` answered 200 on S. For QEMU: from spawning
`qemu-system-x86_64 ... -qmp unix:S,server=on,wait=off` to the answer of
`query-version` after `qmp_capabilities`. Both boot the guest kit with the
same kernel, initramfs and command line; runs alternate (arbor, QEMU,
arbor, ...), and each VMM is killed as soon as it answered.

Two clocks per run: the main figure starts in the child just before it
executes the VMM (a timestamp the child writes to a pipe), so it leaves
out this script's own cost of forking; `from spawn` starts before the
fork. Both include the polling (every 0.2 ms) and the request itself; the
`floor` row is `/bin/true` from its exec to its exit, on the same clock.
With
`--ch PATH` a Cloud Hypervisor binary is measured too (its API socket
`--api-socket path=S`, `GET /api/v1/vmm.ping`), for comparison only.

`--pings N` measures something else: the latency of `vmm.ping` with a NEW
connection per request (connect, request, whole answer, close) against
VMMs started with only their API socket (`arbor --api-socket S`;
`cloud-hypervisor --api-socket path=S` with `--ch`), requests alternating
between the VMMs, while `--load K` busy-looping processes (default: one
per CPU) keep the machine loaded. Prints median, p99, min and max per VMM.

Prints median, min and max per VMM, the load average before and after,
the ratio arbor/QEMU (or arbor/CH), then one JSON line. Python 3 standard
library only.
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


def ask_ch(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(path)
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
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
    """Returns (ms from the child's exec, ms from before the fork)."""
    if os.path.exists(sock):
        os.unlink(sock)
    rfd, wfd = os.pipe()

    def stamp():
        # In the child, just before exec: the process start as the VMM sees it.
        os.write(wfd, str(time.perf_counter()).encode())

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, preexec_fn=stamp, pass_fds=(wfd,))
    os.close(wfd)
    try:
        while True:
            try:
                if ask(sock):
                    t = time.perf_counter()
                    t_exec = float(os.read(rfd, 64).decode())
                    return (t - t_exec) * 1000, (t - t0) * 1000
            except OSError:
                pass
            if p.poll() is not None:
                raise BenchError(f"{cmd[0]} exited ({p.returncode}) before answering: "
                                 f"{p.stderr.read().decode(errors='replace')[-2000:]}")
            if time.perf_counter() - t0 > limit:
                raise BenchError(f"{cmd[0]} did not answer on {sock} within {limit} s")
            time.sleep(POLL)
    finally:
        os.close(rfd)
        p.kill()
        p.wait()
        if os.path.exists(sock):
            os.unlink(sock)


def floor():
    """Spawning /bin/true and waiting for it, from its exec (the same clock as the VMMs')."""
    rfd, wfd = os.pipe()

    def stamp():
        os.write(wfd, str(time.perf_counter()).encode())

    subprocess.run(["/bin/true"], check=True, preexec_fn=stamp, pass_fds=(wfd,))
    t = time.perf_counter()
    os.close(wfd)
    t_exec = float(os.read(rfd, 64).decode())
    os.close(rfd)
    return (t - t_exec) * 1000


def ping_new_connection(path, request):
    """One request on a new connection; returns ms from connect to the end of the answer."""
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(2)
        s.connect(path)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if m and len(body) >= int(m[0].split(b":")[1]):
                    break
        if not data.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"unexpected answer on {path}: {data[:200]!r}")
        return (time.perf_counter() - t0) * 1000
    finally:
        s.close()


def busy_loop():
    """A child that spins until killed (one unit of load)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL)


def wait_socket(path, proc, name, limit):
    t0 = time.perf_counter()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise BenchError(f"{name} exited ({proc.returncode}) before creating {path}")
        if time.perf_counter() - t0 > limit:
            raise BenchError(f"{name} did not create {path} within {limit} s")
        time.sleep(0.01)


def pings_mode(a, work):
    vmms = {}
    arbor = benchlib.find_arbor(a.arbor)
    vmms["arbor"] = ([arbor, "--api-socket", os.path.join(work, "arbor.sock")],
                     os.path.join(work, "arbor.sock"),
                     b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: arbor\r\n\r\n")
    if a.baseline:
        sock = os.path.join(work, "baseline.sock")
        vmms["baseline"] = ([a.baseline, "--api-socket", sock], sock,
                            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: arbor\r\n\r\n")
    if a.ch:
        sock = os.path.join(work, "ch.sock")
        vmms["ch"] = ([a.ch, "--api-socket", f"path={sock}"], sock,
                      b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
    for name, (cmd, _, _) in vmms.items():
        log(f"{name}: {' '.join(benchlib.quote(c) for c in cmd)}")
    procs, load = {}, []
    try:
        for name, (cmd, sock, _) in vmms.items():
            procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_socket(sock, procs[name], name, a.timeout)
        load = [busy_loop() for _ in range(a.load)]
        time.sleep(1)  # let the load start
        load_before = benchlib.loadavg()
        results = {name: [] for name in vmms}
        for _ in range(a.warmup):
            for name, (_, sock, req) in vmms.items():
                ping_new_connection(sock, req)
        for i in range(a.pings):
            for name, (_, sock, req) in vmms.items():
                results[name].append(ping_new_connection(sock, req))
                time.sleep(a.gap / 1000)
            if (i + 1) % 500 == 0:
                log(f"{i + 1}/{a.pings} pings")
        load_after = benchlib.loadavg()
    finally:
        for p in load:
            p.kill()
            p.wait()
        for name, p in procs.items():
            p.kill()
            p.wait()
        for _, sock, _ in vmms.values():
            if os.path.exists(sock):
                os.unlink(sock)
    summary = {n: benchlib.describe(v) for n, v in results.items()}
    print(f"vmm.ping, new connection per request, {a.pings} per VMM, interleaved, "
          f"{a.load} busy loops")
    print(f"{'':8} {'median ms':>10} {'p99':>8} {'min':>8} {'max':>8}")
    for n, d in summary.items():
        print(f"{n:8} {d['median']:10.3f} {d['p99']:8.3f} {d['min']:8.3f} {d['max']:8.3f}")
    ratio = None
    if "baseline" in summary:
        print(f"arbor/baseline (p99): {summary['arbor']['p99'] / summary['baseline']['p99']:.2f}")
    if "ch" in summary:
        ratio = summary["arbor"]["p99"] / summary["ch"]["p99"]
        print(f"arbor/ch (p99): {ratio:.2f}")
    print(f"load average: {load_before} before, {load_after} after")
    print(json.dumps({"mode": "pings", "pings": a.pings, "load": a.load, "results": summary,
                      "ratio_arbor_ch_p99": ratio, "load_before": load_before,
                      "load_after": load_after}))
    return 0


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=benchlib.positive_int, default=15)
    p.add_argument("--only", choices=("arbor", "qemu"))
    p.add_argument("--arbor")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--baseline", metavar="PATH",
                   help="another arbor build, measured the same way (an A/B comparison)")
    p.add_argument("--ch", metavar="PATH", help="a Cloud Hypervisor binary to compare with")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir())
    p.add_argument("--timeout", type=benchlib.positive_float, default=10.0)
    p.add_argument("--pings", type=benchlib.nonnegative_int, default=0, metavar="N",
                   help="measure vmm.ping with a new connection per request, N per VMM")
    p.add_argument("--load", type=benchlib.nonnegative_int, default=os.cpu_count() or 1,
                   metavar="K", help="busy loops running during --pings (one per CPU)")
    p.add_argument("--warmup", type=benchlib.nonnegative_int, default=20,
                   help="unmeasured pings first (--pings)")
    p.add_argument("--gap", type=benchlib.nonnegative_float, default=1.0, metavar="MS",
                   help="pause after each ping (--pings; 1 ms)")
    a = p.parse_args(argv)
    work = f"/tmp/api-ready-bench-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    try:
        if a.pings:
            return pings_mode(a, work)
        return ready_mode(a, work)
    finally:
        for f in os.listdir(work):
            os.unlink(os.path.join(work, f))
        os.rmdir(work)


def ready_mode(a, work):
    benchlib.check_kvm()
    kernel, initramfs, cmdline = benchlib.guest_kit(a.guest_dir, "vmlinux")
    cmds = {}
    if a.only != "qemu":
        arbor = benchlib.find_arbor(a.arbor)
        sock = os.path.join(work, "arbor.sock")
        cmds["arbor"] = ([arbor, "--kernel", kernel, "--initramfs", initramfs, "--cmdline",
                          cmdline, "--serial", "off", "--api-socket", sock], sock, ask_arbor)
    if a.baseline and a.only != "qemu":
        sock = os.path.join(work, "baseline.sock")
        cmds["baseline"] = ([a.baseline] + cmds["arbor"][0][1:-1] + [sock], sock, ask_arbor)
    if a.ch and a.only != "qemu":
        sock = os.path.join(work, "ch.sock")
        cmds["ch"] = ([a.ch, "--kernel", kernel, "--initramfs", initramfs, "--cmdline", cmdline,
                       "--cpus", "boot=1", "--memory", "size=512M", "--serial", "null",
                       "--console", "off", "--api-socket", f"path={sock}"], sock, ask_ch)
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
    spawn = {name: [] for name in cmds}
    results["floor"] = []
    for i in range(a.runs):
        for name, (cmd, sock, ask) in cmds.items():
            from_exec, from_spawn = one(cmd, sock, ask, a.timeout)
            results[name].append(from_exec)
            spawn[name].append(from_spawn)
        results["floor"].append(floor())
        log(f"run {i + 1}/{a.runs}: " + ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in results.items()))
    load_after = benchlib.loadavg()
    summary = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
               for n, v in results.items()}
    for n, v in spawn.items():
        summary[n]["median_from_spawn_ms"] = statistics.median(v)
    print("from the VMM's exec to the answer (floor: /bin/true from its exec to its exit)")
    print(f"{'':8} {'median ms':>10} {'min':>8} {'max':>8} {'from spawn':>11}")
    for n, s in summary.items():
        extra = f"{s['median_from_spawn_ms']:11.2f}" if "median_from_spawn_ms" in s else ""
        print(f"{n:8} {s['median_ms']:10.2f} {s['min_ms']:8.2f} {s['max_ms']:8.2f} {extra}")
    ratio = None
    if "arbor" in summary and "qemu" in summary:
        ratio = summary["arbor"]["median_ms"] / summary["qemu"]["median_ms"]
        print(f"arbor/qemu (medians): {ratio:.3f}")
    if "arbor" in summary and "baseline" in summary:
        print(f"arbor/baseline (medians): "
              f"{summary['arbor']['median_ms'] / summary['baseline']['median_ms']:.3f}")
    ratio_ch = None
    if "arbor" in summary and "ch" in summary:
        ratio_ch = summary["arbor"]["median_ms"] / summary["ch"]["median_ms"]
        print(f"arbor/ch (medians): {ratio_ch:.3f}")
    print(f"load average: {load_before} before, {load_after} after; {a.runs} runs, interleaved")
    print(json.dumps({"runs": a.runs, "results": summary, "ratio_arbor_qemu": ratio,
                      "ratio_arbor_ch": ratio_ch, "load_before": load_before,
                      "load_after": load_after}))
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
