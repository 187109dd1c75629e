use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use pci::{BarRegion, IntxInterrupt, PciDevice};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{bar_kind, bar_size};
use super::*;

/// What the fake device saw.
#[derive(Default)]
struct Log {
    config_writes: Vec<(u64, Vec<u8>)>,
    bar_writes: Vec<(u32, u64, Vec<u8>)>,
    irq_fds: Vec<(u32, usize)>,
    dma: Vec<(u64, u64, u64)>,
    unmapped: Vec<u64>,
    resets: u32,
    closed: bool,
    unmask_fds: usize,
    /// Set by a test: the back end stops answering from now on.
    dead: bool,
}

struct Fake {
    config: [u8; 256],
    regions: Vec<RegionInfo>,
    log: Arc<Mutex<Log>>,
    broken: bool,
    fail_unmask: bool,
    /// MSI-X vectors the back end reports (`irq_info(2)`).
    msix_count: u32,
    /// MSI vectors the back end reports (`irq_info(1)`).
    msi_count: u32,
    /// Mmap-able regions: (region index, file, offset of the region in
    /// it, areas).
    mmap: Vec<MmapRegion>,
}

/// (region index, file, offset of the region in it, mmap-able areas).
type MmapRegion = (u32, File, u64, Vec<(u64, u64)>);

impl Fake {
    /// A gpio-like device: 494f:0dc8, an I/O BAR2 of `io_len` bytes, INTA,
    /// a capability list the model must hide.
    fn gpio(io_len: u64) -> (Self, Arc<Mutex<Log>>) {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&0x494fu16.to_le_bytes());
        config[2..4].copy_from_slice(&0x0dc8u16.to_le_bytes());
        config[6] = 0x10; // capability list
        config[8] = 7; // revision
        config[0x0b] = 0xff; // class
        config[0x18..0x1c].copy_from_slice(&1u32.to_le_bytes()); // BAR2: I/O
        config[0x34] = 0x40;
        config[0x40] = 0x05; // an MSI capability
        config[0x3d] = 1;
        let mut regions = vec![RegionInfo::default(); 9];
        for (i, r) in regions.iter_mut().enumerate() {
            r.index = i as u32;
        }
        regions[2].size = io_len;
        regions[2].flags = REGION_READ | REGION_WRITE;
        regions[7].size = 256;
        regions[7].flags = REGION_READ | REGION_WRITE;
        let log = Arc::new(Mutex::new(Log::default()));
        (
            Fake {
                config,
                regions,
                log: log.clone(),
                broken: false,
                fail_unmask: false,
                msix_count: 1,
                msi_count: 1,
                mmap: Vec::new(),
            },
            log,
        )
    }

    /// A NIC-like device: a 64-bit memory BAR0 of 16 KiB holding an MSI-X
    /// table of `vectors` entries at 0x2000 and its PBA at 0x3000, INTA,
    /// and the capability list PM (0x40) -> MSI (0x50) -> MSI-X (0x70) ->
    /// vendor-specific (0x90).
    fn nic(vectors: u16) -> (Self, Arc<Mutex<Log>>) {
        let (mut fake, log) = Fake::gpio(256);
        let c = &mut fake.config;
        c[0x18..0x1c].fill(0); // no I/O BAR2
        c[0x10..0x14].copy_from_slice(&4u32.to_le_bytes()); // BAR0: 64-bit memory
        c[0x34] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x50] = 0x05;
        c[0x51] = 0x70;
        c[0x70] = 0x11;
        c[0x71] = 0x90;
        c[0x72..0x74].copy_from_slice(&(vectors - 1).to_le_bytes());
        c[0x74..0x78].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x78..0x7c].copy_from_slice(&0x3000u32.to_le_bytes());
        c[0x90] = 0x09;
        c[0x91] = 0;
        fake.regions[2].size = 0;
        fake.regions[0].size = 0x4000;
        fake.regions[0].flags = REGION_READ | REGION_WRITE;
        fake.msix_count = u32::from(vectors);
        (fake, log)
    }

    /// Makes region `index` mmap-able: `areas` of a memfd of `file_len`
    /// bytes holding the region from `offset`. Returns the memfd.
    fn mappable(&mut self, index: u32, file_len: u64, offset: u64, areas: &[(u64, u64)]) -> File {
        let file = memfd(file_len);
        self.regions[index as usize].flags |= REGION_MMAP;
        self.mmap
            .push((index, file.try_clone().unwrap(), offset, areas.to_vec()));
        file
    }
}

fn memfd(len: u64) -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid name; the result is checked and owned.
    let fd = unsafe { libc::memfd_create(c"fake-bar".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

impl VfioBackend for Fake {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).copied()
    }
    fn region_mmap(&self, index: u32) -> Option<RegionMmap<'_>> {
        use std::os::fd::AsFd;
        let (_, file, offset, areas) = self.mmap.iter().find(|m| m.0 == index)?;
        Some(RegionMmap {
            fd: file.as_fd(),
            offset: *offset,
            areas: areas.clone(),
        })
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        if self.broken || self.log.lock().unwrap().dead {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        if index == CONFIG_REGION {
            let o = offset as usize;
            data.copy_from_slice(&self.config[o..o + data.len()]);
        } else {
            data.fill(0x5a);
        }
        Ok(())
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let mut log = self.log.lock().unwrap();
        if index == CONFIG_REGION {
            log.config_writes.push((offset, data.to_vec()));
        } else {
            log.bar_writes.push((index, offset, data.to_vec()));
        }
        Ok(())
    }
    fn irq_info(&mut self, index: u32) -> Option<IrqInfo> {
        let count = match index {
            MSIX_IRQ => self.msix_count,
            MSI_IRQ => self.msi_count,
            _ => 1,
        };
        Some(IrqInfo { index, count })
    }
    fn set_irq_eventfds(&mut self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.log.lock().unwrap().irq_fds.push((index, fds.len()));
        Ok(())
    }
    fn set_intx_unmask(&mut self, _fd: &EventFd) -> io::Result<()> {
        self.log.lock().unwrap().unmask_fds += 1;
        if self.fail_unmask {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        Ok(())
    }
    fn dma_map(&mut self, iova: u64, size: u64, _file: &File, offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().dma.push((iova, size, offset));
        Ok(())
    }
    fn dma_unmap(&mut self, iova: u64, _size: u64) -> io::Result<()> {
        self.log.lock().unwrap().unmapped.push(iova);
        Ok(())
    }
    fn reset(&mut self) -> io::Result<()> {
        self.log.lock().unwrap().resets += 1;
        Ok(())
    }
    fn close(&mut self) {
        self.log.lock().unwrap().closed = true;
    }
}

struct Line(EventFd);
impl IntxInterrupt for Line {
    fn assert(&self) -> io::Result<()> {
        self.0.write(1)
    }
    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.0)
    }
}

