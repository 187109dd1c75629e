#!/usr/bin/env python3
"""Guest-side cost of a BAR access, mapped straight into the guest against
trapped: one guest (the kit's user-space initramfs) with the project's
vfio-user server `arbor-test-vfio-user-blk --bar2-file` cold-plugged. Its
BAR 2 is mmap-able, so the VMM makes it a KVM memory slot; BAR 0 (the
virtio registers) is trapped and each access forwarded to the server.
`arbor-guest bar-time` times N 4-byte reads of each from guest user space
(an mmap of the function's sysfs resourceN), ROUNDS rounds interleaved
(mapped, trapped, mapped, trapped, ...). Prints the median/min/max
nanoseconds per read of each, their ratio, the load average at start and
end, whether any mapped read reached the server (it must not), and a JSON
line.

Usage: bar-access-bench.py [--rounds N] [--mapped-reads N] [--trapped-reads N]
                           [--server PATH] [arbor/guest options, see --help]
arbor: --arbor PATH, else target/release/arbor, else target/debug/arbor
(a warning says so). The server: --server PATH, else
target/{release,debug}/arbor-test-vfio-user-blk (`cargo build -p
arbor-tests`). Standard library only; progress on stderr.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import BenchError, log, positive_int  # noqa: E402

# The guest shell driver of blk-bench.py (one command line at a time on the
# serial console, between unique markers).
blk_bench = benchlib.load_script("blk-bench.py", "blk_bench")
benchlib.PROG = "bar-access-bench"


def find_server(explicit):
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise BenchError(f"--server {explicit}: not an executable file")
        return os.path.abspath(explicit)
    for kind in ("release", "debug"):
        p = os.path.join(benchlib.target_dir(), kind, "arbor-test-vfio-user-blk")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise BenchError("no arbor-test-vfio-user-blk: run 'cargo build -p arbor-tests' or give --server")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bar-access-bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--mapped-reads", type=positive_int, default=1_000_000,
                   help="reads of the mapped BAR per round (default 1000000)")
    p.add_argument("--trapped-reads", type=positive_int, default=1000,
                   help="reads of the trapped BAR per round (default 1000)")
    p.add_argument("--server", metavar="PATH", help="the arbor-test-vfio-user-blk binary")
    return benchlib.parse_arbor_vm_args(p, argv, cpus=1, op_timeout=300.0, settle=False,
                                        timeout_what="reach 'Run /init'")


def ns_per_read(shell, pci_path, bar, count, limit):
    cmd = f"arbor-guest bar-time {pci_path} {bar} 0x0 {count}"
    status, out, _, _ = shell.run(cmd, limit)
    if status != 0:
        raise shell.vm.fail(f"'{cmd}' exited with status {status}:\n{benchlib.tail_lines(out, 10)}")
    kv = blk_bench.key_values(out)
    if "ns_per_read" not in kv:
        raise shell.vm.fail(f"'{cmd}' printed no ns_per_read=:\n{benchlib.tail_lines(out, 10)}")
    return float(kv["ns_per_read"])


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv):
    args = parse_args(argv)
    benchlib.check_kvm()
    arbor = benchlib.find_arbor(args.arbor)
    server = find_server(args.server)
    kernel, _, cmdline = benchlib.guest_kit(args.guest_dir, args.kernel)
    initramfs = os.path.join(args.guest_dir, "initramfs-user.cpio")
    if not os.path.isfile(initramfs):
        raise BenchError(f"{initramfs} missing: run resources/guest-kit/build.sh")
    load0 = benchlib.loadavg()
    with tempfile.TemporaryDirectory(prefix="bar-access-bench-") as work:
        sock = os.path.join(work, "blk.sock")
        disk = os.path.join(work, "disk.img")
        bar2 = os.path.join(work, "bar2")
        srv_log = os.path.join(work, "server.log")
        with open(disk, "wb") as f:
            f.truncate(8 << 20)
        with open(srv_log, "wb") as out:
            srv = subprocess.Popen([server, "--socket", sock, "--disk", disk, "--bar2-file", bar2],
                                   stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        vm = None
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{server} did not start listening on {sock}")
                time.sleep(0.02)
            args.arbor_extra = args.arbor_extra + ["--user-device", f"socket={sock},id=bar"]
            vm = benchlib.ArborVm(arbor, (kernel, initramfs, cmdline), work, args, console_input=True)
            log(f"booting {arbor} with {server}")
            vm.boot()
            try:
                vm.console.wait_for(lambda l: blk_bench.SHELL_READY in l, 0,
                                    time.monotonic() + args.op_timeout, blk_bench.MARK_FATAL)
            except benchlib.StreamTimeout:
                raise vm.fail("the guest's shell did not start")
            shell = blk_bench.Shell(vm)
            shell.run("dmesg -n 1", args.op_timeout)
            conn = vm.connect()
            _, body = vm.request(conn, "GET", "/api/v1/vm.info", expect=(200,))
            conn.close()
            devices = [d for d in json.loads(body)["devices"] if d.get("id") == "bar"]
            if not devices:
                raise vm.fail("vm.info lists no device 'bar'")
            path = devices[0]["pci_path"]
            status, out, _, _ = shell.run(f"arbor-guest wait-device {path} 120", args.op_timeout)
            if status != 0:
                raise vm.fail(f"the function at {path} got no driver:\n{out}")
            mapped, trapped, leaked = [], [], 0
            for r in range(args.rounds):
                mark = os.path.getsize(srv_log)
                mapped.append(ns_per_read(shell, path, 2, args.mapped_reads, args.op_timeout))
                with open(srv_log, errors="replace") as f:
                    f.seek(mark)
                    leaked += sum(1 for l in f if "bar2 " in l)
                trapped.append(ns_per_read(shell, path, 0, args.trapped_reads, args.op_timeout))
                log(f"round {r + 1}: mapped {mapped[-1]:.2f} ns, trapped {trapped[-1]:.0f} ns per read")
        finally:
            if vm is not None:
                vm.stop()
            benchlib.stop(srv, 5.0)
    load1 = benchlib.loadavg()
    m, t = summary(mapped), summary(trapped)
    print(f"load average at start {load0}, at end {load1}")
    print(f"arbor: {arbor}")
    print(f"{'4-byte guest read':20} {'median ns':>12} {'min':>12} {'max':>12}  ({args.rounds} rounds)")
    print(f"{'mapped (BAR 2)':20} {m['median']:12.2f} {m['min']:12.2f} {m['max']:12.2f}")
    print(f"{'trapped (BAR 0)':20} {t['median']:12.0f} {t['min']:12.0f} {t['max']:12.0f}")
    if m["median"] > 0:
        print(f"trapped / mapped (medians): {t['median'] / m['median']:.0f}x")
    print(f"BAR 2 accesses that reached the server during the mapped runs: {leaked}")
    print(json.dumps({"mapped_ns": mapped, "trapped_ns": trapped, "mapped_reads": args.mapped_reads,
                      "trapped_reads": args.trapped_reads, "server_saw": leaked,
                      "load_start": load0, "load_end": load1}))
    return 1 if leaked else 0


if __name__ == "__main__":
    benchlib.run_main(main)
