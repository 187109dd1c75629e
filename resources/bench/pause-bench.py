#!/usr/bin/python3
"""Pause/resume benchmark: how long arbor takes to pause and resume a guest.

Boots the guest kit under arbor (2 vCPUs by default) with an API socket,
waits for the guest's 'Run /init' line on the console, then pauses and
resumes the VM N times in a row (default 100) over one keep-alive
connection to the API socket: `PUT /api/v1/vm.pause` (answered once every
vCPU has parked), then `PUT /api/v1/vm.resume`. Each request's round trip is
timed; prints n, median, p99, min and max of each (ms), the load average,
and whether every pause answered in under the limit (default 50 ms). Ends
with one line of JSON. Exits non-zero with a message on any failure (a boot
that timed out, a request that did not answer 204). See README.md beside
this file.

Python 3 standard library only.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, log, positive_float, positive_int, quote,
)

benchlib.PROG = "pause-bench"

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="pause-bench.py",
        description="Boot the guest kit under arbor and time N pause/resume round trips "
        "through the API socket.",
        epilog="Times are wall-clock, taken with time.monotonic() around each request on an "
        "open keep-alive connection. See resources/bench/README.md.",
    )
    p.add_argument("--cycles", type=positive_int, default=100,
                   help="pause/resume pairs (default 100)")
    p.add_argument("--limit-ms", type=positive_float, default=50.0, metavar="MS",
                   help="a pause should answer in under this (default 50)")
    return benchlib.parse_arbor_vm_args(p, argv, cpus=2, op_timeout=30.0)


# ---------------------------------------------------------------------------
# arbor
# ---------------------------------------------------------------------------


class Arbor(benchlib.ArborVm):
    def cycles(self, n):
        conn = self.connect()
        pauses, resumes = [], []
        try:
            for _ in range(n):
                pauses.append(self.request(conn, "PUT", "/api/v1/vm.pause")[0])
                resumes.append(self.request(conn, "PUT", "/api/v1/vm.resume")[0])
        finally:
            conn.close()
        return pauses, resumes


# ---------------------------------------------------------------------------
# Statistics and output
# ---------------------------------------------------------------------------


def main(argv):
    args = parse_args(argv)
    kit, binary, others = benchlib.prepare_arbor(args)
    workdir = tempfile.mkdtemp(prefix="pause-bench.")
    vm = Arbor(binary, kit, workdir, args)
    log(" ".join(quote(a) for a in vm.argv))
    try:
        log(f"booting (timeout {args.timeout:g} s)")
        boot_s = vm.boot()
        log(f"'Run /init' after {boot_s:.1f} s; {args.cycles} pause/resume cycles")
        load_start = benchlib.loadavg()
        pauses, resumes = vm.cycles(args.cycles)
        load_end = benchlib.loadavg()
    finally:
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    stats = {"pause_ms": benchlib.describe(pauses), "resume_ms": benchlib.describe(resumes)}
    slow = [round(x, 3) for x in pauses if x >= args.limit_ms]
    ok = not slow
    print()
    print(f"Pause/resume benchmark: {args.kernel} + initramfs.cpio, {args.cpus} vCPU(s), "
          f"{args.memory // MIB} MiB; {args.cycles} cycle(s); times in ms")
    head = f"  {'':18} {'n':>5} {'median':>10} {'p99':>10} {'min':>10} {'max':>10}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for key, title in (("pause_ms", "PUT vm.pause"), ("resume_ms", "PUT vm.resume")):
        s = stats[key]
        print(f"  {title:18} {s['n']:>5} {s['median']:>10.2f} {s['p99']:>10.2f} "
              f"{s['min']:>10.2f} {s['max']:>10.2f}")
    print(f"  load average (1 min): {load_start} at start, {load_end} at end")
    if ok:
        print(f"  every pause answered in under {args.limit_ms:g} ms: yes")
    else:
        print(f"  every pause answered in under {args.limit_ms:g} ms: NO "
              f"({len(slow)} of {len(pauses)} took longer)")
    print()
    kernel, initramfs, cmdline = kit
    out = {
        "arbor": binary,
        "kernel": kernel,
        "kernel_sha256": benchlib.sha256(kernel),
        "initramfs": initramfs,
        "cmdline": cmdline,
        "cpus": args.cpus,
        "memory_mib": args.memory // MIB,
        "cycles": args.cycles,
        "unit": "ms",
        "stats": stats,
        "limit_ms": args.limit_ms,
        "all_pauses_under_limit": ok,
        "slow_pauses_ms": slow,
        "boot_s": round(boot_s, 3),
        "loadavg_at_start": load_start,
        "loadavg_at_end": load_end,
        "other_vmms_at_start": others,
        "command": vm.argv,
        "pause_ms": [round(x, 3) for x in pauses],
        "resume_ms": [round(x, 3) for x in resumes],
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