/// A line with a resample eventfd, as the VMM's KVM lines have.
struct ResampledLine(EventFd, EventFd);
impl IntxInterrupt for ResampledLine {
    fn assert(&self) -> io::Result<()> {
        self.0.write(1)
    }
    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.0)
    }
    fn resample_eventfd(&self) -> Option<&EventFd> {
        Some(&self.1)
    }
}

fn shared_memory() -> GuestMemoryMmap {
    let f = Arc::new(vmm_sys_util::tempfile::TempFile::new().unwrap().into_file());
    f.set_len(3 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files([
        (
            GuestAddress(0),
            1 << 20,
            Some(FileOffset::from_arc(f.clone(), 0)),
        ),
        (
            GuestAddress(1 << 32),
            2 << 20,
            Some(FileOffset::from_arc(f, 1 << 20)),
        ),
    ])
    .unwrap()
}

fn gpio() -> (VfioPciDevice, Arc<Mutex<Log>>) {
    let (fake, log) = Fake::gpio(256);
    let line: Arc<dyn IntxInterrupt> = Arc::new(Line(EventFd::new(0).unwrap()));
    let dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), Some(line), None).unwrap();
    (dev, log)
}

#[test]
fn identity_bars_and_hidden_capabilities() {
    let (mut dev, log) = gpio();
    assert_eq!(dev.read_config_register(0), 0x0dc8_494f);
    assert!(dev.enumerated());
    assert_eq!(dev.read_config_register(2), 0xff00_0007);
    // No capability list, no pointer.
    assert_eq!(dev.read_config_register(1) >> 16 & 0x10, 0);
    assert_eq!(dev.read_config_register(13) & 0xff, 0);
    // Interrupt pin A.
    assert_eq!(dev.read_config_register(15) >> 8 & 0xff, 1);
    // One I/O BAR, index 2, 256 bytes.
    let bars = dev.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(
        (bars[0].index, bars[0].region, bars[0].size),
        (2, BarRegion::Io, 256)
    );
    // No expansion ROM, no extended space.
    assert_eq!(dev.read_config_register(12), 0);
    assert_eq!(dev.read_config_register(64), 0);
    // All RAM given for DMA, with its file offsets; INTx wired.
    let l = log.lock().unwrap();
    assert_eq!(l.dma, vec![(0, 1 << 20, 0), (1 << 32, 2 << 20, 1 << 20)]);
    assert_eq!(l.irq_fds, vec![(INTX_IRQ, 1)]);
}

#[test]
fn bar_programming_is_followed_and_command_forwarded() {
    let (mut dev, log) = gpio();
    // Sizing probe of BAR2.
    dev.write_config_register(6, 0, &u32::MAX.to_le_bytes());
    assert_eq!(dev.read_config_register(6), 0xffff_ff01);
    let out = dev.write_config_register(6, 0, &0xc100u32.to_le_bytes());
    assert_eq!(out.bar_changes.len(), 1);
    assert_eq!(out.bar_changes[0].new_addr, 0xc100);
    assert_eq!(dev.read_config_register(6), 0xc101);
    let out = dev.write_config_register(1, 0, &[1, 0]);
    assert_eq!(out.io_decode, Some(true));
    let l = log.lock().unwrap();
    assert_eq!(l.config_writes, vec![(4, vec![1, 0])]);
}

#[test]
fn bar_accesses_forward_inside_the_region_only() {
    let (fake, log) = Fake::gpio(200); // rounded up to 256
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    assert_eq!(dev.bars()[0].size, 256);
    let mut b = [0u8; 1];
    dev.read_bar(2, 0, &mut b);
    assert_eq!(b, [0x5a]);
    dev.read_bar(2, 200, &mut b);
    assert_eq!(b, [0xff]);
    dev.read_bar(0, 0, &mut b);
    assert_eq!(b, [0xff]);
    let mut big = [0u8; 16];
    dev.read_bar(2, 0, &mut big);
    assert_eq!(big, [0xff; 16]);
    dev.read_bar(2, u64::MAX, &mut b);
    dev.write_bar(2, 1, &[3]);
    dev.write_bar(2, 199, &[3, 4]);
    dev.write_bar(5, 0, &[3]);
    assert_eq!(log.lock().unwrap().bar_writes, vec![(2, 1, vec![3])]);
    // No INTx line given: pin hidden.
    assert_eq!(dev.read_config_register(15) >> 8 & 0xff, 0);
}

#[test]
fn malformed_config_accesses_are_ignored() {
    let (mut dev, log) = gpio();
    for reg in [0usize, 1, 6, 16, 63, 64, 1023, 1024, usize::MAX] {
        for off in [0u64, 1, 3, 4, u64::MAX] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let d = vec![0xffu8; len];
                dev.write_config_register(reg, off, &d);
            }
        }
        dev.read_config_register(reg);
    }
    // Only well-formed writes in the device-specific range and the
    // command register reached the device.
    for (off, data) in &log.lock().unwrap().config_writes {
        assert!(*off == 4 || (0x40..0x100).contains(off), "{off:#x}");
        assert!(data.len() <= 4);
    }
}

