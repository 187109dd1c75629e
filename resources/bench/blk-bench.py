#!/usr/bin/env python3
"""blk-bench.py: guest user space and virtio-blk under arbor and under QEMU.

Boots the guest kit's kernel with its user-space initramfs
(initramfs-user.cpio: busybox, arbor-guest, a shell on ttyS0) under arbor and
under QEMU (q35, virtio-blk-pci), alternately (arbor, QEMU, arbor, QEMU, ...),
each with the same raw image file cold-plugged, and measures per boot:

  - the time from starting the VMM to the guest shell answering a first
    command (`true`, between markers, over the serial console);
  - the round trip of one command over the serial console (median of
    --round-trips `true` commands);
  - `arbor-guest blk-write /dev/vda SEED BYTES` and `blk-verify` throughput:
    the MiB/s arbor-guest measures in the guest (its mb_per_s=, timed with
    the guest's clock around the I/O loop and fsync), and the same bytes over
    the host-measured time of the whole command (send to end marker).

Before each boot the image is rewritten with zeros; after the boot the host
checks that its SHA-256 equals that of the pattern of SEED (computed on the
host, independently of arbor-guest), so every VMM really wrote every byte.

Prints a table (median, min-max over the runs, ratio arbor/QEMU of the
medians) and one line of JSON. Exits non-zero on any arbor failure; a QEMU
failure is reported and the arbor numbers are still printed. See README.md
beside this file.

Python 3 standard library only.
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    MIB, BenchError, log, parse_size, positive_int, positive_float,
    other_guests, loadavg, stop, tail_lines, Stream, StreamEof, StreamFatal, StreamTimeout,
)

benchlib.PROG = "blk-bench"

# Printed by the user-space initramfs once the shell on ttyS0 reads input
# (resources/guest-kit/build.sh, its inittab).
SHELL_READY = "arbor-guest: shell on ttyS0"
MARK_INIT = "Run /init as init process"
MARK_FATAL = ("Kernel panic",)
DEVICE = "/dev/vda"
QEMU_CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")


# ---------------------------------------------------------------------------
# Arguments and inputs
# ---------------------------------------------------------------------------


def parse_seed(s):
    try:
        n = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed '{s}': expected an integer, e.g. 42 or 0x5eed")
    if not 0 <= n < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed {s} is not a 64-bit unsigned integer")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="blk-bench.py",
        description="Boot the guest kit's user-space initramfs under arbor and under QEMU "
        "(interleaved) with the same raw image cold-plugged, and compare the time to the "
        "first shell command, one serial-console command round trip, and arbor-guest "
        "blk-write/blk-verify throughput (median, min, max of N runs).",
        epilog="Run it under 'flock /tmp/arbor-guest.lock' on a shared machine. "
        "See resources/bench/README.md.",
    )
    p.add_argument("--runs", type=positive_int, default=3, help="boots per VMM (default 3)")
    p.add_argument("--only", choices=("arbor", "qemu"), help="benchmark one VMM only")
    p.add_argument("--round-trips", type=positive_int, default=20, metavar="N",
                   help="trivial commands ('true') timed per boot (default 20)")
    p.add_argument("--bytes", type=parse_size, default=64 * MIB, metavar="SIZE",
                   help="bytes blk-write/blk-verify move, also the image's size "
                   "(default 64M = 67108864)")
    p.add_argument("--seed", type=parse_seed, default=0x5EED, metavar="N",
                   help="pattern seed (default 0x5eed)")
    p.add_argument("--io-timeout", type=positive_float, default=900.0, metavar="SECONDS",
                   help="seconds blk-write or blk-verify may take (default 900)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where the scratch directory with the image is made "
                   "(default: the system's temporary directory; use a disk, not tmpfs)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                   help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--qemu-machine", default="q35", metavar="MACHINE",
                   help="QEMU -machine value (default q35)")
    p.add_argument("--qemu-cpu", default="host", metavar="MODEL",
                   help="QEMU -cpu value (default host, like arbor: the CPUID KVM supports)")
    p.add_argument("--qemu-cache", choices=QEMU_CACHE_MODES, default="writeback",
                   help="QEMU -drive cache= mode (default writeback, arbor's semantics: the host "
                   "page cache, the guest sees a volatile write cache and its flushes become "
                   "fdatasync; 'none' adds O_DIRECT on the host)")
    return benchlib.parse_arbor_vm_args(p, argv, cpus=1, op_timeout=120.0, settle=False,
                                        timeout_what="answer its first shell command")


def user_kit(args):
    """(kernel, initramfs-user.cpio, cmdline) of the guest kit."""
    kernel, _, cmdline = benchlib.guest_kit(args.guest_dir, args.kernel)
    initramfs = os.path.join(args.guest_dir, "initramfs-user.cpio")
    if not os.path.isfile(initramfs):
        raise BenchError(f"{initramfs} missing: install busybox-static "
                         "(resources/guest-kit/install-deps.sh), then run resources/guest-kit/build.sh")
    return kernel, initramfs, cmdline


# ---------------------------------------------------------------------------
# The data pattern (resources/arbor-guest/src/lib.rs), computed on the host
# ---------------------------------------------------------------------------


M64 = (1 << 64) - 1


def pattern_sha256(seed, nbytes):
    """SHA-256 of the first NBYTES bytes of the pattern of SEED: 64-bit
    little-endian words, word i = splitmix64(seed + i)."""
    h = hashlib.sha256()
    words = 1 << 17  # 1 MiB at a time
    pack = struct.Struct("<Q").pack_into
    buf = bytearray(words * 8)
    for start in range(0, nbytes // 8, words):
        n = min(words, nbytes // 8 - start)
        for i in range(n):
            z = (seed + start + i + 0x9E3779B97F4A7C15) & M64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            pack(buf, i * 8, z ^ (z >> 31))
        h.update(memoryview(buf)[:n * 8])
    return h.hexdigest()


def zero_image(path, nbytes):
    """(Re)writes PATH as NBYTES zero bytes, allocated (not sparse), synced."""
    block = bytes(MIB)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# VMMs
# ---------------------------------------------------------------------------


class QemuVm:
    """QEMU booting the guest kit with the guest's serial console on its
    standard input and output; the interface of benchlib.ArborVm that the
    benchmark uses (boot, fail, stop, proc, console, t_start)."""

    def __init__(self, argv, opts):
        self.argv = argv
        self.opts = opts
        self.proc = None
        self.console = None
        self.stderr = None
        self.t_start = None

    def fail(self, what):
        return benchlib.vmm_failure("qemu", self, what)

    def boot(self):
        """Starts QEMU and waits for 'Run /init'; returns seconds to it."""
        t_start = self.t_start = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        except OSError as e:
            raise BenchError(f"cannot start {self.argv[0]}: {e}")
        self.console = Stream(self.proc.stdout)
        self.stderr = Stream(self.proc.stderr)
        try:
            _, t, _, _ = self.console.wait_for(lambda line: MARK_INIT in line, 0,
                                               t_start + self.opts.timeout, MARK_FATAL)
        except StreamTimeout:
            raise self.fail(f"timeout: no '{MARK_INIT}' within {self.opts.timeout:g} s")
        except StreamEof:
            raise self.fail(f"the console closed before '{MARK_INIT}'")
        except StreamFatal as e:
            time.sleep(1.0)
            raise self.fail(f"the guest failed ('{e.args[0]}') before '{MARK_INIT}'")
        return t - t_start

    def stop(self):
        if self.proc is None:
            return
        try:
            stop(self.proc, self.opts.stop_grace)
        finally:
            for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    s.close()
                except OSError:
                    pass


class Shell:
    """Commands through the guest's shell on ttyS0, as tests/src/lib.rs
    Guest::try_run does: `echo AR''BOR-B-TAG; { CMD\\n} 2>&1; echo
    AR''BOR-E-TAG-$?` (the quotes keep an echo of the input from matching
    the markers; the shell runs with `stty -echo` anyway)."""

    def __init__(self, vm):
        self.vm = vm
        self.n = 0
        self.nonce = secrets.token_hex(3)

    def run(self, cmd, limit):
        """Runs CMD; returns (status, output, seconds from sending the line to
        the arrival of the end marker, time.monotonic() of that arrival).
        Raises BenchError on timeout or when the VMM exits."""
        self.n += 1
        tag = f"{self.nonce}-{self.n}"
        begin, end = f"ARBOR-B-{tag}", f"ARBOR-E-{tag}-"
        line = f"echo AR''BOR-B-{tag}; {{ {cmd}\n}} 2>&1; echo AR''BOR-E-{tag}-$?\n".encode()
        console = self.vm.console
        mark = console.mark()
        t0 = time.monotonic()
        try:
            self.vm.proc.stdin.write(line)
        except OSError as e:
            raise self.vm.fail(f"writing '{cmd}' to the guest's console: {e}")
        deadline = t0 + limit
        try:
            i, _, _, _ = console.wait_for(lambda l: begin in l, mark, deadline, MARK_FATAL)
            j, t1, last, _ = console.wait_for(lambda l: end in l, i + 1, deadline, MARK_FATAL)
        except StreamTimeout:
            raise self.vm.fail(f"no answer to '{cmd}' within {limit:g} s")
        except StreamEof:
            raise self.vm.fail(f"the console closed while running '{cmd}'")
        except StreamFatal as e:
            time.sleep(1.0)
            raise self.vm.fail(f"the guest failed ('{e.args[0]}') while running '{cmd}'")
        head, _, status = last.partition(end)
        try:
            status = int(status.strip())
        except ValueError:
            raise self.vm.fail(f"bad exit status '{status}' for '{cmd}'")
        with console.cond:
            out = [text for _, text in console.lines[i + 1:j]]
        if head:
            out.append(head)
        return status, "\n".join(out), t1 - t0, t1


def key_values(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.strip().partition("=")
        if sep and k and " " not in k:
            out[k] = v
    return out


# ---------------------------------------------------------------------------
# One boot
# ---------------------------------------------------------------------------


def blk(shell, op, args):
    """arbor-guest blk-write or blk-verify of the whole image; returns a dict."""
    cmd = f"arbor-guest {op} {DEVICE} {args.seed} {args.bytes}"
    status, out, secs, _ = shell.run(cmd, args.io_timeout)
    if status != 0:
        raise shell.vm.fail(f"'{cmd}' exited with status {status}:\n{tail_lines(out, 10)}")
    kv = key_values(out)
    try:
        nbytes, ms, guest_mibs = int(kv["bytes"]), int(kv["ms"]), float(kv["mb_per_s"])
        checksum = kv["checksum"]
    except (KeyError, ValueError):
        raise shell.vm.fail(f"'{cmd}' printed no bytes=, ms=, mb_per_s=, checksum=:\n{tail_lines(out, 10)}")
    if nbytes != args.bytes:
        raise shell.vm.fail(f"'{cmd}' moved {nbytes} bytes, not {args.bytes}")
    return {
        "guest_mibs": round(guest_mibs, 3),
        "guest_ms": ms,
        "host_s": round(secs, 3),
        "host_mibs": round(args.bytes / MIB / secs, 3),
        "checksum": checksum,
    }


def boot_once(vm, image, args, expected_sha):
    """Boots VM (its image is zeroed already), measures, stops it and checks
    the image. Returns a dict of measurements or raises BenchError."""
    others = other_guests(os.getpid())
    load = loadavg()
    try:
        init_s = vm.boot()
        deadline = vm.t_start + args.timeout
        try:
            vm.console.wait_for(lambda l: SHELL_READY in l, 0, deadline, MARK_FATAL)
        except StreamTimeout:
            raise vm.fail(f"no '{SHELL_READY}' within {args.timeout:g} s of the start")
        except StreamEof:
            raise vm.fail(f"the console closed before '{SHELL_READY}'")
        except StreamFatal as e:
            time.sleep(1.0)
            raise vm.fail(f"the guest failed ('{e.args[0]}') before its shell started")
        shell = Shell(vm)
        status, _, _, t_answer = shell.run("true", max(1.0, deadline - time.monotonic()))
        first_s = t_answer - vm.t_start
        if status != 0:
            raise vm.fail(f"the first command 'true' exited with status {status}")

        # Kernel messages on the console would land in the commands' output
        # and cost UART time during the measurements: console log level 1
        # (emergencies only), the same on both VMMs.
        status, out, _, _ = shell.run("dmesg -n 1", args.op_timeout)
        if status != 0:
            raise vm.fail(f"'dmesg -n 1' exited with status {status}:\n{tail_lines(out, 10)}")

        # The image is the guest's vda, of the image's size; where it sits.
        # (A kernel line printed before 'dmesg -n 1' may still be among the
        # output: look for the two answers among the lines.)
        sysblk = f"/sys/block/{os.path.basename(DEVICE)}"
        status, out, _, _ = shell.run(f"cat {sysblk}/size && readlink -f {sysblk}", args.op_timeout)
        lines = [l.strip() for l in out.splitlines()]
        paths = [l for l in lines if l.startswith("/sys/devices/")]
        if status != 0 or str(args.bytes // 512) not in lines or not paths:
            raise vm.fail(f"{DEVICE} is not the {args.bytes // 512}-sector image "
                          f"(status {status}):\n{tail_lines(out, 10)}")
        disk_sysfs = paths[-1]

        rtts = []
        for _ in range(args.round_trips):
            status, out, secs, _ = shell.run("true", args.op_timeout)
            if status != 0:
                raise vm.fail(f"'true' exited with status {status}: {out!r}")
            rtts.append(secs * 1e3)

        write = blk(shell, "blk-write", args)
        verify = blk(shell, "blk-verify", args)
        if verify["checksum"] != write["checksum"]:
            raise vm.fail(f"blk-verify checksum {verify['checksum']} != blk-write's {write['checksum']}")
    finally:
        vm.stop()
    sha = benchlib.sha256(image)
    if sha != expected_sha:
        raise BenchError(f"the image after the run does not hold the pattern of seed {args.seed}: "
                         f"sha256 {sha}, expected {expected_sha}")
    return {
        "init_s": round(init_s, 3),
        "first_cmd_s": round(first_s, 3),
        "rtt_ms": round(statistics.median(rtts), 2),
        "rtt_ms_min": round(min(rtts), 2),
        "rtt_ms_max": round(max(rtts), 2),
        "write_mibs": write["guest_mibs"],
        "verify_mibs": verify["guest_mibs"],
        "write_host_mibs": write["host_mibs"],
        "verify_host_mibs": verify["host_mibs"],
        "write": write,
        "verify": verify,
        "image_sha256": sha,
        "disk_sysfs": disk_sysfs,
        "loadavg_at_start": load,
        "other_vmms_at_start": others,
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


FIGURES = (
    ("first_cmd_s", "boot to first command", "s"),
    ("init_s", "boot to 'Run /init'", "s"),
    ("rtt_ms", "command round trip", "ms"),
    ("write_mibs", "blk-write (guest clock)", "MiB/s"),
    ("verify_mibs", "blk-verify (guest clock)", "MiB/s"),
    ("write_host_mibs", "blk-write (host, command)", "MiB/s"),
    ("verify_host_mibs", "blk-verify (host, command)", "MiB/s"),
)


def summarize(runs):
    out = {}
    for key, _, _ in FIGURES:
        xs = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(xs), 3), "min": min(xs), "max": max(xs)}
    loads = [r["loadavg_at_start"] for r in runs if r["loadavg_at_start"] is not None]
    out["loadavg"] = {"median": statistics.median(loads), "min": min(loads), "max": max(loads)} if loads else None
    return out


def fmt(s, unit):
    if s is None:
        return "-"
    d = 2 if unit in ("s", "MiB/s") else 0
    return f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def main(argv):
    args = parse_args(argv)
    kernel, initramfs, cmdline = user_kit(args)
    kit = (kernel, initramfs, cmdline)
    mem_mib = args.memory // MIB
    vmms = ["arbor", "qemu"] if args.only is None else [args.only]
    binary = qemu = None
    if "arbor" in vmms:
        binary = benchlib.find_arbor(args.arbor, packages=("vmm", "api"),
                                     rebuild_stale=not args.no_build)
    if "qemu" in vmms:
        qemu = benchlib.find_qemu(args.qemu)
    benchlib.check_kvm()

    base = args.workdir or tempfile.gettempdir()
    workdir = tempfile.mkdtemp(prefix="blk-bench-", dir=base)
    try:
        image = os.path.join(workdir, "disk.img")
        commands = {}
        if binary:
            opts = argparse.Namespace(**vars(args))
            opts.arbor_extra = ["--disk", f"path={image}"] + args.arbor_extra
            commands["arbor"] = benchlib.ArborVm(binary, kit, workdir, opts).argv
        if qemu:
            commands["qemu"] = [
                qemu, "-accel", "kvm", "-machine", args.qemu_machine, "-cpu", args.qemu_cpu,
                "-m", f"{mem_mib}M", "-smp", str(args.cpus),
                "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                "-kernel", kernel, "-initrd", initramfs, "-append", cmdline,
                "-drive", f"file={image},format=raw,if=none,id=disk0,cache={args.qemu_cache},aio=threads",
                "-device", "virtio-blk-pci,drive=disk0",
            ]
        for name, cmd in commands.items():
            log(f"{name}: {' '.join(benchlib.quote(a) for a in cmd)}")

        t = time.monotonic()
        expected = pattern_sha256(args.seed, args.bytes)
        log(f"pattern of seed {args.seed:#x}, {args.bytes} bytes: sha256 {expected} "
            f"(computed on the host in {time.monotonic() - t:.1f} s)")

        results = {name: [] for name in vmms}
        failed = {}
        for i in range(args.runs):
            for name in vmms:
                if name in failed:
                    continue
                label = f"run {i + 1}/{args.runs} {name}"
                zero_image(image, args.bytes)
                if name == "arbor":
                    sock = os.path.join(workdir, "arbor-api.sock")
                    if os.path.exists(sock):
                        os.unlink(sock)
                    vm = benchlib.ArborVm(binary, kit, workdir, opts, console_input=True)
                else:
                    vm = QemuVm(commands["qemu"], args)
                log(f"{label}: booting (load average {loadavg()})")
                try:
                    r = boot_once(vm, image, args, expected)
                except BenchError as e:
                    if name == "qemu":
                        failed[name] = f"QEMU failed in {label}: {e}"
                        log(failed[name])
                        continue
                    raise
                if r["other_vmms_at_start"]:
                    log(f"{label}: warning: other VMMs were running: {', '.join(r['other_vmms_at_start'])}")
                log(f"{label}: /init {r['init_s']:.2f} s, first command {r['first_cmd_s']:.2f} s, "
                    f"round trip {r['rtt_ms']:.0f} ms (median of {args.round_trips}), "
                    f"blk-write {r['write_mibs']:.2f} MiB/s in the guest ({r['write_host_mibs']:.2f} "
                    f"host), blk-verify {r['verify_mibs']:.2f} ({r['verify_host_mibs']:.2f}); "
                    f"image sha256 ok")
                results[name].append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {name: summarize(rs) for name, rs in results.items() if rs}
    ratio = None
    if "arbor" in summary and "qemu" in summary:
        ratio = {key: (round(summary["arbor"][key]["median"] / summary["qemu"][key]["median"], 3)
                       if summary["qemu"][key]["median"] else None) for key, _, _ in FIGURES}

    # --- Table ------------------------------------------------------------
    qlabel = f"QEMU ({args.qemu_machine}, cache={args.qemu_cache})"
    print()
    print(f"blk benchmark: {os.path.basename(kernel)} + initramfs-user.cpio, {args.cpus} vCPU(s), "
          f"{mem_mib} MiB, {args.bytes} bytes, median (min-max) of {args.runs} run(s), "
          f"{args.round_trips} round trips per boot")
    head = f"{'':34} {'arbor':>22} {qlabel:>30} {'arbor/QEMU':>10}"
    print(head)
    print("-" * len(head))
    for key, title, unit in FIGURES:
        a = summary.get("arbor", {}).get(key)
        q = summary.get("qemu", {}).get(key)
        rt = ratio.get(key) if ratio else None
        print(f"{title + ' (' + unit + ')':34} {fmt(a, unit):>22} {fmt(q, unit):>30} "
              f"{(f'{rt:.2f}' if rt is not None else '-'):>10}")
    for name in vmms:
        if name in summary and summary[name]["loadavg"]:
            la = summary[name]["loadavg"]
            print(f"  {name}: load average at boot {la['median']:.2f} ({la['min']:.2f}-{la['max']:.2f})")
    for reason in failed.values():
        print("NOTE: " + reason)
    print()

    out = {
        "kernel": kernel,
        "kernel_sha256": benchlib.sha256(kernel),
        "initramfs": initramfs,
        "initramfs_sha256": benchlib.sha256(initramfs),
        "cmdline": cmdline,
        "cpus": args.cpus,
        "memory_mib": mem_mib,
        "runs": args.runs,
        "round_trips": args.round_trips,
        "bytes": args.bytes,
        "seed": args.seed,
        "pattern_sha256": expected,
        "qemu_machine": args.qemu_machine,
        "qemu_cache": args.qemu_cache,
        "commands": commands,
        "summary": summary,
        "ratio_arbor_over_qemu": ratio,
        "per_run": results,
        "failed": failed,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    if "arbor" in vmms and "arbor" not in summary:
        return 1
    if not summary:
        print("blk-bench: error: no VMM ran the benchmark", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
