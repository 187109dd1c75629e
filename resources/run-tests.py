#!/usr/bin/env python3
"""Runs one package's tests one test per process, JOBS at a time.

`cargo test` runs a package's test files one after another, each with its
own thread pool: a file with one long guest-booting test leaves the other
core idle, and a file's slowest test holds up every file after it. This
script builds the test executables once (`cargo test --no-run`), lists every
test in them, and keeps JOBS of them running (`EXE --exact NAME`), longest
first by the durations the previous run recorded (unknown tests count as
long). A test's output is printed only when it fails.

Usage: resources/run-tests.py [--jobs N] [--package P] [--cap SECONDS] [FILTER...]
(FILTERs: run only tests whose `file::name` contains one of them)
Durations are kept in $CARGO_TARGET_DIR (default target/) as
test-durations-P.json; tests/durations.json seeds them on a fresh checkout. Exit status 1 if any test failed or ran over the cap
(its process group is then killed).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNKNOWN = 1e6  # seconds: tests never timed go first


def executables(package):
    out = subprocess.run(
        ["cargo", "test", "--locked", "-p", package, "--no-run",
         "--message-format=json-render-diagnostics"],
        cwd=REPO, stdout=subprocess.PIPE, check=True, text=True).stdout
    exes = []
    for line in out.splitlines():
        msg = json.loads(line)
        if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
                and msg["profile"]["test"]):
            exes.append((msg["target"]["name"], msg["executable"]))
    return exes


def tests_of(exe):
    out = subprocess.run([exe, "--list", "--format", "terse"], cwd=REPO / "tests",
                         stdout=subprocess.PIPE, check=True, text=True).stdout
    return [l[:-len(": test")] for l in out.splitlines() if l.endswith(": test")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--package", default="arbor-tests")
    ap.add_argument("--cap", type=float, default=1800,
                    help="seconds one test may run before it is killed")
    ap.add_argument("filters", nargs="*", help="substrings of `file::name` to run")
    args = ap.parse_args()
    if args.jobs < 1:
        sys.exit("--jobs must be at least 1")

    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    times_file = target / f"test-durations-{args.package}.json"
    known = {}
    # tests/durations.json: rough durations checked in, so that a fresh
    # checkout starts the long tests first too; the last run's, if any,
    # take precedence.
    for f in (REPO / "tests" / "durations.json", times_file):
        try:
            known.update(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass

    jobs = []
    for name, exe in executables(args.package):
        cwd = REPO / "tests" if args.package == "arbor-tests" else REPO
        for test in tests_of(exe):
            if args.filters and not any(f in f"{name}::{test}" for f in args.filters):
                continue
            jobs.append((f"{name}::{test}", exe, test, cwd))
    jobs.sort(key=lambda j: -known.get(j[0], UNKNOWN))
    print(f"{len(jobs)} tests in {args.package}, {args.jobs} at a time", flush=True)

    lock = threading.Lock()
    failed, durations = [], {}
    start = time.monotonic()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                key, exe, test, cwd = jobs.pop(0)
            t0 = time.monotonic()
            p = subprocess.Popen([exe, "--exact", test, "--test-threads=1"], cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                output, _ = p.communicate(timeout=args.cap)
                verdict = "ok" if p.returncode == 0 else "FAILED"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                output, _ = p.communicate()
                verdict = f"KILLED after {args.cap:.0f} s"
            took = time.monotonic() - t0
            with lock:
                durations[key] = round(took, 1)
                print(f"{verdict:>6} {key} ({took:.1f} s)", flush=True)
                if verdict != "ok":
                    failed.append(key)
                    sys.stdout.write(output.decode(errors="replace"))
                    sys.stdout.flush()

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    known.update(durations)
    try:
        times_file.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        print(f"could not record durations: {e}", file=sys.stderr)
    wall = time.monotonic() - start
    busy = sum(durations.values())
    print(f"\n{args.package}: {len(durations) - len(failed)} passed, {len(failed)} failed "
          f"in {wall:.0f} s (test time {busy:.0f} s)")
    for key in failed:
        print(f"  failed: {key}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
