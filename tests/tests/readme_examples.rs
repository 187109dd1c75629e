//! Every shell example of the project's READMEs, run (or checked) as
//! written, so the documentation cannot drift from the code silently.
//!
//! Each fenced block whose language is a shell (`sh`, `bash`, `shell`,
//! `console`) must be preceded by a marker line
//!
//! ```text
//! <!-- example: NAME KIND -->
//! ```
//!
//! (blank lines between marker and fence allowed); a fence without a
//! language is refused too (output samples are `text` or `json`). KIND:
//!
//! - `run`: executed with `bash -euo pipefail` in a scratch directory that
//!   looks like the repository after the first README command
//!   (`target/debug` holding the built `arbor` and `arbor-remote`,
//!   `target/guest` the guest kit, `resources` the repository's), with
//!   `target/debug` on `PATH`, `G` the guest kit and `TMPDIR` the scratch
//!   directory. It must exit 0 within a bound and leave no process behind
//!   (a VM it starts, it stops).
//! - `serve`: starts a VM that runs until stopped (the "Running a VM"
//!   command). Run in the background like `run`; the harness waits for the
//!   API socket it names and the guest's `Run /init` line, runs the `vm`
//!   blocks that follow it, then sends SIGTERM to `arbor` (what Ctrl-C
//!   does) and requires exit status 0.
//! - `vm`: needs the VM of the `serve` block before it; otherwise as `run`.
//! - `slow`: too long for a test (kernel build, benchmarks, the whole
//!   suite): checked with `bash -n`, and every repository script it names
//!   must exist and answer `--help` with exit status 0.
//!
//! In `run`, `serve` and `vm` blocks, a comment `# => TEXT` after a command
//! is the output the README promises: the block's standard output (for
//! `serve`, when its VM is stopped) must contain TEXT.

use arbor_tests::{arbor_bin, guest_dir, guest_kit, kvm_available, repo_root, timeout, Scratch};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The documents whose examples are checked.
const DOCS: &[&str] = &[
    "README.md",
    "resources/README.md",
    "resources/guest-kit/README.md",
    "resources/bench/README.md",
];

const SHELLS: &[&str] = &["sh", "bash", "shell", "console"];

/// One guest at a time in this file.
static GUEST: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Run,
    Serve,
    Vm,
    Slow,
}

#[derive(Debug)]
struct Example {
    doc: &'static str,
    line: usize,
    name: String,
    kind: Kind,
    script: String,
}

