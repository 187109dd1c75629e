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
    // One function, a match over every (kind, mode): a kind missing from
    // ThreadKind::ALL leaves it non-exhaustive, so the library does not build.
    let mut out = String::from(
        "/// The program of `kind` built with Arbor, in log mode or not.\n\
         fn built_program(kind: ThreadKind, log: bool) -> &'static [sock_filter] {\n    \
         match (kind, log) {\n",
    );
    for kind in ThreadKind::ALL {
        for log in [false, true] {
            let prog = match seccomp_rules::compact(kind, log) {
                Ok(p) => p,
                Err(e) => panic!("seccomp program of {kind:?}: {e}"),
            };
            let _ = writeln!(out, "        (ThreadKind::{kind:?}, {log}) => &[");
            for i in &prog {
                let _ = writeln!(
                    out,
                    "            sock_filter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
                    i.code, i.jt, i.jf, i.k
                );
            }
            let _ = writeln!(out, "        ],");
        }
    }
    out.push_str("    }\n}\n");
    let Some(dir) = std::env::var_os("OUT_DIR") else {
        panic!("OUT_DIR is not set: build.rs runs under cargo");
    };
    let path = PathBuf::from(dir).join("seccomp_programs.rs");
    if let Err(e) = std::fs::write(&path, out) {
        panic!("cannot write {}: {e}", path.display());
    }
}