#[test]
fn removal_resets_and_a_failed_backend_reads_all_ones() {
    let (mut dev, log) = gpio();
    PciDevice::reset(&mut dev);
    {
        let l = log.lock().unwrap();
        assert_eq!(l.resets, 1);
        assert_eq!(l.unmapped, vec![0, 1 << 32]);
        assert_eq!(l.irq_fds.last(), Some(&(INTX_IRQ, 0)));
        assert!(l.closed);
    }
    let (mut fake, _) = Fake::gpio(256);
    fake.broken = false;
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    dev.as_any_mut()
        .downcast_mut::<VfioPciDevice>()
        .unwrap()
        .inject_failure();
    let mut b = [0u8; 2];
    dev.read_bar(2, 0, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    assert_eq!(dev.read_config_register(20), u32::MAX);
    assert!(dev.failure().is_some());
}

#[test]
fn a_failure_is_visible_without_the_device_lock_and_removal_is_not_one() {
    let (mut dev, _) = gpio();
    let watch = dev.failure_watch();
    assert_eq!(watch.get(), None);
    // Removal is not a failure.
    PciDevice::reset(&mut dev);
    assert_eq!(watch.get(), None);
    assert_eq!(dev.failure(), Some("removed"));

    let (fake, _) = Fake::gpio(256);
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    let watch = dev.failure_watch();
    let other_thread = watch.clone();
    dev.inject_failure();
    assert_eq!(watch.get(), Some("injected: test"));
    assert_eq!(
        std::thread::spawn(move || other_thread.get().map(str::to_owned))
            .join()
            .unwrap()
            .as_deref(),
        Some("injected: test")
    );
    // A back end that stops answering the guest's accesses.
    let (fake, log) = Fake::gpio(256);
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    let watch = dev.failure_watch();
    log.lock().unwrap().dead = true;
    let mut b = [0u8; 1];
    dev.read_bar(2, 0, &mut b);
    assert_eq!(b, [0xff]);
    assert_eq!(watch.get(), Some("BAR read: broken pipe"));
    // Later failures do not replace the first.
    dev.write_bar(2, 0, &[1]);
    assert_eq!(watch.get(), Some("BAR read: broken pipe"));
}

#[test]
fn intx_is_unmasked_through_the_resample_eventfd() {
    let (fake, log) = Fake::gpio(256);
    let line: Arc<dyn IntxInterrupt> = Arc::new(ResampledLine(
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
    ));
    let _dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), Some(line), None).unwrap();
    {
        let l = log.lock().unwrap();
        assert_eq!(l.irq_fds, vec![(INTX_IRQ, 1)]);
        assert_eq!(l.unmask_fds, 1);
    }
    // A line without one (the vfio-user case in tests) sets no unmask.
    let (_, log) = gpio();
    assert_eq!(log.lock().unwrap().unmask_fds, 0);
    // A back end that refuses the unmask: creation fails, INTx is
    // disabled again, guest RAM given back.
    let (mut fake, log) = Fake::gpio(256);
    fake.fail_unmask = true;
    let line: Arc<dyn IntxInterrupt> = Arc::new(ResampledLine(
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
    ));
    assert!(VfioPciDevice::new(Box::new(fake), &shared_memory(), Some(line), None).is_err());
    let l = log.lock().unwrap();
    assert_eq!(l.irq_fds, vec![(INTX_IRQ, 1), (INTX_IRQ, 0)]);
    assert_eq!(l.unmapped, vec![0, 1 << 32]);
    assert!(l.closed);
}

#[test]
fn unsupported_devices_are_refused() {
    let (mut fake, _) = Fake::gpio(512); // an I/O BAR cannot be that large
    assert!(VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).is_err());
    let (f, _) = Fake::gpio(256);
    fake = f;
    fake.config[0x0e] = 1; // a bridge
    assert!(VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).is_err());
    let (mut fake, _) = Fake::gpio(256);
    fake.regions[7].size = 0;
    assert!(VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).is_err());
    // Anonymous RAM cannot be shared with a server.
    let (fake, log) = Fake::gpio(256);
    let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    assert!(VfioPciDevice::new(Box::new(fake), &anon, None, None).is_err());
    assert!(log.lock().unwrap().closed);
}

#[test]
fn bar_decisions() {
    assert_eq!(bar_kind(1), (BarRegion::Io, false));
    assert_eq!(bar_kind(0), (BarRegion::Mmio32, false));
    assert_eq!(bar_kind(0xc), (BarRegion::Mmio64, true));
    assert_eq!(bar_size(BarRegion::Io, 1), Ok(4));
    assert_eq!(bar_size(BarRegion::Mmio32, 0x1001), Ok(0x2000));
    assert!(bar_size(BarRegion::Io, 257).is_err());
    assert!(bar_size(BarRegion::Mmio32, 3 << 30).is_err());
    assert!(bar_size(BarRegion::Mmio64, u64::MAX).is_err());
}

#[test]
fn vfio_user_connect_errors() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let missing = dir.as_path().join("missing.sock");
    let e = VfioUserBackend::connect(&missing)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("No such file"), "{e}");
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = VfioUserBackend::connect(&file).err().unwrap().to_string();
    assert!(e.contains("not a UNIX socket"), "{e}");
    // A listener that never answers.
    let sock = dir.as_path().join("mute.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let e = VfioUserBackend::connect_timeout(&sock, std::time::Duration::from_millis(200))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("did not complete the handshake"), "{e}");
    // A peer that answers garbage and closes.
    let sock = dir.as_path().join("garbage.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let e = VfioUserBackend::connect(&sock).err().unwrap().to_string();
    assert!(e.contains("vfio-user server at"), "{e}");
}

/// The groups a test's factory made, for inspection.
type Groups = Arc<Mutex<Vec<(u16, Arc<pci::RecordingMsiGroup>)>>>;

fn msix_device(fake: Fake) -> Result<(VfioPciDevice, Groups), super::VfioPciError> {
    let groups: Groups = Arc::default();
    let made = groups.clone();
    let factory = move |n: u16| -> io::Result<Arc<dyn pci::MsiInterruptGroup>> {
        let g = Arc::new(pci::RecordingMsiGroup::new(n)?);
        made.lock().unwrap().push((n, g.clone()));
        Ok(g)
    };
    let line: Arc<dyn IntxInterrupt> = Arc::new(Line(EventFd::new(0).unwrap()));
    let dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), Some(line), Some(&factory))?;
    Ok((dev, groups))
}

