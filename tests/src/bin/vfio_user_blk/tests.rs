//! The server against the VMM's own vfio-user client
//! (`devices::vfio::VfioUserBackend`), with a hand-driven virtqueue: a
//! write request in "guest RAM" (a file given with DMA_MAP) reaches the
//! disk and completes with the MSI-X vector's eventfd.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use arbor_tests::Scratch;
use devices::vfio::{VfioBackend, VfioUserBackend, REGION_MMAP};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

fn args(v: &[&str]) -> Result<Args, String> {
    parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

#[test]
fn command_line() {
    assert_eq!(
        args(&["--socket", "/s", "--disk", "/d", "--bar2-file", "/b"]).unwrap(),
        Args {
            socket: "/s".into(),
            disk: "/d".into(),
            bar2: Some("/b".into()),
        }
    );
    assert_eq!(
        args(&["--disk", "/d", "--socket", "/s"]).unwrap().bar2,
        None
    );
    for (bad, why) in [
        (&["--disk", "/d"][..], "--socket is required"),
        (&["--socket", "/s"][..], "--disk is required"),
        (&["--socket"][..], "--socket needs a value"),
        (&["--socket", ""][..], "--socket needs a value"),
        (&["--socket", "/s", "--socket", "/t"][..], "given twice"),
        (&["--bogus"][..], "unknown argument '--bogus'"),
    ] {
        let e = args(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

/// Starts a server on `dir/name.sock` serving one connection on a thread.
fn start(dir: &Scratch, name: &str) -> (PathBuf, std::thread::JoinHandle<BlkBackend>) {
    let disk = dir.path(&format!("{name}.img"));
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let bar2 = open_bar2(&dir.path(&format!("{name}.bar2"))).unwrap();
    let mut backend = BlkBackend::new(&BlockConfig::new(&disk), Some(bar2)).unwrap();
    let sock = dir.path(&format!("{name}.sock"));
    let server = Server::new(&sock, true, backend.irqs(), backend.regions()).unwrap();
    let t = std::thread::spawn(move || {
        server.run(&mut backend).unwrap();
        backend
    });
    (sock, t)
}

fn read_u16(c: &mut VfioUserBackend, region: u32, off: u64) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(region, off, &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn write_bar0(c: &mut VfioUserBackend, off: u64, data: &[u8]) {
    c.region_write(0, off, data).unwrap();
}

fn wait_signalled(e: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(n) = e.read() {
            return n;
        }
        assert!(Instant::now() < deadline, "vector never signalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn virtio_blk_over_vfio_user() {
    let dir = Scratch::new("vfio-user-blk-unit");
    let (sock, server) = start(&dir, "a");
    let mut c = VfioUserBackend::connect(&sock).unwrap();

    // Regions and interrupts.
    assert_eq!(c.region_info(0).unwrap().size, BAR_SIZE);
    assert_eq!(c.region_info(1).unwrap().size, 0);
    let bar2 = c.region_info(2).unwrap();
    assert_eq!(bar2.size, BAR2_SIZE);
    assert_ne!(bar2.flags & REGION_MMAP, 0);
    assert_eq!(c.region_info(7).unwrap().size, CONFIG_SIZE);
    let counts: Vec<u32> = (0..3).map(|i| c.irq_info(i).unwrap().count).collect();
    assert_eq!(counts, [1, 0, 2]);

    // Identity and capabilities: virtio vendor capabilities and MSI-X.
    assert_eq!(read_u16(&mut c, 7, 0), 0x1af4);
    assert_eq!(read_u16(&mut c, 7, 2), 0x1042);
    let mut space = [0u8; 256];
    c.region_read(7, 0, &mut space).unwrap();
    let mut ids = Vec::new();
    let mut ptr = usize::from(space[0x34]);
    while ptr != 0 && ids.len() < 48 {
        ids.push(space[ptr]);
        ptr = usize::from(space[ptr + 1]);
    }
    assert!(ids.contains(&0x11), "{ids:x?}");
    assert!(ids.iter().filter(|&&i| i == 0x09).count() >= 4, "{ids:x?}");
    // Outside the region: all-ones, and the connection stays in step.
    let mut past = [0u8; 4];
    c.region_read(7, 254, &mut past).unwrap();
    assert_eq!(past[2..], [0xff, 0xff]);
    c.region_read(5, 0, &mut past).unwrap();
    assert_eq!(past, [0xff; 4]);

    // BAR 2 is the file.
    c.region_write(2, 0x100, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    c.region_read(2, 0x100, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    let f = File::open(dir.path("a.bar2")).unwrap();
    f.read_exact_at(&mut b, 0x100).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    assert_eq!(f.metadata().unwrap().len(), BAR2_SIZE);
    c.region_read(2, BAR2_SIZE - 2, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);

    // Guest RAM: 1 MiB at 0x10_0000 from a file.
    let ram = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path("ram"))
        .unwrap();
    ram.set_len(1 << 20).unwrap();
    const BASE: u64 = 0x10_0000;
    c.dma_map(BASE, 1 << 20, &ram, 0).unwrap();
    let put = |gpa: u64, data: &[u8]| ram.write_all_at(data, gpa - BASE).unwrap();

    // MSI-X: two vectors.
    let vecs = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    c.set_irq_eventfds(2, &[&vecs[0], &vecs[1]]).unwrap();

    // A driver's initialisation through BAR 0's common configuration.
    write_bar0(&mut c, 0x14, &[1]);
    write_bar0(&mut c, 0x14, &[3]);
    write_bar0(&mut c, 0x08, &1u32.to_le_bytes());
    write_bar0(&mut c, 0x0c, &1u32.to_le_bytes()); // VERSION_1
    write_bar0(&mut c, 0x14, &[0xb]);
    let mut st = [0u8];
    c.region_read(0, 0x14, &mut st).unwrap();
    assert_eq!(st[0], 0xb, "features not accepted");
    let (desc, avail, used) = (BASE + 0x1000, BASE + 0x2000, BASE + 0x3000);
    write_bar0(&mut c, 0x16, &0u16.to_le_bytes());
    write_bar0(&mut c, 0x18, &16u16.to_le_bytes());
    write_bar0(&mut c, 0x1a, &0u16.to_le_bytes());
    assert_eq!(read_u16(&mut c, 0, 0x1a), 0, "vector 0 refused");
    write_bar0(&mut c, 0x20, &desc.to_le_bytes());
    write_bar0(&mut c, 0x28, &avail.to_le_bytes());
    write_bar0(&mut c, 0x30, &used.to_le_bytes());
    write_bar0(&mut c, 0x1c, &1u16.to_le_bytes());
    write_bar0(&mut c, 0x14, &[0xf]);

    // One write request: header, 512 bytes of data, status.
    let (hdr, data, status) = (BASE + 0x4000, BASE + 0x5000, BASE + 0x6000);
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    h[8..16].copy_from_slice(&1u64.to_le_bytes()); // sector 1
    put(hdr, &h);
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    put(data, &pattern);
    put(status, &[0xee]);
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut e = addr.to_le_bytes().to_vec();
        e.extend(len.to_le_bytes());
        e.extend(flags.to_le_bytes());
        e.extend(next.to_le_bytes());
        e
    };
    put(desc, &d(hdr, 16, 1, 1));
    put(desc + 16, &d(data, 512, 1, 2));
    put(desc + 32, &d(status, 1, 2, 0));
    put(avail + 4, &0u16.to_le_bytes());
    put(avail + 2, &1u16.to_le_bytes());
    // The notification: a BAR write.
    write_bar0(&mut c, 0x3000, &0u16.to_le_bytes());

    assert!(wait_signalled(&vecs[0]) >= 1);
    let mut b = [0u8; 2];
    ram.read_exact_at(&mut b, used + 2 - BASE).unwrap();
    assert_eq!(u16::from_le_bytes(b), 1, "used index");
    let mut s = [0u8];
    ram.read_exact_at(&mut s, status - BASE).unwrap();
    assert_eq!(s[0], 0, "request status");
    let mut on_disk = vec![0u8; 512];
    File::open(dir.path("a.img"))
        .unwrap()
        .read_exact_at(&mut on_disk, 512)
        .unwrap();
    assert_eq!(on_disk, pattern);

    // Bad interrupt requests are refused without breaking the stream:
    // more vectors than the device has.
    let three = [&vecs[0], &vecs[1], &vecs[0]];
    let _ = c.set_irq_eventfds(2, &three);
    assert_eq!(read_u16(&mut c, 7, 0), 0x1af4);

    // MSI-X off; removal's sequence.
    c.set_irq_eventfds(2, &[]).unwrap();
    c.dma_unmap(BASE, 1 << 20).unwrap();
    c.reset().unwrap();
    c.close();
    let backend = server.join().unwrap();
    assert!(!backend.dev.is_active());
    assert!(!backend.dev.msix().enabled());
    assert!(backend.maps.is_empty());
}

/// Whatever a guest writes through the client (any region, offset, size,
/// value) neither panics the server nor makes an access fail.
#[test]
fn garbage_accesses_are_absorbed() {
    let dir = Scratch::new("vfio-user-blk-garbage");
    let disk = dir.path("g.img");
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let bar2 = open_bar2(&dir.path("g.bar2")).unwrap();
    let mut b = BlkBackend::new(&BlockConfig::new(&disk), Some(bar2)).unwrap();
    // Guest RAM so that activation may succeed with some garbage.
    let ram = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path("ram"))
        .unwrap();
    ram.set_len(1 << 20).unwrap();
    b.dma_map(DmaMapFlags::READ_WRITE, 0, 0, 1 << 20, Some(ram))
        .unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let offsets = |r: u64| {
        [
            r % 0x100,
            r % 0x8000,
            r % 0x1_0000,
            u64::MAX - r % 8,
            0x3000 + r % 16,
            0x14,
        ]
    };
    for _ in 0..20_000 {
        let r = next();
        let region = [0, 1, 2, 5, 6, 7, 8][(r % 7) as usize];
        let offset = offsets(r >> 8)[((r >> 3) % 6) as usize];
        let len = [0, 1, 2, 3, 4, 8, 9, 16, 300][((r >> 40) % 9) as usize];
        let data: Vec<u8> = (0..len).map(|i| (next() >> (i % 8)) as u8).collect();
        b.region_write(region, offset, &data).unwrap();
        let mut back = vec![0u8; len];
        b.region_read(region, offset, &mut back).unwrap();
    }
    // Interrupt requests that make no sense are refused, not applied.
    assert!(b.set_irqs(MSIX_IRQ, 0, 0, 1, Vec::new()).is_err());
    assert!(b
        .set_irqs(
            MSIX_IRQ,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            u32::MAX,
            1,
            vec![File::open("/dev/null").unwrap()]
        )
        .is_err());
    assert!(b
        .set_irqs(
            7,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            vec![File::open("/dev/null").unwrap()]
        )
        .is_err());
    // A DMA map without a descriptor, overlapping, or empty: refused.
    assert!(b
        .dma_map(DmaMapFlags::READ_WRITE, 0, 0x10_0000, 4096, None)
        .is_err());
    let f = File::open(dir.path("g.img")).unwrap();
    assert!(b
        .dma_map(DmaMapFlags::READ_WRITE, 0, 0x1000, 4096, Some(f))
        .is_err());
    let f = File::open(dir.path("g.img")).unwrap();
    assert!(b
        .dma_map(DmaMapFlags::READ_WRITE, 0, 0x20_0000, 0, Some(f))
        .is_err());
    // The same range again: refused, and the first map stays.
    let f = File::open(dir.path("g.img")).unwrap();
    assert!(b
        .dma_map(DmaMapFlags::READ_WRITE, 0, 0, 1 << 20, Some(f))
        .is_err());
    assert_eq!(b.maps.len(), 1);
    assert_eq!((b.maps[0].iova, b.maps[0].size), (0, 1 << 20));
    // Disabling MSI-X may name any start vector: all are dropped, nothing
    // is allocated for the start.
    b.set_irqs(
        MSIX_IRQ,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        u32::MAX - 1,
        0,
        Vec::new(),
    )
    .unwrap();
    b.disconnect();
    assert!(b.maps.is_empty() && !b.dev.is_active());
}

/// BAR 2's region comes with its file's descriptor (whole region mmap-able):
/// what a client maps is the file the server serves trapped accesses from.
#[test]
fn bar2_descriptor_maps_the_file() {
    let dir = Scratch::new("vfio-user-blk-bar2");
    let (sock, server) = start(&dir, "m");
    let c = vfio_user::Client::new(&sock).unwrap();
    let r = c.region(2).unwrap();
    assert_eq!(r.size, BAR2_SIZE);
    assert_ne!(r.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(r.sparse_areas.len(), 1);
    assert_eq!(
        (r.sparse_areas[0].offset, r.sparse_areas[0].size),
        (0, BAR2_SIZE)
    );
    let fo = r.file_offset.as_ref().expect("BAR 2 descriptor");
    let map = MmapRegion::<()>::from_file(
        FileOffset::new(fo.file().try_clone().unwrap(), fo.start()),
        BAR2_SIZE as usize,
    )
    .unwrap();
    // SAFETY: `map` is a live mapping of BAR2_SIZE bytes; 0x40 is inside.
    unsafe { map.as_ptr().add(0x40).write_volatile(0x5a) };
    let mut b = [0u8];
    File::open(dir.path("m.bar2"))
        .unwrap()
        .read_exact_at(&mut b, 0x40)
        .unwrap();
    assert_eq!(b[0], 0x5a);
    c.shutdown().unwrap();
    drop(c);
    server.join().unwrap();
}
