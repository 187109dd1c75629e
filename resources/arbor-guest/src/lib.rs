//! The data pattern `arbor-guest blk-write`/`blk-verify` use, shared with the
//! host-side tests so both sides can write and check the same bytes.
//!
//! The pattern is a stream of 64-bit little-endian words: word `i` of seed
//! `s` is `splitmix64(s + i)`. It is cheap to compute (the guest runs under
//! instruction emulation on this project's machines) and any offset can be
//! computed on its own.

/// One step of SplitMix64: a well-mixed 64-bit value for `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of `seed` starting at byte `offset`.
/// `offset` and `buf.len()` must be multiples of 8.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let first = offset / 8;
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let w = splitmix64(seed.wrapping_add(first + i as u64));
        chunk.copy_from_slice(&w.to_le_bytes());
    }
}

/// The whole pattern of `seed`, `len` bytes (a multiple of 8).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, 0, &mut v);
    v
}

/// A running checksum over 64-bit words (FNV-1a style, one step per word),
/// printed by both sides to compare without moving the data.
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    /// Adds `data` (a multiple of 8 bytes).
    pub fn update(&mut self, data: &[u8]) {
        for chunk in data.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The value so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The checksum of `data` (a multiple of 8 bytes).
pub fn checksum(data: &[u8]) -> u64 {
    let mut c = Checksum::default();
    c.update(data);
    c.value()
}

/// [`Checksum`] over a byte stream that arrives in pieces of any length (a
/// socket's reads): bytes are taken in 64-bit words as they complete; a
/// final partial word is left out.
#[derive(Debug, Clone, Default)]
pub struct StreamChecksum {
    sum: Checksum,
    tail: [u8; 8],
    tail_len: usize,
    bytes: u64,
}

impl StreamChecksum {
    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            let t = self.tail;
            self.sum.update(&t);
            self.tail_len = 0;
        }
        let whole = data.len() / 8 * 8;
        self.sum.update(&data[..whole]);
        let rest = &data[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// The checksum of the whole words so far.
    pub fn value(&self) -> u64 {
        self.sum.value()
    }

    /// Bytes seen.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_checksum_ignores_how_data_is_split() {
        let data = pattern(9, 4096);
        let mut s = StreamChecksum::default();
        for piece in data.chunks(13) {
            s.update(piece);
        }
        assert_eq!(s.value(), checksum(&data));
        assert_eq!(s.bytes(), 4096);
    }

    #[test]
    fn fill_at_an_offset_matches_the_whole() {
        let whole = pattern(7, 4096);
        let mut part = vec![0u8; 1024];
        fill(7, 2048, &mut part);
        assert_eq!(&whole[2048..3072], &part[..]);
        assert_ne!(pattern(8, 64), pattern(7, 64));
    }

    #[test]
    fn checksum_is_incremental() {
        let data = pattern(3, 8192);
        let mut c = Checksum::default();
        c.update(&data[..4096]);
        c.update(&data[4096..]);
        assert_eq!(c.value(), checksum(&data));
        assert_ne!(checksum(&data), checksum(&pattern(4, 8192)));
    }
}
