//! Round-trip cost of one access through a vfio-user socket, host side:
//! connects to the server on the socket given as the first argument and
//! times `ROUNDS` x `N` 4-byte configuration-space reads and 1-byte BAR
//! reads (region given as the second argument, default 2), interleaved.
//! Prints the median, min and max microseconds per access of each kind.
//! Run by `resources/bench/vfio-user-rtt.sh`.

use std::path::Path;
use std::time::Instant;

use devices::vfio::{VfioBackend, VfioUserBackend, CONFIG_REGION};

const ROUNDS: usize = 7;
const N: u32 = 2000;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else {
        eprintln!("usage: vfio_user_rtt SOCKET [BAR_REGION]");
        std::process::exit(2);
    };
    let bar: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mut b = match VfioUserBackend::connect(Path::new(&socket)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let (mut cfg, mut bars) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..N {
            let mut d = [0u8; 4];
            if let Err(e) = b.region_read(CONFIG_REGION, 0, &mut d) {
                eprintln!("config read: {e}");
                std::process::exit(1);
            }
        }
        cfg.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
        let t = Instant::now();
        for _ in 0..N {
            let mut d = [0u8; 1];
            if let Err(e) = b.region_read(bar, 4, &mut d) {
                eprintln!("BAR read: {e}");
                std::process::exit(1);
            }
        }
        bars.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
    }
    let (m, lo, hi) = stats(cfg);
    println!("config read (4 bytes): median {m:.1} us, min {lo:.1}, max {hi:.1} ({ROUNDS} rounds of {N})");
    let (m, lo, hi) = stats(bars);
    println!("BAR{bar} read (1 byte):   median {m:.1} us, min {lo:.1}, max {hi:.1} ({ROUNDS} rounds of {N})");
    b.close();
}
