//! Compiles the seccomp program of every thread kind, in both filtering
//! modes, from the allow lists in `src/seccomp_rules.rs` (the file the
//! library includes as `seccomp::rules`), and writes them as Rust data to
//! `$OUT_DIR/seccomp_programs.rs`, which `src/seccomp.rs` includes. A
//! thread then installs its program without compiling it at run time.

use std::fmt::Write as _;
use std::path::PathBuf;

#[allow(dead_code)]
#[path = "src/seccomp_rules.rs"]
mod seccomp_rules;

use seccomp_rules::ThreadKind;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/seccomp_rules.rs");
    // The lists are system call numbers of this build script's libc, and
    // the programs check for AUDIT_ARCH_X86_64: both hold only when the
    // script and arbor run on x86_64.
    let target = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if target != "x86_64" || std::env::consts::ARCH != "x86_64" {
        panic!(
            "arbor's seccomp programs are built for x86_64 only (target {target}, build host {})",
            std::env::consts::ARCH
        );
    }
    let mut out = String::new();
    let mut table = Vec::new();
    for (k, kind) in ThreadKind::ALL.iter().enumerate() {
        for log in [false, true] {
            let prog = match seccomp_rules::compact(*kind, log) {
                Ok(p) => p,
                Err(e) => panic!("seccomp program of {kind:?}: {e}"),
            };
            let name = format!("PROGRAM_{k}_{}", if log { "LOG" } else { "ON" });
            let _ = writeln!(out, "// {kind:?}, {}.", if log { "log" } else { "on" });
            let _ = writeln!(out, "const {name}: &[sock_filter] = &[");
            for i in &prog {
                let _ = writeln!(
                    out,
                    "    sock_filter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
                    i.code, i.jt, i.jf, i.k
                );
            }
            let _ = writeln!(out, "];");
            table.push(name);
        }
    }
    let _ = writeln!(
        out,
        "/// Every kind's programs: kind by kind in `ThreadKind::ALL` order, `on` then `log`."
    );
    let _ = writeln!(
        out,
        "static PROGRAMS: [&[sock_filter]; {}] = [",
        table.len()
    );
    for name in &table {
        let _ = writeln!(out, "    {name},");
    }
    let _ = writeln!(out, "];");
    // A match over the kinds of ThreadKind::ALL: a kind missing there
    // makes it non-exhaustive, so the library does not build.
    let _ = writeln!(
        out,
        "/// The index in `PROGRAMS` of `kind`'s program, in log mode or not.\n\
         fn program_index(kind: ThreadKind, log: bool) -> usize {{\n    \
         let k = match kind {{"
    );
    for (k, kind) in ThreadKind::ALL.iter().enumerate() {
        let _ = writeln!(out, "        ThreadKind::{kind:?} => {k},");
    }
    let _ = writeln!(out, "    }};\n    2 * k + usize::from(log)\n}}");
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let path = dir.join("seccomp_programs.rs");
    if let Err(e) = std::fs::write(&path, out) {
        panic!("cannot write {}: {e}", path.display());
    }
}