fn nic(vectors: u16) -> (VfioPciDevice, Arc<Mutex<Log>>, Arc<pci::RecordingMsiGroup>) {
    let (fake, log) = Fake::nic(vectors);
    let (dev, groups) = msix_device(fake).unwrap();
    let groups = groups.lock().unwrap();
    // MSI (one vector) at 0x50, then MSI-X at 0x70.
    assert_eq!(groups.len(), 2);
    assert_eq!((groups[0].0, groups[1].0), (1, vectors));
    (dev, log, groups[1].1.clone())
}

/// Programs table entry `v` through BAR0 as a guest driver does.
fn program(dev: &mut VfioPciDevice, v: u64, addr: u64, data: u32, masked: bool) {
    let base = 0x2000 + v * 16;
    dev.write_bar(0, base, &addr.to_le_bytes());
    dev.write_bar(0, base + 8, &data.to_le_bytes());
    dev.write_bar(0, base + 12, &u32::from(masked).to_le_bytes());
}

/// Writes the MSI-X message control word (capability at 0x70).
fn msix_control(dev: &mut VfioPciDevice, control: u16) {
    dev.write_config_register(0x70 / 4, 2, &control.to_le_bytes());
}

#[test]
fn msi_and_msix_capabilities_are_exposed_alone() {
    let (mut dev, log, _) = nic(4);
    // Capability list bit and pointer: PM hidden, MSI first.
    assert_eq!(dev.read_config_register(1) >> 16 & 0x10, 0x10);
    assert_eq!(dev.read_config_register(13) & 0xff, 0x50);
    // MSI: ID 5, next MSI-X, one vector, 32-bit, no masking.
    assert_eq!(dev.read_config_register(0x50 / 4), 0x0000_7005);
    // ID 0x11, next the vendor capability, table size 4, disabled.
    assert_eq!(dev.read_config_register(0x70 / 4), 0x0003_9011);
    assert_eq!(dev.read_config_register(0x74 / 4), 0x2000);
    assert_eq!(dev.read_config_register(0x78 / 4), 0x3000);
    // The table and PBA locators and ID are read-only and not forwarded.
    dev.write_config_register(0x74 / 4, 0, &0xffff_ffffu32.to_le_bytes());
    dev.write_config_register(0x70 / 4, 0, &[0xff, 0xff]);
    assert_eq!(dev.read_config_register(0x74 / 4), 0x2000);
    assert_eq!(dev.read_config_register(0x70 / 4), 0x0003_9011);
    assert!(log.lock().unwrap().config_writes.is_empty());
    // One 64-bit BAR.
    let bars = dev.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!((bars[0].index, bars[0].region), (0, BarRegion::Mmio64));
    // INTx until the guest enables MSI-X.
    assert_eq!(log.lock().unwrap().irq_fds, vec![(INTX_IRQ, 1)]);
    assert!(!dev.msix_enabled());
}

#[test]
fn msix_table_and_pba_are_trapped() {
    let (mut dev, log, g) = nic(4);
    program(&mut dev, 1, 0xfee0_1000, 0x41, false);
    let mut q = [0u8; 8];
    dev.read_bar(0, 0x2010, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
    let mut d = [0u8; 4];
    dev.read_bar(0, 0x2018, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x41);
    // The vector's route carries the message, but it is masked: MSI-X is
    // disabled.
    let rec = g.vector(1).unwrap();
    assert_eq!((rec.msg.addr, rec.msg.data), (0xfee0_1000, 0x41));
    assert!(rec.masked);
    // PBA reads are emulated, writes to it dropped.
    dev.write_bar(0, 0x3000, &[0xff; 8]);
    dev.read_bar(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8]);
    // Odd sizes and straddling accesses do not panic nor reach the device.
    dev.write_bar(0, 0x2000 - 2, &[1, 2, 3, 4]);
    dev.write_bar(0, 0x203e, &[1, 2, 3, 4]);
    dev.write_bar(0, 0x2001, &[1, 2, 3]);
    dev.read_bar(0, 0x2ffe, &mut d);
    dev.read_bar(0, 0x1ffe, &mut d);
    assert_eq!(d, [0xff; 4]);
    // Elsewhere in the BAR, accesses reach the device.
    dev.write_bar(0, 0x1000, &[7]);
    dev.write_bar(0, 0x2040, &[8]); // past a 4-entry table
    dev.read_bar(0, 0x1000, &mut d);
    assert_eq!(d, [0x5a; 4]);
    assert_eq!(
        log.lock().unwrap().bar_writes,
        vec![(0, 0x1000, vec![7]), (0, 0x2040, vec![8])]
    );
}

#[test]
fn msix_enable_routes_vectors_and_disable_returns_to_intx() {
    let (mut dev, log, g) = nic(4);
    program(&mut dev, 0, 0xfee0_0000, 0x30, false);
    program(&mut dev, 2, 0xfee0_2000, 0x32, true);
    // Enable (and function mask) with a one-byte write to the top byte.
    dev.write_config_register(0x70 / 4, 3, &[0xc0]);
    assert!(dev.msix_enabled());
    assert_eq!(dev.read_config_register(0x70 / 4) >> 16, 0xc003);
    assert_eq!(
        log.lock().unwrap().irq_fds,
        vec![(INTX_IRQ, 1), (INTX_IRQ, 0), (MSIX_IRQ, 4)]
    );
    // Function masked: every vector masked.
    assert!(g.vector(0).unwrap().masked);
    msix_control(&mut dev, 0x8000);
    let v0 = g.vector(0).unwrap();
    assert!(!v0.masked);
    assert_eq!((v0.msg.addr, v0.msg.data), (0xfee0_0000, 0x30));
    // A masked vector stays masked until its mask bit clears.
    assert!(g.vector(2).unwrap().masked);
    dev.write_bar(0, 0x2000 + 2 * 16 + 12, &0u32.to_le_bytes());
    let v2 = g.vector(2).unwrap();
    assert!(!v2.masked);
    assert_eq!((v2.msg.addr, v2.msg.data), (0xfee0_2000, 0x32));
    // Masking it again drops its route.
    dev.write_bar(0, 0x2000 + 2 * 16 + 12, &1u32.to_le_bytes());
    assert!(g.vector(2).unwrap().masked);
    // Enabling twice changes nothing at the back end.
    msix_control(&mut dev, 0x8000);
    assert_eq!(log.lock().unwrap().irq_fds.len(), 3);
    // Disable: MSI-X off, INTx back, every vector masked.
    msix_control(&mut dev, 0);
    assert!(!dev.msix_enabled());
    assert_eq!(
        log.lock().unwrap().irq_fds[3..],
        [(MSIX_IRQ, 0), (INTX_IRQ, 1)]
    );
    assert!(g.vector(0).unwrap().masked);
    assert_eq!(dev.read_config_register(0x70 / 4) >> 16, 0x0003);
    // Removal with MSI-X enabled turns it off at the back end.
    msix_control(&mut dev, 0x8000);
    dev.reset();
    let l = log.lock().unwrap();
    assert!(l
        .irq_fds
        .ends_with(&[(MSIX_IRQ, 4), (MSIX_IRQ, 0), (INTX_IRQ, 0)]));
    assert_eq!(l.resets, 1);
}

