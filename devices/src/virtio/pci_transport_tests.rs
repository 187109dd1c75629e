//! Transport tests: a test "driver" programs the device only through configuration and
//! BAR accesses, as a guest would.

use std::io::Write;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::rng::Rng;
use crate::virtio::test_utils::{mem, TestQueue};
use crate::virtio::{status, VIRTIO_MSI_NO_VECTOR};
use pci::RecordingMsiGroup;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const BAR_ADDR: u64 = 0x80_0000_0000;

struct Driver {
    dev: VirtioPciDevice,
    msi: Arc<RecordingMsiGroup>,
    mem: GuestMemoryMmap,
}

impl Driver {
    fn new(device: Box<dyn VirtioDevice>, opts: VirtioPciOptions) -> Self {
        let m = mem();
        let n = VirtioPciDevice::required_msix_vectors(device.as_ref());
        let msi = Arc::new(RecordingMsiGroup::new(n).unwrap());
        let mut dev =
            VirtioPciDevice::new(device, GuestMemoryAtomic::new(m.clone()), msi.clone(), opts)
                .unwrap();
        dev.set_bar_address(BAR_INDEX, BAR_ADDR).unwrap();
        Driver { dev, msi, mem: m }
    }

    fn cfg_r(&mut self, off: usize, len: usize) -> u32 {
        let v = self.dev.read_config_register(off / 4) >> ((off % 4) * 8);
        if len == 4 {
            v
        } else {
            v & ((1 << (8 * len)) - 1)
        }
    }

    fn cfg_w(&mut self, off: usize, v: u32, len: usize) -> ConfigWriteOutcome {
        self.dev
            .write_config_register(off / 4, (off % 4) as u64, &v.to_le_bytes()[..len])
    }

    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(BAR_INDEX, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.write_bar(BAR_INDEX, off, &v.to_le_bytes()[..len]);
    }

    /// Virtio capabilities as (cfg_type, cap offset).
    fn virtio_caps(&mut self) -> Vec<(u8, usize)> {
        let mut caps = Vec::new();
        let mut ptr = self.cfg_r(0x34, 1) as usize;
        while ptr != 0 {
            if self.cfg_r(ptr, 1) == 0x09 {
                caps.push((self.cfg_r(ptr + 3, 1) as u8, ptr));
            }
            ptr = self.cfg_r(ptr + 1, 1) as usize;
        }
        caps
    }

    fn enable_msix(&mut self) {
        let off = self.dev.config().msix_offset().unwrap();
        self.cfg_w(off + 2, 0x8000, 2);
        for v in 0..self.dev.msix().num_vectors() {
            let e = MSIX_TABLE_OFFSET + u64::from(v) * 16;
            self.w(e, 0xfee0_0000, 4);
            self.w(e + 4, 0, 4);
            self.w(e + 8, 0x40 + u64::from(v), 4);
            self.w(e + 12, 0, 4);
        }
    }

