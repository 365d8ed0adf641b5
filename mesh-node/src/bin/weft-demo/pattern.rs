//! A deterministic pseudo-random byte stream, so that a sender and a verifier that share only
//! a seed agree on every byte, however the stream is cut into reads and writes.

/// xorshift64 (Marsaglia 13/7/17) emitting its words little-endian, byte by byte.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    /// Bytes of the last word not handed out yet; they sit at the end of `spare`.
    spare: [u8; 8],
    spare_len: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // xorshift never leaves the all-zero state, and neighbouring seeds (connection
        // indices) would give correlated streams: scramble the seed first.
        let state = match splitmix64(seed) {
            0 => 0x9E37_79B9_7F4A_7C15,
            s => s,
        };
        Self {
            state,
            spare: [0; 8],
            spare_len: 0,
        }
    }

    /// Writes the next `buf.len()` bytes of the stream into `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let take = self.spare_len.min(buf.len());
        let start = self.spare.len() - self.spare_len;
        buf[..take].copy_from_slice(&self.spare[start..start + take]);
        self.spare_len -= take;

        let mut words = buf[take..].chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.spare = self.next_word().to_le_bytes();
            tail.copy_from_slice(&self.spare[..tail.len()]);
            self.spare_len = self.spare.len() - tail.len();
        }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the first byte where `a` and `b` differ, comparing the common length.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous(seed: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        Pattern::new(seed).fill(&mut buf);
        buf
    }

    #[test]
    fn any_chunking_yields_the_same_stream() {
        let whole = contiguous(7, 4096);
        for sizes in [&[1usize][..], &[3, 5], &[7, 8, 9], &[13, 1, 64, 2], &[4096]] {
            let mut pattern = Pattern::new(7);
            let mut pieced = Vec::with_capacity(whole.len());
            let mut i = 0;
            while pieced.len() < whole.len() {
                let n = sizes[i % sizes.len()].min(whole.len() - pieced.len());
                let mut chunk = vec![0; n];
                pattern.fill(&mut chunk);
                pieced.extend_from_slice(&chunk);
                i += 1;
            }
            assert_eq!(pieced, whole, "chunk sizes {sizes:?}");
        }
    }

    #[test]
    fn seeds_give_distinct_streams() {
        let a = contiguous(0, 256);
        let b = contiguous(1, 256);
        assert_ne!(a, b);
        assert!(
            a.iter().any(|&x| x != 0),
            "seed 0 must not be a zero stream"
        );
    }

    #[test]
    fn stream_is_reproducible() {
        assert_eq!(contiguous(42, 1000), contiguous(42, 1000));
    }

    #[test]
    fn empty_fill_consumes_nothing() {
        let mut pattern = Pattern::new(3);
        pattern.fill(&mut []);
        let mut buf = vec![0; 16];
        pattern.fill(&mut buf);
        assert_eq!(buf, contiguous(3, 16));
    }

    #[test]
    fn first_difference_finds_the_offset() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abXd"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), None);
    }
}
