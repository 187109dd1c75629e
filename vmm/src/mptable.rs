//! The MultiProcessor Specification (1.4) table: a floating pointer at the
//! start of the EBDA and the configuration table it points to, describing the
//! same machine as the MADT (processors, the IOAPIC, ISA interrupts) plus the
//! root bus's PCI INTx routing.
//!
//! Linux prefers the ACPI tables and ignores this one when the MADT lists the
//! local APICs and the IOAPIC; it matters for two reasons:
//! - without a floating pointer, Linux scans for one before it reads ACPI:
//!   the first KiB of memory, the last KiB of base memory and the 64 KiB BIOS
//!   area, mapping and unmapping a fixmap page (a TLB flush each) for every
//!   16 bytes. Under emulated KVM that scan took about 2-3 s of every boot;
//!   the pointer at `EBDA_START` (the start of the second area) ends it after
//!   65 steps;
//! - a guest booted with `acpi=off` finds its processors, IOAPIC and
//!   interrupt routing here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("cannot write the MP table to guest memory")]
    Write,
    #[error("the MP table ({0} bytes) is too large")]
    TooLarge(usize),
}

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Bus ids: Linux matches a PCI route's source bus against the PCI bus
/// number, so the PCI bus is the root bus, 0; ISA takes the last id (a PCI
/// bus 255, if the topology has one, is then looked up through its bridges,
/// which is how Linux finds every bus the table does not route).
const BUS_ISA: u8 = 0xff;
const BUS_PCI: u8 = 0;
/// Polarity and trigger "conform to the bus" (ISA: edge, active high).
const FLAGS_CONFORM: u16 = 0;
/// Active high, level (the SCI, as the MADT's override says).
const FLAGS_HIGH_LEVEL: u16 = 0x1 | (0x3 << 2);
/// Active low, level: PCI INTx, as Linux programs a `_PRT` GSI.
const FLAGS_LOW_LEVEL: u16 = 0x3 | (0x3 << 2);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The floating pointer and the configuration table, as written at
/// `base` (the configuration table follows the pointer). `pci_intx` are the
/// root bus's (slot, pin, GSI) routes.
pub fn build(base: u64, cpus: u8, pci_intx: &[(u8, u8, u32)]) -> Result<Vec<u8>, MpTableError> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |e: &[u8]| {
        entries.extend_from_slice(e);
        count += 1;
    };
    for id in 0..cpus {
        let flags = 0x1 | if id == 0 { 0x2 } else { 0 }; // enabled, BSP
        let mut e = vec![ENTRY_PROCESSOR, id, APIC_VERSION, flags];
        e.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        e.extend_from_slice(&((1u32 << 9) | 1).to_le_bytes()); // APIC, FPU
        e.extend_from_slice(&[0; 8]);
        push(&e);
    }
    push(&[ENTRY_BUS, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    push(&[ENTRY_BUS, BUS_PCI, b'P', b'C', b'I', b' ', b' ', b' ']);
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    push(&ioapic);
    let io_int = |kind: u8, flags: u16, bus: u8, irq: u8, pin: u8| {
        let f = flags.to_le_bytes();
        [
            ENTRY_IO_INTERRUPT,
            kind,
            f[0],
            f[1],
            bus,
            irq,
            ioapic_id,
            pin,
        ]
    };
    // ISA: the 8259's output on pin 0, IRQ 0 (the PIT) on pin 2 as in the
    // MADT's override, IRQ 9 (the SCI) level and active high, the others
    // identity mapped.
    push(&io_int(INT_TYPE_EXTINT, FLAGS_CONFORM, BUS_ISA, 0, 0));
    push(&io_int(INT_TYPE_INT, FLAGS_CONFORM, BUS_ISA, 0, 2));
    for irq in 1..16u8 {
        if irq == 2 {
            continue;
        }
        let flags = if irq == 9 {
            FLAGS_HIGH_LEVEL
        } else {
            FLAGS_CONFORM
        };
        push(&io_int(INT_TYPE_INT, flags, BUS_ISA, irq, irq));
    }
    // PCI: source IRQ = slot << 2 | pin.
    for &(slot, pin, gsi) in pci_intx {
        let Ok(gsi) = u8::try_from(gsi) else { continue };
        push(&io_int(
            INT_TYPE_INT,
            FLAGS_LOW_LEVEL,
            BUS_PCI,
            (slot << 2) | (pin & 3),
            gsi,
        ));
    }
    // LINT0 is the 8259's ExtINT, LINT1 the NMI, on every processor.
    push(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        0,
    ]);
    push(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        1,
    ]);

    let table_len = 44 + entries.len();
    let len16 = u16::try_from(table_len).map_err(|_| MpTableError::TooLarge(table_len))?;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&len16.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"ARBOR   "); // OEM id
    table.extend_from_slice(b"ARBORVMM    "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // its size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let config_addr = u32::try_from(base + 16).map_err(|_| MpTableError::TooLarge(table_len))?;
    let mut fp = Vec::with_capacity(16 + table_len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&config_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // a configuration table is present; no IMCR
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the table at `EBDA_START`; returns its size.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    pci_intx: &[(u8, u8, u32)],
) -> Result<usize, MpTableError> {
    let bytes = build(EBDA_START, cpus, pci_intx)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MpTableError::Write)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn pointer_and_table_are_consistent() {
        let pci = [(0u8, 0u8, 16u32), (9, 1, 18), (9, 2, 19)];
        let t = build(EBDA_START, 2, &pci).unwrap();
        // The floating pointer: signature, address of the table, length,
        // revision, checksum over its 16 bytes.
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
            EBDA_START + 16
        );
        assert_eq!((t[8], t[9]), (1, 4));
        assert_eq!(sum(&t[..16]), 0);
        // The configuration table.
        let c = &t[16..];
        assert_eq!(&c[0..4], b"PCMP");
        let len = u16::from_le_bytes([c[4], c[5]]) as usize;
        assert_eq!(len, c.len());
        assert_eq!(sum(c), 0);
        let count = u16::from_le_bytes([c[34], c[35]]) as usize;
        // 2 processors, 2 buses, 1 IOAPIC, ExtINT + 15 ISA, 3 PCI, 2 local.
        assert_eq!(count, 2 + 2 + 1 + 1 + 15 + 3 + 2);
        assert_eq!(len, 44 + 2 * 20 + (count - 2) * 8);
        // Entries in order; the BSP is the first processor.
        assert_eq!(&c[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(&c[64..68], &[ENTRY_PROCESSOR, 1, APIC_VERSION, 1]);
        let ioapic = &c[44 + 40 + 16..44 + 40 + 24];
        assert_eq!(ioapic[..4], [ENTRY_IOAPIC, 2, IOAPIC_VERSION, 1]);
        // The PCI routes: slot 9 INTB -> pin 18, level, active low.
        let routes = &c[len - 16 - 3 * 8..len - 16];
        assert_eq!(
            routes[8..16],
            [ENTRY_IO_INTERRUPT, 0, 0xf, 0, BUS_PCI, (9 << 2) | 1, 2, 18]
        );
        // The PCI routes name the root bus, 0, as Linux numbers it.
        assert!(routes.chunks(8).all(|e| e[4] == 0), "{routes:?}");
    }

    #[test]
    fn the_most_processors_fit_and_are_written() {
        let pci: Vec<(u8, u8, u32)> = (0..32u8)
            .flat_map(|s| (0..4u8).map(move |p| (s, p, 16 + u32::from(s + p) % 8)))
            .collect();
        let t = build(EBDA_START, 254, &pci).unwrap();
        assert!(t.len() < 0xe0000 - EBDA_START as usize, "{}", t.len());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = write(&mem, 254, &pci).unwrap();
        let mut back = vec![0u8; n];
        mem.read_slice(&mut back, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(back, t);
    }
}