#[test]
fn msix_vectors_are_bounded_by_the_back_end() {
    // The capability claims 8, the back end has 2: the guest sees 2.
    let (mut fake, _) = Fake::nic(8);
    fake.msix_count = 2;
    let (mut dev, groups) = msix_device(fake).unwrap();
    assert_eq!(groups.lock().unwrap()[1].0, 2);
    assert_eq!(dev.read_config_register(0x70 / 4) >> 16, 1);
    // Vector 2 does not exist: its table bytes reach the device (as any
    // byte of the BAR outside the table).
    let mut d = [0u8; 4];
    dev.read_bar(0, 0x2020, &mut d);
    assert_eq!(d, [0x5a; 4]);
}

#[test]
fn msix_is_hidden_when_it_cannot_work() {
    // No MSI-X interrupts at the back end.
    let (mut fake, _) = Fake::nic(4);
    fake.msix_count = 0;
    let (mut dev, groups) = msix_device(fake).unwrap();
    assert_eq!(groups.lock().unwrap().len(), 1); // MSI's
    assert_eq!(dev.read_config_register(13) & 0xff, 0x50);
    // MSI is followed by the vendor capability now.
    assert_eq!(dev.read_config_register(0x50 / 4) >> 8 & 0xff, 0x90);
    // Its control word is the device's again (passed through, not
    // offered in the list) and writes to it do not switch interrupts.
    msix_control(&mut dev, 0x8000);
    assert!(!dev.msix_enabled());
    // Table outside its BAR.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x74..0x78].copy_from_slice(&0x3ff8u32.to_le_bytes());
    fake.config[0x71] = 0; // no vendor capability in the list
    fake.msi_count = 0;
    let (mut dev, groups) = msix_device(fake).unwrap();
    assert!(groups.lock().unwrap().is_empty());
    assert_eq!(dev.read_config_register(1) >> 16 & 0x10, 0);
    assert_eq!(dev.read_config_register(13) & 0xff, 0);
    // Table in a BAR the device does not have.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x74] = 0x03;
    fake.config[0x71] = 0;
    fake.msi_count = 0;
    let (mut dev, _) = msix_device(fake).unwrap();
    assert_eq!(dev.read_config_register(13) & 0xff, 0);
    // No MSI factory given: INTx only.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x71] = 0;
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    assert_eq!(dev.read_config_register(13) & 0xff, 0);
    // The factory fails: a clear error.
    let (fake, _) = Fake::nic(4);
    let factory =
        |_: u16| -> io::Result<Arc<dyn pci::MsiInterruptGroup>> { Err(io::Error::other("no GSI")) };
    let err = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, Some(&factory))
        .err()
        .unwrap();
    assert!(err.to_string().contains("MSI interrupt group"), "{err}");
}

#[test]
fn malformed_capability_lists_end_the_walk() {
    use super::device::walk_capabilities;
    let (fake, _) = Fake::nic(4);
    let ok = fake.config;
    assert_eq!(
        walk_capabilities(&ok),
        vec![(0x40, 1), (0x50, 5), (0x70, 0x11), (0x90, 9)]
    );
    // No capability list bit: nothing.
    let mut c = ok;
    c[6] = 0;
    assert!(walk_capabilities(&c).is_empty());
    // A cycle: 0x40 -> 0x50 -> 0x40.
    let mut c = ok;
    c[0x51] = 0x40;
    assert_eq!(walk_capabilities(&c), vec![(0x40, 1), (0x50, 5)]);
    // A self-loop at the start.
    let mut c = ok;
    c[0x41] = 0x40;
    assert_eq!(walk_capabilities(&c), vec![(0x40, 1)]);
    // A pointer into the header, and a first pointer into it.
    let mut c = ok;
    c[0x51] = 0x10;
    assert_eq!(walk_capabilities(&c), vec![(0x40, 1), (0x50, 5)]);
    c[0x34] = 0x3c;
    assert!(walk_capabilities(&c).is_empty());
    // The low two bits of pointers are ignored; the last dword is valid.
    let mut c = ok;
    c[0x34] = 0xff;
    c[0xfc] = 0x11;
    c[0xfd] = 0x43;
    let caps = walk_capabilities(&c);
    assert_eq!(caps[0], (0xfc, 0x11));
    assert_eq!(caps[1], (0x40, 1));
    // The longest possible chain is cut at 48 entries.
    let mut c = ok;
    c[0x34] = 0x40;
    for i in 0..48usize {
        let o = 0x40 + 4 * i;
        c[o] = 0x09;
        c[o + 1] = if i == 47 { 0x40 } else { (o + 4) as u8 };
    }
    assert_eq!(walk_capabilities(&c).len(), 48);
    // An MSI-X capability in the last dword runs past the space: hidden,
    // the device still works.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x34] = 0xfc;
    fake.config[0xfc] = 0x11;
    fake.config[0xfd] = 0;
    let (mut dev, groups) = msix_device(fake).unwrap();
    assert!(groups.lock().unwrap().is_empty());
    assert_eq!(dev.read_config_register(13) & 0xff, 0);
    // A cyclic list with MSI-X in it: exposed once; the list offered ends
    // at the vendor capability whose pointer closed the cycle.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x91] = 0x40;
    let (mut dev, _) = msix_device(fake).unwrap();
    assert_eq!(dev.read_config_register(0x70 / 4) & 0xffff, 0x9011);
    assert_eq!(dev.read_config_register(0x90 / 4) & 0xffff, 0x0009);
}

