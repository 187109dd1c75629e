#!/usr/bin/python3
"""Vsock benchmark: throughput and host CPU cost of arbor's virtio-vsock.

Boots the guest kit's user-space initramfs (busybox, arbor-guest) under
arbor with a cold-plugged `--vsock cid=3,socket=DIR/v.sock` and the shell on
the serial console. Then, RUNS times, interleaved:

- host to guest: the host listens on DIR/v.sock_6000; the guest runs
  `arbor-guest vsock-connect 2 6000 BYTES recv`; the host writes BYTES and
  closes its side; the run ends when the guest's side closes (it read all);
- guest to host: the host listens on DIR/v.sock_6001; the guest runs
  `arbor-guest vsock-connect 2 6001 BYTES send`; the run ends at EOF on the
  host, which counts and checks the bytes.

Each run is timed from the host's accept to its end; arbor's CPU time
(utime + stime from /proc/PID/stat) is read around it. Prints MB/s and host
CPU seconds per GiB moved (median, min, max per direction), the load
average before and after, and one line of JSON. Python 3 standard library
only. See README.md beside this file.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, BenchError, Stream, StreamEof, StreamTimeout, describe, loadavg, log, parse_size,
    positive_float, positive_int,
)

benchlib.PROG = "vsock-bench"
SHELL_READY = "arbor-guest: shell on ttyS0"
TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="vsock-bench.py",
        description="Throughput and host CPU per GiB of arbor's virtio-vsock, both directions.")
    p.add_argument("--runs", type=positive_int, default=3, help="runs per direction (default 3)")
    p.add_argument("--bytes", type=parse_size, default=16 * MIB, metavar="SIZE",
                   help="bytes per run, a multiple of 4096 (default 16M)")
    p.add_argument("--arbor", required=True, metavar="PATH", help="arbor binary")
    p.add_argument("--guest-dir", default=benchlib.default_guest_dir(),
                   help="guest kit directory (default $ARBOR_GUEST_DIR or <repo>/target/guest)")
    p.add_argument("--timeout", type=positive_float, default=400.0, metavar="SECONDS",
                   help="boot to shell, and each run, may take this long (default 400)")
    args = p.parse_args(argv)
    if args.bytes % 4096:
        p.error("--bytes must be a multiple of 4096")
    return args


def cpu_seconds(pid, thread=None):
    """CPU time of process PID (utime + stime from /proc/PID/stat, in clock
    ticks), or of its threads named THREAD (the scheduler's nanosecond count,
    /proc/PID/task/TID/schedstat; 0 if none)."""
    if thread:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() != thread:
                        continue
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command: state is index 0, utime 11, stime 12.
    return (int(fields[11]) + int(fields[12])) / TICK


def one_run(proc, sock_path, port, nbytes, direction, timeout):
    path = f"{sock_path}_{port}"
    if os.path.exists(path):
        os.unlink(path)
    lsn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsn.bind(path)
    lsn.listen(1)
    lsn.settimeout(timeout)
    mode = "recv" if direction == "h2g" else "send"
    proc.stdin.write(f"arbor-guest vsock-connect 2 {port} {nbytes} {mode} >/dev/null 2>&1 &\n"
                     .encode())
    proc.stdin.flush()
    try:
        conn, _ = lsn.accept()
    except socket.timeout:
        raise BenchError(f"{direction}: the guest did not connect within {timeout:g} s")
    finally:
        lsn.close()
        os.unlink(path)
    conn.settimeout(timeout)
    cpu0 = cpu_seconds(proc.pid)
    w0 = cpu_seconds(proc.pid, "virtio-vsock")
    t0 = time.monotonic()
    moved = 0
    if direction == "h2g":
        chunk = bytes(range(256)) * 256
        while moved < nbytes:
            n = min(len(chunk), nbytes - moved)
            conn.sendall(chunk[:n])
            moved += n
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    else:
        while True:
            b = conn.recv(1 << 20)
            if not b:
                break
            moved += len(b)
        if moved != nbytes:
            raise BenchError(f"g2h: got {moved} bytes, expected {nbytes}")
    secs = time.monotonic() - t0
    cpu = cpu_seconds(proc.pid) - cpu0
    wcpu = cpu_seconds(proc.pid, "virtio-vsock") - w0
    conn.close()
    mbps = moved / MIB / secs
    gib = moved / (1 << 30)
    log(f"{direction}: {moved} bytes in {secs:.2f} s = {mbps:.2f} MB/s; "
        f"arbor CPU {cpu:.2f} s ({cpu / gib:.1f} s/GiB), of which the vsock worker "
        f"{wcpu:.2f} s ({wcpu / gib:.1f} s/GiB)")
    return mbps, cpu / gib, wcpu / gib


def main(argv):
    args = parse_args(argv)
    kernel, _, cmdline = benchlib.guest_kit(args.guest_dir, "vmlinux")
    initramfs = os.path.join(args.guest_dir, "initramfs-user.cpio")
    if not os.path.isfile(initramfs):
        raise BenchError(f"{initramfs} missing (resources/guest-kit/build.sh builds it)")
    work = tempfile.mkdtemp(prefix="vsock-bench-")
    sock = os.path.join(work, "v.sock")
    argv_vm = [args.arbor, "--kernel", kernel, "--initramfs", initramfs, "--cmdline", cmdline,
               "--vsock", f"cid=3,socket={sock}", "--allow-path", work]
    load_before = loadavg()
    proc = subprocess.Popen(argv_vm, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
    console = Stream(proc.stdout)
    errors = Stream(proc.stderr)
    results = {"h2g": [], "g2h": []}
    try:
        try:
            console.wait_for(lambda line: SHELL_READY in line, 0,
                             time.monotonic() + args.timeout)
        except (StreamTimeout, StreamEof):
            time.sleep(0.5)
            raise BenchError("no shell on the guest's console; arbor's stderr:\n"
                             + benchlib.tail_lines(errors.text(), 15))
        time.sleep(2.0)
        for i in range(args.runs):
            for d, port in (("h2g", 6000), ("g2h", 6001)):
                log(f"run {i + 1}/{args.runs}, {d}")
                results[d].append(one_run(proc, sock, port, args.bytes, d, args.timeout))
    finally:
        benchlib.stop(proc, 5.0)
        shutil.rmtree(work, ignore_errors=True)
    load_after = loadavg()
    summary = {"bytes": args.bytes, "runs": args.runs, "load_before": load_before,
               "load_after": load_after}
    for d, rs in results.items():
        summary[d] = {"mb_per_s": describe([r[0] for r in rs]),
                      "cpu_s_per_gib": describe([r[1] for r in rs]),
                      "worker_cpu_s_per_gib": describe([r[2] for r in rs])}
        m, c = summary[d]["mb_per_s"], summary[d]["cpu_s_per_gib"]
        w = summary[d]["worker_cpu_s_per_gib"]
        print(f"{d}: MB/s median {m['median']} min {m['min']} max {m['max']}; "
              f"arbor CPU s/GiB median {c['median']} min {c['min']} max {c['max']} "
              f"(vsock worker thread: median {w['median']} min {w['min']} max {w['max']})")
    print(f"load average before {load_before}, after {load_after}")
    print(json.dumps(summary))


if __name__ == "__main__":
    benchlib.run_main(main)
