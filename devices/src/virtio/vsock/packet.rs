//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its defensive parsing.
//!
//! Every packet starts with a 44-byte little-endian header; `len` bytes of payload follow
//! (only for `OP_RW`). The header is entirely guest-controlled on the TX queue, so
//! [`Header::parse`] checks what it can in isolation (buffer length, payload length against
//! the chain and [`MAX_PAYLOAD`]); the muxer checks the rest (CIDs, type, op, state).

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload we accept from the guest or put into one RX buffer (the Linux driver
/// never sends more than 64 KiB per packet).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Well-known CID of the host.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// One or both directions shut down (see [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Request for credit information.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` bits of `OP_SHUTDOWN`.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// A decoded packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

/// Why a TX packet was dropped before reaching the muxer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain holds fewer than [`HDR_LEN`] readable bytes.
    #[error("packet shorter than the {HDR_LEN}-byte header ({0} bytes)")]
    ShortHeader(u64),
    /// `len` exceeds the bytes that follow the header in the chain.
    #[error("payload length {len} larger than the {avail} bytes in the buffer")]
    LenBeyondChain {
        /// Header `len`.
        len: u32,
        /// Readable bytes after the header.
        avail: u64,
    },
    /// `len` exceeds [`MAX_PAYLOAD`].
    #[error("payload length {0} larger than {MAX_PAYLOAD}")]
    TooBig(u32),
}

fn u16_at(b: &[u8; HDR_LEN], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Decode a header from raw bytes (no validation).
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encode into raw bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decode the header of a TX chain with `readable` device-readable bytes in total, whose
    /// first [`HDR_LEN`] bytes are `raw` (`None` if the chain was shorter). Checks that the
    /// payload fits in the chain and in [`MAX_PAYLOAD`].
    pub fn parse(raw: Option<&[u8; HDR_LEN]>, readable: u64) -> Result<Self, PacketError> {
        let raw = match raw {
            Some(r) if readable >= HDR_LEN as u64 => r,
            _ => return Err(PacketError::ShortHeader(readable)),
        };
        let h = Self::from_bytes(raw);
        let avail = readable - HDR_LEN as u64;
        if u64::from(h.len) > avail {
            return Err(PacketError::LenBeyondChain { len: h.len, avail });
        }
        if h.len as usize > MAX_PAYLOAD {
            return Err(PacketError::TooBig(h.len));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_layout() {
        let h = Header {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 0xdeadbeef,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 2);
        assert_eq!(&b[20..24], &5000u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        let mut b2 = b;
        b2[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(Header::parse(Some(&b2), HDR_LEN as u64).is_ok());
    }

    #[test]
    fn hostile_headers_are_rejected() {
        assert_eq!(Header::parse(None, 10), Err(PacketError::ShortHeader(10)));
        let mut h = Header {
            len: 100,
            ..Default::default()
        };
        assert_eq!(
            Header::parse(Some(&h.to_bytes()), 44 + 99),
            Err(PacketError::LenBeyondChain {
                len: 100,
                avail: 99
            })
        );
        // A header claiming fewer readable bytes than itself.
        assert!(matches!(
            Header::parse(Some(&h.to_bytes()), 43),
            Err(PacketError::ShortHeader(43))
        ));
        h.len = u32::MAX;
        assert!(Header::parse(Some(&h.to_bytes()), u64::from(u32::MAX) + 100).is_err());
        h.len = MAX_PAYLOAD as u32 + 1;
        assert_eq!(
            Header::parse(Some(&h.to_bytes()), 1 << 20),
            Err(PacketError::TooBig(MAX_PAYLOAD as u32 + 1))
        );
    }
}