#[test]
fn vendor_capabilities_are_offered_read_and_written_through() {
    let (fake, log) = Fake::nic(4);
    let mut fake = fake;
    // Two vendor capabilities, as virtio-pci has: 0x90 -> 0xa0, with
    // bodies (cap_len 16, cfg_type, bar, ..., offset, length).
    fake.config[0x91] = 0xa0;
    fake.config[0x92..0x94].copy_from_slice(&[16, 1]);
    fake.config[0x98..0x9c].copy_from_slice(&0x1000u32.to_le_bytes());
    fake.config[0xa0] = 0x09;
    fake.config[0xa1] = 0x40; // back to PM: a cycle the walk cuts
    fake.config[0xa2..0xa4].copy_from_slice(&[20, 2]);
    let (mut dev, _) = msix_device(fake).unwrap();
    // MSI -> MSI-X -> 0x90 -> 0xa0 -> end.
    assert_eq!(dev.read_config_register(13) & 0xff, 0x50);
    assert_eq!(dev.read_config_register(0x70 / 4) >> 8 & 0xff, 0x90);
    assert_eq!(dev.read_config_register(0x90 / 4), 0x0110_a009);
    assert_eq!(dev.read_config_register(0x98 / 4), 0x1000);
    assert_eq!(dev.read_config_register(0xa0 / 4), 0x0214_0009);
    // Their registers are the device's: writes go to it, at their offset
    // and size (virtio's PCI configuration access window is written so).
    dev.write_config_register(0x98 / 4, 1, &[0xab, 0xcd]);
    dev.write_config_register(0xa0 / 4, 0, &0x1234_5678u32.to_le_bytes());
    assert_eq!(
        log.lock().unwrap().config_writes,
        vec![
            (0x99, vec![0xab, 0xcd]),
            (0xa0, 0x1234_5678u32.to_le_bytes().to_vec())
        ]
    );
    // The PM capability (0x40) stays hidden: its bytes read through, it
    // is not in the list.
    assert_eq!(dev.read_config_register(0x40 / 4) & 0xff, 0x01);

    // Offered without MSI or MSI-X too (no interrupt groups).
    let (mut fake, _) = Fake::gpio(256);
    fake.config[0x40] = 0x09;
    fake.config[0x41] = 0x00;
    let line: Arc<dyn IntxInterrupt> = Arc::new(Line(EventFd::new(0).unwrap()));
    let mut dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), Some(line), None).unwrap();
    assert_eq!(dev.read_config_register(1) >> 16 & 0x10, 0x10);
    assert_eq!(dev.read_config_register(13) & 0xff, 0x40);
    assert_eq!(dev.read_config_register(0x40 / 4) & 0xffff, 0x0009);

    // A vendor capability inside the emulated MSI one (0x54, its message
    // address) is not offered: MSI's next pointer skips it.
    let (mut fake, _) = Fake::nic(4);
    fake.config[0x51] = 0x54;
    fake.config[0x54] = 0x09;
    fake.config[0x55] = 0x70;
    let (mut dev, _) = msix_device(fake).unwrap();
    assert_eq!(dev.read_config_register(0x50 / 4) >> 8 & 0xff, 0x70);
    assert_eq!(dev.read_config_register(0x54 / 4), 0);
    // A failed back end reads all-ones there too.
    let (mut dev, log, _) = nic(4);
    log.lock().unwrap().dead = true;
    assert_eq!(dev.read_config_register(0x90 / 4), u32::MAX);
}

#[test]
fn msix_with_a_failing_back_end_does_not_panic() {
    let (mut dev, log, _) = nic(4);
    log.lock().unwrap().dead = true;
    // The back end's config reads fail; MSI-X registers are virtual.
    assert_eq!(dev.read_config_register(16), u32::MAX);
    assert!(dev.failure().is_some());
    msix_control(&mut dev, 0x8000);
    assert!(!dev.msix_enabled());
    program(&mut dev, 7, 0, 0, false);
    let mut d = [0u8; 4];
    dev.read_bar(0, 0x2000, &mut d);
    assert_eq!(d, [0xff; 4]);
    dev.reset();
}

#[test]
fn signals_of_masked_vectors_are_pending_in_the_pba() {
    use pci::MsiInterruptGroup;
    let (mut dev, _, g) = nic(4);
    program(&mut dev, 1, 0xfee0_1000, 0x41, true);
    program(&mut dev, 3, 0xfee0_3000, 0x43, false);
    // Disabled: the PBA reads zero and signals are not looked at.
    g.notifier(1).unwrap().write(1).unwrap();
    let mut q = [0u8; 8];
    dev.read_bar(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8]);
    msix_control(&mut dev, 0x8000);
    // The device signalled masked vector 1 (the eventfd still counts it).
    dev.read_bar(0, 0x3000, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0b10);
    // A byte read of the PBA sees the same bit.
    let mut b = [0u8; 1];
    dev.read_bar(0, 0x3000, &mut b);
    assert_eq!(b, [0b10]);
    assert_eq!(g.trigger_count(1), 0);
    // Unmasking delivers it once and clears the bit.
    dev.write_bar(0, 0x2000 + 16 + 12, &0u32.to_le_bytes());
    assert_eq!(g.trigger_count(1), 1);
    dev.read_bar(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8]);
    // Unmasked vectors' eventfds are left to the hypervisor.
    g.notifier(3).unwrap().write(1).unwrap();
    dev.read_bar(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8]);
    assert_eq!(g.notifier(3).unwrap().read().unwrap(), 1);
}

