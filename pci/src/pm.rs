//! Power management capability (PCI PM 1.2, version 3).
//!
//! The power state field accepts only supported states (D0, D3hot and, if advertised, D1/D2);
//! a write of an unsupported state leaves the state unchanged, which the configuration space
//! enforces after each write. PME_Status is write-1-to-clear. No_Soft_Reset is set, so a
//! D3hot -> D0 transition does not reset the function's state.

/// Power management capability ID.
pub const PM_CAP_ID: u8 = 0x01;
/// Offset of PMCSR from the capability start.
pub const PM_PMCSR: usize = 4;
/// PMCSR power state mask.
pub const PMCSR_STATE_MASK: u16 = 0x3;
const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
const PMCSR_PME_EN: u16 = 1 << 8;
const PMCSR_PME_STATUS: u16 = 1 << 15;

/// Power management capability parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmCapability {
    /// D1 supported.
    pub d1: bool,
    /// D2 supported.
    pub d2: bool,
    /// PME support bits (bit 0 = D0, 1 = D1, 2 = D2, 3 = D3hot, 4 = D3cold).
    pub pme_support: u8,
}

impl PmCapability {
    /// Whether the function supports entering `state` (0..=3).
    pub fn supports(&self, state: u8) -> bool {
        match state {
            0 | 3 => true,
            1 => self.d1,
            2 => self.d2,
            _ => false,
        }
    }

    /// Body after the ID/next bytes: PMC, PMCSR, bridge extensions, data.
    pub fn body(&self) -> Vec<u8> {
        let mut pmc: u16 = 3; // version 3
        if self.d1 {
            pmc |= 1 << 9;
        }
        if self.d2 {
            pmc |= 1 << 10;
        }
        pmc |= u16::from(self.pme_support & 0x1f) << 11;
        let pmcsr: u16 = PMCSR_NO_SOFT_RESET;
        let mut b = Vec::with_capacity(6);
        b.extend_from_slice(&pmc.to_le_bytes());
        b.extend_from_slice(&pmcsr.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b
    }

    fn pme(&self) -> bool {
        self.pme_support & 0x1f != 0
    }

    /// Writable bits of the body.
    pub fn writable_mask(&self) -> Vec<u8> {
        let mut rw = PMCSR_STATE_MASK;
        if self.pme() {
            rw |= PMCSR_PME_EN;
        }
        let mut m = vec![0u8; 6];
        m[2..4].copy_from_slice(&rw.to_le_bytes());
        m
    }

    /// Write-1-to-clear bits of the body.
    pub fn w1c_mask(&self) -> Vec<u8> {
        let mut m = vec![0u8; 6];
        if self.pme() {
            m[2..4].copy_from_slice(&PMCSR_PME_STATUS.to_le_bytes());
        }
        m
    }
}