    /// Standard initialisation with the given queues; vector 0 for config, i+1 for queue i.
    fn init(&mut self, queues: &[&TestQueue]) {
        self.w(0x14, 0, 1);
        self.w(0x14, u64::from(status::ACKNOWLEDGE), 1);
        self.w(0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        for sel in 0..2 {
            self.w(0x00, sel, 4);
            let f = self.r(0x04, 4);
            self.w(0x08, sel, 4);
            self.w(0x0c, f, 4);
        }
        self.w(0x14, 0x0b, 1);
        assert_eq!(self.r(0x14, 1), 0x0b, "FEATURES_OK accepted");
        self.w(0x10, 0, 2);
        for (i, q) in queues.iter().enumerate() {
            self.w(0x16, i as u64, 2);
            self.w(0x18, u64::from(q.size), 2);
            self.w(0x1a, i as u64 + 1, 2);
            self.w(0x20, q.desc, 8);
            self.w(0x28, q.avail, 4);
            self.w(0x2c, q.avail >> 32, 4);
            self.w(0x30, q.used, 8);
            self.w(0x1c, 1, 2);
        }
        self.w(0x14, 0x0f, 1);
    }

    fn notify(&mut self, queue: u16) {
        let off = self.dev.queue_notify_offset(queue).unwrap();
        self.w(off, u64::from(queue), 2);
    }

    fn wait_used(&self, q: &TestQueue, idx: u16) {
        let start = Instant::now();
        while q.used_idx(&self.mem) != idx {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "device did not complete"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn block_device(t: &TempFile) -> Box<dyn VirtioDevice> {
    let mut c = BlockConfig::new(t.as_path());
    c.serial = "serial".into();
    Box::new(Block::new(&c).unwrap())
}

fn disk() -> TempFile {
    let t = TempFile::new().unwrap();
    let data: Vec<u8> = (0..64 * 512).map(|i| (i % 253) as u8).collect();
    t.as_file().write_all(&data).unwrap();
    t
}

#[test]
fn pci_identity_and_capabilities() {
    let t = disk();
    let mut d = Driver::new(
        block_device(&t),
        VirtioPciOptions {
            pcie: Some(PciePortType::Endpoint),
            prefetchable: true,
        },
    );
    assert_eq!(d.cfg_r(0, 4), 0x1042_1af4);
    assert_eq!(d.cfg_r(8, 4), 0x0180_0001);
    assert_eq!(d.cfg_r(0x2c, 4), 0x1100_1af4);
    assert_eq!(d.cfg_r(0x3d, 1), 0, "no INTx pin");
    assert_eq!(d.cfg_r(0x06, 2) & 0x10, 0x10);
    // 64-bit prefetchable BAR of 32 KiB.
    assert_eq!(d.cfg_r(0x10, 4), 0x0c);
    assert_eq!(d.cfg_r(0x14, 4), 0x80);
    d.cfg_w(0x10, u32::MAX, 4);
    d.cfg_w(0x14, u32::MAX, 4);
    assert_eq!(d.cfg_r(0x10, 4), 0xffff_800c);
    assert_eq!(d.cfg_r(0x14, 4), 0xffff_ffff);
    d.cfg_w(0x10, 0x0c, 4);
    let out = d.cfg_w(0x14, 0x80, 4);
    assert!(out.bar_changes.is_empty());
    // Guest moves the BAR.
    d.cfg_w(0x10, 0x8000, 4);
    let out = d.cfg_w(0x14, 0x90, 4);
    assert_eq!(out.bar_changes.len(), 1);
    assert_eq!(out.bar_changes[0].old_addr, BAR_ADDR);
    assert_eq!(out.bar_changes[0].new_addr, 0x90_0000_8000);
    assert_eq!(out.bar_changes[0].size, BAR_SIZE);
    // Virtio capabilities.
    let caps = d.virtio_caps();
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(types, vec![1, 3, 4, 2, 5]);
    let field = |d: &mut Driver, ty: u8, off: usize| {
        let at = caps.iter().find(|c| c.0 == ty).unwrap().1;
        d.cfg_r(at + off, 4)
    };
    assert_eq!(field(&mut d, 1, 8), COMMON_CFG_OFFSET as u32);
    assert_eq!(field(&mut d, 3, 8), ISR_OFFSET as u32);
    assert_eq!(field(&mut d, 4, 8), DEVICE_CFG_OFFSET as u32);
    assert_eq!(field(&mut d, 4, 12), 0x3c);
    assert_eq!(field(&mut d, 2, 8), NOTIFY_OFFSET as u32);
    assert_eq!(field(&mut d, 2, 16), NOTIFY_OFF_MULTIPLIER);
    assert_eq!(d.cfg_r(caps[0].1 + 2, 1), 16);
    assert_eq!(d.cfg_r(caps[3].1 + 2, 1), 20);
    // Vendor capabilities are read-only (except the PCI cfg window).
    d.cfg_w(caps[0].1 + 8, 0x1234, 4);
    assert_eq!(field(&mut d, 1, 8), 0);
    // MSI-X: 2 vectors (1 queue + config), table and PBA in BAR 0.
    let msix = d.dev.config().msix_offset().unwrap();
    assert_eq!(d.cfg_r(msix + 2, 2), 1);
    assert_eq!(d.cfg_r(msix + 4, 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(d.cfg_r(msix + 8, 4), MSIX_PBA_OFFSET as u32);
    assert!(d.dev.config().pcie_offset().is_some());
    assert_eq!(d.dev.ioeventfds().len(), 1);
    assert_eq!(d.dev.ioeventfds()[0].0, NOTIFY_OFFSET);
    assert_eq!(d.dev.queue_notify_offset(1), None);
}

#[test]
fn rng_device_identity() {
    let mut d = Driver::new(Box::new(Rng::new()), VirtioPciOptions::default());
    assert_eq!(d.cfg_r(0, 4), 0x1044_1af4);
    assert_eq!(d.cfg_r(8, 4) >> 8, 0x00_ff00);
    assert_eq!(d.cfg_r(0x10, 4), 0x04);
    // No device-specific config capability.
    assert!(!d.virtio_caps().iter().any(|c| c.0 == 4));
    assert!(!d.dev.config().is_extended());
}

#[test]
fn block_end_to_end_through_the_transport() {
    let t = disk();
    let mut d = Driver::new(block_device(&t), VirtioPciOptions::default());
    let q = TestQueue::new(0x1_0000, 128);
    d.enable_msix();
    d.init(&[&q]);
    assert_eq!(d.r(0x14, 1), 0x0f);
    assert!(d.dev.is_active());
    assert_eq!(d.r(0x1a, 2), 1);
    // Device config: capacity in sectors.
    assert_eq!(d.r(DEVICE_CFG_OFFSET, 8), 64);

    // Write 1 KiB at sector 3, then read sectors 2..5.
    let m = d.mem.clone();
    let payload: Vec<u8> = (0..1024).map(|i| (i as u8) ^ 0x5a).collect();
    m.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    m.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    q.add_chain(
        &m,
        &[
            (0x10_0000, 16, false),
            (0x20_0000, 1024, false),
            (0x30_0000, 1, true),
        ],
    );
    d.notify(0);
    d.wait_used(&q, 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    let f = std::fs::read(t.as_path()).unwrap();
    assert_eq!(&f[3 * 512..5 * 512], &payload[..]);
    // EVENT_IDX was negotiated: ask for an interrupt after the next used entry.
    q.set_used_event(&m, 1);

    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    m.write_slice(&h, GuestAddress(0x10_0100)).unwrap();
    q.add_chain(
        &m,
        &[
            (0x10_0100, 16, false),
            (0x40_0000, 2048, true),
            (0x30_0001, 1, true),
        ],
    );
    // Notify through the eventfd the VMM would bind to an ioeventfd.
    d.dev.queue_eventfd(0).unwrap().write(1).unwrap();
    d.wait_used(&q, 2);
    assert_eq!(q.used_elem(&m, 1).1, 2049);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0001)).unwrap(), 0);
    let mut got = vec![0u8; 2048];
    m.read_slice(&mut got, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(&got[..], &f[2 * 512..6 * 512]);

    // Used-buffer interrupts went to the queue's vector (1) with the programmed message.
    let start = Instant::now();
    while d.msi.trigger_count(1) < 2 {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.msi.vector(1).unwrap().msg.data, 0x41);
    assert_eq!(d.msi.trigger_count(0), 0);
    // ISR was set and reading it clears it.
    assert_eq!(d.r(ISR_OFFSET, 1) & 1, 1);
    assert_eq!(d.r(ISR_OFFSET, 1), 0);

    // Reset stops the worker and clears the queue state.
    d.w(0x14, 0, 1);
    assert!(!d.dev.is_active());
    assert_eq!(d.r(0x14, 1), 0);
    assert_eq!(d.r(0x1c, 2), 0);
    assert_eq!(d.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    // Re-initialise and use it again.
    let q2 = TestQueue::new(0x5_0000, 64);
    d.init(&[&q2]);
    assert!(d.dev.is_active());
    m.write_slice(&h, GuestAddress(0x10_0200)).unwrap();
    q2.add_chain(
        &m,
        &[
            (0x10_0200, 16, false),
            (0x40_0000, 512, true),
            (0x30_0002, 1, true),
        ],
    );
    d.notify(0);
    d.wait_used(&q2, 1);
}

#[test]
fn masked_vector_is_pended_then_delivered() {
    let mut d = Driver::new(Box::new(Rng::new()), VirtioPciOptions::default());
    let q = TestQueue::new(0x1_0000, 16);
    d.enable_msix();
    // Mask the queue vector (1).
    d.w(MSIX_TABLE_OFFSET + 16 + 12, 1, 4);
    d.init(&[&q]);
    q.add_chain(&d.mem, &[(0x20_0000, 32, true)]);
    d.notify(0);
    d.wait_used(&q, 1);
    let start = Instant::now();
    while d.r(MSIX_PBA_OFFSET, 8) != 0b10 {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.msi.trigger_count(1), 0);
    d.w(MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
    assert_eq!(d.msi.trigger_count(1), 1);
    assert_eq!(d.r(MSIX_PBA_OFFSET, 8), 0);
}

#[test]
fn negotiation_failures() {
    let t = disk();
    let mut d = Driver::new(block_device(&t), VirtioPciOptions::default());
    d.w(0x14, 3, 1);
    // Driver does not accept VERSION_1.
    d.w(0x08, 0, 4);
    d.w(0x0c, u64::from(u32::MAX), 4);
    d.w(0x14, 0x0b, 1);
    assert_eq!(d.r(0x14, 1), 0x03);
    // DRIVER_OK without FEATURES_OK is refused.
    d.w(0x14, 0x07, 1);
    assert_eq!(d.r(0x14, 1), 0x03);
    assert!(!d.dev.is_active());
    // Queue outside guest memory: DEVICE_NEEDS_RESET and a config interrupt.
    d.enable_msix();
    let q = TestQueue::new(0x7fff_0000_0000, 16);
    d.init(&[&q]);
    assert!(!d.dev.is_active());
    assert_eq!(d.r(0x14, 1) & 0x40, 0x40);
    assert_eq!(d.msi.trigger_count(0), 1);
    assert_eq!(d.r(0x15, 1), 1, "config generation bumped");
    // No queue enabled at all: block needs one, activation fails.
    d.w(0x14, 0, 1);
    assert_eq!(d.r(0x14, 1), 0);
    d.init(&[]);
    assert_eq!(d.r(0x14, 1) & 0x40, 0x40);
    assert!(!d.dev.is_active());
}

#[test]
fn pci_cfg_access_window() {
    let t = disk();
    let mut d = Driver::new(block_device(&t), VirtioPciOptions::default());
    let cap = d.virtio_caps().iter().find(|c| c.0 == 5).unwrap().1;
    // Read num_queues (common config 0x12, 2 bytes) through the window.
    d.cfg_w(cap + 4, 0, 1);
    d.cfg_w(cap + 8, 0x12, 4);
    d.cfg_w(cap + 12, 2, 4);
    assert_eq!(d.cfg_r(cap + 16, 4), 1);
    // Write device_status through the window.
    d.cfg_w(cap + 8, 0x14, 4);
    d.cfg_w(cap + 12, 1, 4);
    d.cfg_w(cap + 16, 1, 4);
    assert_eq!(d.r(0x14, 1), 1);
    // Invalid length / BAR / offset: plain register behaviour, no BAR access.
    d.cfg_w(cap + 12, 3, 4);
    d.cfg_w(cap + 16, 0, 4);
    assert_eq!(d.r(0x14, 1), 1);
    d.cfg_w(cap + 4, 5, 1);
    d.cfg_w(cap + 12, 4, 4);
    assert_eq!(d.cfg_r(cap + 16, 4), 0);
    d.cfg_w(cap + 4, 0, 1);
    d.cfg_w(cap + 8, u32::MAX, 4);
    d.cfg_w(cap + 16, 0, 4);
    assert_eq!(d.r(0x14, 1), 1);
}

/// Simple LCG so the fuzz tests need no extra crates.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_bar_and_config_accesses() {
    let t = disk();
    for seed in 0..4u64 {
        let mut d = Driver::new(
            block_device(&t),
            VirtioPciOptions {
                pcie: Some(PciePortType::RootComplexIntegratedEndpoint),
                prefetchable: false,
            },
        );
        let q = TestQueue::new(0x1_0000, 16);
        d.enable_msix();
        d.init(&[&q]);
        let mut rng = Lcg(seed);
        for _ in 0..20_000 {
            let len = [0usize, 1, 2, 3, 4, 8, 16][(rng.next() % 7) as usize];
            let off = match rng.next() % 4 {
                0 => rng.next() % 0x40,
                1 => rng.next() % BAR_SIZE,
                2 => rng.next(),
                _ => (rng.next() % 8) * 0x1000 + rng.next() % 0x20,
            };
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            match rng.next() % 5 {
                0 => d.dev.read_bar(BAR_INDEX, off, &mut buf),
                1 => d.dev.write_bar((rng.next() % 3) as usize, off, &buf),
                2 => {
                    d.dev
                        .write_config_register((rng.next() % 1100) as usize, rng.next() % 5, &buf);
                }
                3 => {
                    d.dev.read_config_register((rng.next() % 1100) as usize);
                }
                _ => d.dev.write_bar(BAR_INDEX, off, &buf),
            }
        }
        // Dropping joins any worker the random writes may have started.
        drop(d);
    }
}

/// The integration sequence the VMM follows, end to end without KVM.
#[test]
fn vmm_integration_sequence() {
    use pci::ecam::EcamAddress;
    use pci::{BarAllocator, PciBdf, PciRoot, SharedPciDevice};
    use std::sync::Mutex;

    let m = mem();
    let rng: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let msi = Arc::new(
        RecordingMsiGroup::new(VirtioPciDevice::required_msix_vectors(rng.as_ref())).unwrap(),
    );
    let virtio = Arc::new(Mutex::new(
        VirtioPciDevice::new(
            rng,
            GuestMemoryAtomic::new(m.clone()),
            msi.clone(),
            VirtioPciOptions::default(),
        )
        .unwrap(),
    ));
    // Place it: allocate BARs, then attach at a free slot of bus 0.
    let mut alloc = BarAllocator::new(
        Some((0xc000, 0x4000)),
        (0xc000_0000, 0x1000_0000),
        Some((0x100_0000_0000, 1 << 36)),
    )
    .unwrap();
    let bars = alloc.place_device(&mut *virtio.lock().unwrap()).unwrap();
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0].addr % BAR_SIZE, 0);
    let mut root = PciRoot::with_host_bridge();
    let slot = root.free_root_slot().unwrap();
    let shared: SharedPciDevice = virtio.clone();
    let bdf: PciBdf = root.add_root_device(slot, 0, shared.clone()).unwrap();
    // ioeventfd addresses the VMM registers.
    let ioevents: Vec<u64> = virtio
        .lock()
        .unwrap()
        .ioeventfds()
        .iter()
        .map(|(o, _)| bars[0].addr + o)
        .collect();
    assert_eq!(ioevents, vec![bars[0].addr + NOTIFY_OFFSET]);

    // Guest enables memory decode through ECAM, then moves the BAR.
    let ecam = |reg: u16| EcamAddress { bdf, register: reg }.encode();
    let r = root.ecam_write(ecam(4), &[0x06, 0]).unwrap();
    assert_eq!(r.outcome.mem_decode, Some(true));
    // The VMM maps BAR 0 now; an access at BAR 0 + 0x12 (num_queues)
    // reaches the device with the offset inside the BAR.
    let mut nq = [0u8; 2];
    r.device.lock().unwrap().read_bar(0, 0x12, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
    root.ecam_write(ecam(0x10), &0x0u32.to_le_bytes()).unwrap();
    let r = root
        .ecam_write(ecam(0x14), &0x200u32.to_le_bytes())
        .unwrap();
    assert_eq!(r.outcome.bar_changes.len(), 1);
    let change = r.outcome.bar_changes[0];
    assert_eq!(change.new_addr, 0x200_0000_0000);
    // The VMM moves the ioeventfds: downcast to reach the virtio API.
    {
        let mut guard = r.device.lock().unwrap();
        let v = guard
            .as_any_mut()
            .downcast_mut::<VirtioPciDevice>()
            .unwrap();
        let moved: Vec<u64> = v
            .ioeventfds()
            .iter()
            .map(|(o, _)| change.new_addr + o)
            .collect();
        assert_eq!(moved, vec![0x200_0000_0000 + NOTIFY_OFFSET]);
    }
    assert_eq!(r.device.lock().unwrap().bars()[0].addr, 0x200_0000_0000);
    // Unplug: detach, free the space; dropping the device joins its worker.
    root.remove_device(&format!("{:02x}", slot).parse().unwrap())
        .unwrap();
    alloc.release(&bars);
}