/// The NIC with MSI-X unusable and an MSI capability of 8 vectors (64-bit,
/// per-vector masking) of which the back end has `msi` vectors.
fn msi_nic(msi: u32) -> (VfioPciDevice, Arc<Mutex<Log>>, Arc<pci::RecordingMsiGroup>) {
    let (mut fake, log) = Fake::nic(4);
    fake.msix_count = 0;
    fake.msi_count = msi;
    let control: u16 = (3 << 1) | (1 << 7) | (1 << 8);
    fake.config[0x52..0x54].copy_from_slice(&control.to_le_bytes());
    let (dev, groups) = msix_device(fake).unwrap();
    let g = groups.lock().unwrap();
    assert_eq!(g.len(), 1);
    (dev, log, g[0].1.clone())
}

fn msi_write(dev: &mut VfioPciDevice, at: usize, value: u32, len: usize) {
    let bytes = value.to_le_bytes();
    dev.write_config_register(at / 4, (at % 4) as u64, &bytes[..len]);
}

#[test]
fn msi_multiple_messages_are_routed_and_masked() {
    use pci::MsiInterruptGroup;
    let (mut dev, log, g) = msi_nic(4);
    // Four vectors (MMC 2: the back end's limit), 64-bit, masking; MSI
    // is followed by the vendor capability only.
    assert_eq!(dev.read_config_register(13) & 0xff, 0x50);
    assert_eq!(dev.read_config_register(0x50 / 4), 0x0184_9005);
    msi_write(&mut dev, 0x54, 0xfee0_0000, 4);
    msi_write(&mut dev, 0x58, 0, 4);
    msi_write(&mut dev, 0x5c, 0x40, 2);
    msi_write(&mut dev, 0x60, 0b1000, 4);
    assert_eq!(dev.read_config_register(0x54 / 4), 0xfee0_0000);
    assert_eq!(dev.read_config_register(0x5c / 4), 0x40);
    // Enable with MME 2 (four vectors).
    msi_write(&mut dev, 0x52, 0x0025, 2);
    assert_eq!(dev.msi_vectors(), 4);
    assert_eq!(
        log.lock().unwrap().irq_fds,
        vec![(INTX_IRQ, 1), (INTX_IRQ, 0), (MSI_IRQ, 4)]
    );
    // Each vector's route carries its own data (low bits = vector).
    let v2 = g.vector(2).unwrap();
    assert_eq!(
        (v2.msg.addr, v2.msg.data, v2.masked),
        (0xfee0_0000, 0x42, false)
    );
    assert!(g.vector(3).unwrap().masked);
    // The device signalled masked vector 3: pending, delivered on unmask.
    g.notifier(3).unwrap().write(1).unwrap();
    assert_eq!(dev.read_config_register(0x64 / 4), 0b1000);
    msi_write(&mut dev, 0x60, 0, 4);
    assert_eq!(g.trigger_count(3), 1);
    assert_eq!(dev.read_config_register(0x64 / 4), 0);
    assert!(!g.vector(3).unwrap().masked);
    // Fewer vectors: the back end is told again.
    msi_write(&mut dev, 0x52, 0x0013, 2);
    assert_eq!(dev.msi_vectors(), 2);
    assert!(g.vector(3).unwrap().masked);
    // More than the capability offers: clamped to four.
    msi_write(&mut dev, 0x52, 0x0071, 2);
    assert_eq!(dev.msi_vectors(), 4);
    // Read-only bits stay.
    assert_eq!(dev.read_config_register(0x50 / 4) >> 16 & 0x18e, 0x184);
    // Disable: INTx back.
    msi_write(&mut dev, 0x52, 0, 2);
    assert_eq!(dev.msi_vectors(), 0);
    let l = log.lock().unwrap();
    assert_eq!(
        l.irq_fds[3..],
        [
            (MSI_IRQ, 0),
            (MSI_IRQ, 2),
            (MSI_IRQ, 0),
            (MSI_IRQ, 4),
            (MSI_IRQ, 0),
            (INTX_IRQ, 1)
        ]
    );
    // Nothing of the capability reached the device.
    assert!(l.config_writes.is_empty());
}

#[test]
fn msi_vectors_are_a_power_of_two_both_allow() {
    // The back end has 3 MSI vectors: the guest is offered 2.
    let (mut dev, _, _) = msi_nic(3);
    assert_eq!(dev.read_config_register(0x50 / 4) >> 17 & 7, 1);
    // No MSI at the back end: hidden, only the vendor capability offered.
    let (mut fake, _) = Fake::nic(4);
    fake.msix_count = 0;
    fake.msi_count = 0;
    let (mut dev, groups) = msix_device(fake).unwrap();
    assert!(groups.lock().unwrap().is_empty());
    assert_eq!(dev.read_config_register(13) & 0xff, 0x90);
    msi_write(&mut dev, 0x52, 1, 2);
    assert_eq!(dev.msi_vectors(), 0);
}

#[test]
fn msi_and_msix_are_exclusive() {
    let (mut dev, log, _) = nic(4);
    msi_write(&mut dev, 0x52, 1, 2);
    assert_eq!(dev.msi_vectors(), 1);
    // MSI-X enabled too (the guest must not): MSI stays in use.
    msix_control(&mut dev, 0x8000);
    assert!(!dev.msix_enabled());
    assert_eq!(dev.msi_vectors(), 1);
    // MSI disabled: now MSI-X.
    msi_write(&mut dev, 0x52, 0, 2);
    assert!(dev.msix_enabled());
    assert_eq!(
        log.lock().unwrap().irq_fds,
        vec![
            (INTX_IRQ, 1),
            (INTX_IRQ, 0),
            (MSI_IRQ, 1),
            (MSI_IRQ, 0),
            (MSIX_IRQ, 4)
        ]
    );
    // Odd writes into the capabilities do not panic.
    for at in 0x50..0x80usize {
        for len in [1usize, 2, 4] {
            if at % 4 + len <= 4 {
                msi_write(&mut dev, at, u32::MAX, len);
            }
        }
    }
}