/// Parses every document; returns the examples and the problems found
/// (unmarked shell blocks, fences without a language, bad markers).
fn parse() -> (Vec<Example>, Vec<String>) {
    let docs: Vec<(&'static str, String)> = DOCS
        .iter()
        .map(|&doc| {
            let text = std::fs::read_to_string(repo_root().join(doc))
                .unwrap_or_else(|e| panic!("{doc}: {e}"));
            (doc, text)
        })
        .collect();
    parse_texts(&docs)
}

fn parse_texts(docs: &[(&'static str, String)]) -> (Vec<Example>, Vec<String>) {
    let mut examples = Vec::new();
    let mut problems = Vec::new();
    for &(doc, ref text) in docs {
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        let mut pending: Option<(usize, String, Option<Kind>)> = None;
        while i < lines.len() {
            let l = lines[i];
            if let Some(m) = l.trim().strip_prefix("<!-- example:") {
                let words: Vec<&str> = m.trim_end_matches("-->").split_whitespace().collect();
                let kind = match words.get(1).copied() {
                    Some("run") => Some(Kind::Run),
                    Some("serve") => Some(Kind::Serve),
                    Some("vm") => Some(Kind::Vm),
                    Some("slow") => Some(Kind::Slow),
                    _ => None,
                };
                if words.len() != 2 || kind.is_none() {
                    problems.push(format!(
                        "{doc}:{}: marker must be `<!-- example: NAME run|serve|vm|slow -->`: {l}",
                        i + 1
                    ));
                }
                if let Some((at, name, _)) = &pending {
                    problems.push(format!(
                        "{doc}:{at}: marker `{name}` is not followed by a shell block"
                    ));
                }
                pending = Some((i + 1, words.first().unwrap_or(&"").to_string(), kind));
                i += 1;
                continue;
            }
            if let Some(info) = l.strip_prefix("```") {
                let info = info.trim();
                let start = i;
                i += 1;
                let mut body = String::new();
                while i < lines.len() && lines[i].trim() != "```" {
                    body.push_str(lines[i]);
                    body.push('\n');
                    i += 1;
                }
                i += 1;
                if info.is_empty() {
                    problems.push(format!(
                        "{doc}:{}: fence without a language: `sh` for commands (with an example marker), `text` or `json` for output",
                        start + 1
                    ));
                }
                let shell = SHELLS.contains(&info);
                match pending.take() {
                    Some((_, name, Some(kind))) if shell => examples.push(Example {
                        doc,
                        line: start + 1,
                        name,
                        kind,
                        script: body,
                    }),
                    Some(_) if shell => {}
                    Some((at, name, _)) => problems.push(format!(
                        "{doc}:{at}: marker `{name}` is followed by a `{info}` block, not a shell block"
                    )),
                    None if shell => problems.push(format!(
                        "{doc}:{}: shell block without `<!-- example: NAME KIND -->` before it",
                        start + 1
                    )),
                    None => {}
                }
                continue;
            }
            if pending.is_some() && !l.trim().is_empty() {
                let (at, name, _) = pending.take().unwrap();
                problems.push(format!(
                    "{doc}:{at}: marker `{name}` is not followed by a shell block"
                ));
            }
            i += 1;
        }
        if let Some((at, name, _)) = pending {
            problems.push(format!(
                "{doc}:{at}: marker `{name}` is not followed by a shell block"
            ));
        }
    }
    let mut names: Vec<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    for w in names.windows(2) {
        if w[0] == w[1] {
            problems.push(format!("example name `{}` used twice", w[0]));
        }
    }
    for e in &examples {
        if e.kind == Kind::Vm
            && !examples
                .iter()
                .take_while(|o| !std::ptr::eq(*o, e))
                .any(|o| o.doc == e.doc && o.kind == Kind::Serve)
        {
            problems.push(format!(
                "{}:{}: `vm` example `{}` has no `serve` example before it",
                e.doc, e.line, e.name
            ));
        }
    }
    (examples, problems)
}

/// The outputs a block promises: the TEXT of each `# => TEXT` comment.
fn promised(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.split_once("# => ").map(|(_, t)| t.trim().to_string()))
        .collect()
}

/// The repository scripts a block names (`resources/...sh|py`).
fn scripts_named(script: &str) -> Vec<String> {
    let mut out: Vec<String> = script
        .split(|c: char| c.is_whitespace() || c == ';' || c == '(' || c == ')')
        .filter_map(|w| {
            let w = w.trim_start_matches("./");
            (w.starts_with("resources/") && (w.ends_with(".sh") || w.ends_with(".py")))
                .then(|| w.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The checker refuses what would let the docs drift: an unmarked shell
/// block, a bare fence, an unknown kind, a marker on a non-shell block, a
/// `vm` example without a `serve` one, a name used twice.
#[test]
fn the_checker_refuses_unmarked_blocks() {
    let bad = |text: &str| parse_texts(&[("T.md", text.to_string())]).1;
    assert!(bad("<!-- example: a run -->\n```sh\ntrue\n```\n```text\nout\n```\n").is_empty());
    assert_eq!(bad("x\n```sh\ntrue\n```\n").len(), 1);
    assert_eq!(bad("```\ntrue\n```\n").len(), 1);
    assert_eq!(bad("<!-- example: a fast -->\n```sh\ntrue\n```\n").len(), 1);
    assert_eq!(bad("<!-- example: a run -->\n```json\n{}\n```\n").len(), 1);
    assert_eq!(
        bad("<!-- example: a run -->\ntext\n```sh\ntrue\n```\n").len(),
        2
    );
    assert_eq!(bad("<!-- example: a vm -->\n```sh\ntrue\n```\n").len(), 1);
    assert_eq!(
        bad("<!-- example: a run -->\n```sh\ntrue\n```\n<!-- example: a slow -->\n```bash\ntrue\n```\n").len(),
        1
    );
    let (ex, _) = parse_texts(&[(
        "T.md",
        "<!-- example: a run -->\n\n```sh\necho hi # => hi\n```\n".into(),
    )]);
    assert_eq!(
        (ex.len(), ex[0].kind, promised(&ex[0].script)),
        (1, Kind::Run, vec!["hi".to_string()])
    );
}

/// The shell examples are all marked, parse, and name only scripts that
/// exist and answer `--help`; the counts per kind are printed.
#[test]
fn every_shell_example_is_marked_and_checked() {
    let (examples, problems) = parse();
    assert!(
        problems.is_empty(),
        "README examples:\n{}",
        problems.join("\n")
    );
    let count = |k| examples.iter().filter(|e| e.kind == k).count();
    eprintln!(
        "README examples: {} run, {} serve, {} vm, {} slow",
        count(Kind::Run),
        count(Kind::Serve),
        count(Kind::Vm),
        count(Kind::Slow)
    );
    assert!(examples.len() >= 10, "{examples:?}");
    let mut failures = Vec::new();
    for e in &examples {
        let out = Command::new("bash")
            .args(["-n", "-c", &e.script])
            .output()
            .expect("bash");
        if !out.status.success() {
            failures.push(format!(
                "{}:{} `{}`: bash -n: {}",
                e.doc,
                e.line,
                e.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for s in scripts_named(&e.script) {
            let path = repo_root().join(&s);
            if !path.is_file() {
                failures.push(format!(
                    "{}:{} `{}`: {s} does not exist",
                    e.doc, e.line, e.name
                ));
                continue;
            }
            let out = Command::new(&path)
                .arg("--help")
                .current_dir(repo_root())
                .stdin(Stdio::null())
                .output()
                .expect("run script");
            if !out.status.success() || out.stdout.is_empty() {
                failures.push(format!(
                    "{}:{} `{}`: `{s} --help` gave {:?}: {}{}",
                    e.doc,
                    e.line,
                    e.name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A scratch directory laid out like a checkout after the first README
/// command: `target/debug` (the built binaries), `target/guest` (the guest
/// kit), `resources`.
fn checkout(name: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(name);
    let bin_dir = arbor_bin().parent().expect("bin dir").to_path_buf();
    std::fs::create_dir(s.path("target")).unwrap();
    std::os::unix::fs::symlink(&bin_dir, s.path("target/debug")).unwrap();
    std::os::unix::fs::symlink(guest_dir(), s.path("target/guest")).unwrap();
    std::os::unix::fs::symlink(repo_root().join("resources"), s.path("resources")).unwrap();
    (s, bin_dir)
}

struct Running {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    label: String,
}

fn spawn(e: &Example, s: &Scratch, bin_dir: &Path, n: usize) -> Running {
    let out = s.path(&format!(".example-{n}.out"));
    let err = s.path(&format!(".example-{n}.err"));
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &e.script])
        .current_dir(&s.0)
        .env("PATH", path)
        .env("G", guest_dir())
        .env("TMPDIR", &s.0)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .expect("bash");
    Running {
        child,
        out,
        err,
        label: format!("{}:{} `{}`", e.doc, e.line, e.name),
    }
}

impl Running {
    fn output(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default(),
        )
    }

    /// Waits up to `limit` for the block to end; panics with its output
    /// unless it exited 0. Kills what it left running (and fails then).
    fn finish(mut self, limit: Duration, promises: &[String]) -> String {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let pgid = self.child.id() as i32;
        let leftovers = group_members(pgid);
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        let (out, err) = self.output();
        let Some(status) = status else {
            panic!(
                "{}: still running after {limit:?}\n{out}\n{err}",
                self.label
            )
        };
        assert!(status.success(), "{}: {status}\n{out}\n{err}", self.label);
        assert!(
            leftovers.is_empty(),
            "{}: left processes running: {leftovers:?}\n{out}\n{err}",
            self.label
        );
        for p in promises {
            assert!(
                out.contains(p.as_str()),
                "{}: output lacks `{p}`:\n{out}\n{err}",
                self.label
            );
        }
        out
    }
}

/// (pid, command name) of the processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').map_or(0, |o| o + 1)..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if rest.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && rest[0] != "Z" {
            v.push((pid, comm));
        }
    }
    v
}

/// The path after `--api-socket` in a script, with `$PWD` and
/// `${TMPDIR:-/tmp}` expanded against the scratch directory.
fn api_socket(script: &str, dir: &Path) -> PathBuf {
    let w: Vec<&str> = script.split_whitespace().collect();
    let at = w
        .iter()
        .position(|x| *x == "--api-socket")
        .expect("a serve example names --api-socket");
    let p = w[at + 1]
        .trim_matches('"')
        .replace("$PWD", &dir.display().to_string())
        .replace("${TMPDIR:-/tmp}", &dir.display().to_string());
    dir.join(p)
}

/// Every `run`, `serve` and `vm` example, in document order, against the
/// built binaries and the guest kit (one guest at a time: a `serve`
/// example's VM serves the `vm` examples after it).
#[test]
fn runnable_examples_run_as_written() {
    if !kvm_available() {
        return;
    }
    let _one = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _ = guest_kit(); // a clear message if the kit is missing
    let (examples, problems) = parse();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Starting and stopping a VM, or booting one to a shell prompt.
    let limit = timeout() * 2;
    for &doc in DOCS {
        let (s, bin_dir) = checkout(&format!("examples-{}", doc.replace('/', "-")));
        let mut serving: Option<(Running, Vec<String>)> = None;
        let mine: Vec<&Example> = examples.iter().filter(|e| e.doc == doc).collect();
        for (n, e) in mine.iter().enumerate() {
            match e.kind {
                Kind::Slow => continue,
                Kind::Run => {
                    stop(serving.take(), limit);
                    eprintln!("example {}:{} `{}` (run)", e.doc, e.line, e.name);
                    let out = spawn(e, &s, &bin_dir, n).finish(limit, &promised(&e.script));
                    check_specific(e, &s, &out);
                }
                Kind::Serve => {
                    stop(serving.take(), limit);
                    eprintln!("example {}:{} `{}` (serve)", e.doc, e.line, e.name);
                    let sock = api_socket(&e.script, &s.0);
                    let r = spawn(e, &s, &bin_dir, n);
                    let deadline = Instant::now() + limit;
                    loop {
                        let (out, err) = r.output();
                        if sock.exists() && out.contains("Run /init as init process") {
                            break;
                        }
                        assert!(
                            Instant::now() < deadline
                                && !group_members(r.child.id() as i32).is_empty(),
                            "{}: no socket {} and guest /init\n{out}\n{err}",
                            r.label,
                            sock.display()
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    serving = Some((r, promised(&e.script)));
                }
                Kind::Vm => {
                    assert!(serving.is_some(), "{}:{}: no VM serves it", e.doc, e.line);
                    eprintln!("example {}:{} `{}` (vm)", e.doc, e.line, e.name);
                    let out = spawn(e, &s, &bin_dir, n).finish(limit, &promised(&e.script));
                    check_specific(e, &s, &out);
                }
            }
        }
        stop(serving.take(), limit);
    }
}

/// Stops a `serve` example's VM as Ctrl-C would (SIGTERM to `arbor`) and
/// checks it ended with status 0 and printed what it promised.
fn stop(serving: Option<(Running, Vec<String>)>, limit: Duration) {
    let Some((r, promises)) = serving else { return };
    for (pid, comm) in group_members(r.child.id() as i32) {
        if comm == "arbor" {
            // SAFETY: kill(2) on an arbor process this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    r.finish(limit, &promises);
}

/// What a few examples leave behind, beyond their output.
fn check_specific(e: &Example, s: &Scratch, _out: &str) {
    if e.name == "api-first" {
        let events = std::fs::read_to_string(s.path("events.log")).expect("events.log");
        let names: Vec<String> = events
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["event"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("created"),
            "{events}"
        );
        assert!(names.iter().any(|n| n == "booted"), "{events}");
        assert_eq!(
            names.last().map(String::as_str),
            Some("vmm-exit"),
            "{events}"
        );
        let stream = std::fs::read_to_string(s.path("stream.log")).expect("stream.log");
        assert!(
            stream.trim_end().ends_with('}') && stream.contains("vmm-exit"),
            "{stream}"
        );
    }
}