#[test]
fn direct_ranges_are_whole_pages_without_the_msix_pages() {
    use super::device::direct_ranges;
    let p = 0x1000;
    // The whole BAR.
    assert_eq!(
        direct_ranges(0x4000, &[(0, 0x4000)], &[], p),
        vec![(0, 0x4000)]
    );
    // Smaller than a page: trapped.
    assert!(direct_ranges(0x800, &[(0, 0x800)], &[], p).is_empty());
    // Areas rounded inward, clipped to the region, merged.
    assert_eq!(
        direct_ranges(0x3800, &[(0x10, 0x2000), (0x1000, 0x8000)], &[], p),
        vec![(0x1000, 0x2000)]
    );
    assert_eq!(
        direct_ranges(0x4000, &[(0x2000, 0x2000), (0, 0x2000)], &[], p),
        vec![(0, 0x4000)]
    );
    // An MSI-X table in the middle and a PBA sharing a page with other
    // registers: every page they touch stays trapped.
    assert_eq!(
        direct_ranges(0x8000, &[(0, 0x8000)], &[(0x2000, 0x40), (0x5ff8, 0x10)], p),
        vec![(0, 0x2000), (0x3000, 0x2000), (0x7000, 0x1000)]
    );
    // Excluding everything, or ranges overflowing, leaves nothing / does
    // not panic.
    assert!(direct_ranges(0x2000, &[(0, 0x2000)], &[(0, 0x2000)], p).is_empty());
    assert!(direct_ranges(u64::MAX, &[(u64::MAX - 5, 10)], &[(u64::MAX, 1)], p).is_empty());
    assert_eq!(
        direct_ranges(0x2000, &[(0, u64::MAX)], &[(u64::MAX - 1, 2)], p),
        vec![(0, 0x2000)]
    );
}

/// A NIC (16 KiB BAR0, MSI-X table at 0x2000, PBA at 0x3000) whose BAR0
/// is mmap-able whole from a memfd.
fn mapped_nic() -> (VfioPciDevice, File, Arc<Mutex<Log>>) {
    let (mut fake, log) = Fake::nic(4);
    let file = fake.mappable(0, 0x4000, 0, &[(0, 0x4000)]);
    let (dev, _) = msix_device(fake).unwrap();
    (dev, file, log)
}

#[test]
fn mmap_able_bars_are_mapped_less_the_msix_pages() {
    use std::os::unix::fs::FileExt;
    let (mut dev, file, log) = mapped_nic();
    let areas = dev.direct_areas();
    assert_eq!(areas.len(), 1, "{areas:?}");
    let a = &areas[0];
    assert_eq!((a.bar, a.offset, a.mapping.size()), (0, 0, 0x2000));
    assert!(a.mapping.writable());
    // The mapping is the device's memory: what the guest writes there the
    // file has, and the other way round.
    // SAFETY: a live mapping of 0x2000 bytes, held by `a`.
    let host = unsafe { std::slice::from_raw_parts_mut(a.mapping.host_addr() as *mut u8, 0x2000) };
    host[0x100..0x104].copy_from_slice(&[1, 2, 3, 4]);
    let mut b = [0u8; 4];
    file.read_exact_at(&mut b, 0x100).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    file.write_all_at(&[9, 8], 0x1ffe).unwrap();
    assert_eq!(host[0x1ffe..], [9, 8]);
    // Accesses that still reach the model (the guest's memory decode off,
    // the rest of the BAR) are forwarded or emulated as before.
    dev.write_bar(0, 0x100, &[7]);
    assert_eq!(log.lock().unwrap().bar_writes, vec![(0, 0x100, vec![7])]);
    dev.read_bar(0, 0x3000, &mut b);
    assert_eq!(b, [0; 4], "the PBA is still emulated");
    // Removal drops the model's handle; the VMM's (here, `areas`) keeps
    // the mapping alive until it lets go.
    dev.reset();
    assert!(dev.direct_areas().is_empty());
    host[0] = 5;
    drop(areas);
}

#[test]
fn what_cannot_be_mapped_stays_trapped() {
    // Not mmap-able: no areas.
    let (fake, _) = Fake::nic(4);
    let (dev, _) = msix_device(fake).unwrap();
    assert!(dev.direct_areas().is_empty());
    // A BAR smaller than a page.
    let (mut fake, _) = Fake::nic(1);
    fake.config[0x74..0x78].copy_from_slice(&0x100u32.to_le_bytes());
    fake.config[0x78..0x7c].copy_from_slice(&0x200u32.to_le_bytes());
    fake.regions[0].size = 0x800;
    fake.mappable(0, 0x1000, 0, &[(0, 0x800)]);
    let (dev, _) = msix_device(fake).unwrap();
    assert!(dev.direct_areas().is_empty());
    // The region's place in the file is not page-aligned.
    let (mut fake, _) = Fake::nic(4);
    fake.mappable(0, 0x8000, 0x10, &[(0, 0x4000)]);
    let (dev, _) = msix_device(fake).unwrap();
    assert!(dev.direct_areas().is_empty());
    // The server's file is shorter than the area: the guest's access
    // would fault in KVM_RUN.
    let (mut fake, _) = Fake::nic(4);
    fake.mappable(0, 0x1000, 0, &[(0, 0x4000)]);
    let (dev, _) = msix_device(fake).unwrap();
    assert!(dev.direct_areas().is_empty());
    // An I/O BAR is never mapped.
    let (mut fake, _) = Fake::gpio(256);
    fake.mappable(2, 0x1000, 0, &[(0, 0x1000)]);
    let dev = VfioPciDevice::new(Box::new(fake), &shared_memory(), None, None).unwrap();
    assert!(dev.direct_areas().is_empty());
    // A sparse area past the MSI-X pages, read-only: mapped so, from the
    // region's offset in the file.
    let (mut fake, _) = Fake::nic(4);
    fake.regions[0].flags = REGION_READ;
    let file = fake.mappable(0, 0x8000, 0x1000, &[(0x1000, 0x1000), (0x2000, 0x2000)]);
    let (dev, _) = msix_device(fake).unwrap();
    let areas = dev.direct_areas();
    assert_eq!(areas.len(), 1);
    assert_eq!((areas[0].offset, areas[0].mapping.size()), (0x1000, 0x1000));
    assert!(!areas[0].mapping.writable());
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x42], 0x2000).unwrap();
    // SAFETY: a live mapping of 0x1000 bytes, held by `areas`.
    let first = unsafe { *(areas[0].mapping.host_addr() as *const u8) };
    assert_eq!(first, 0x42);
}
