//! A seeded random source for the randomized tests: the same sequence for a seed, everywhere.

/// xorshift64.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// `seed` with one to four changes: a byte replaced (often by one that delimits), bytes
    /// inserted, a range cut out or repeated, or the end cut off.
    pub(crate) fn mangle(&mut self, seed: &[u8]) -> Vec<u8> {
        const SPECIAL: &[u8] = b"\r\n: \t0\x00\x01\x03\x16\xff";
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(v.len() as u64 + 1) as usize;
            match self.below(7) {
                0 if at < v.len() => v[at] = SPECIAL[self.below(SPECIAL.len() as u64) as usize],
                // A multi-byte UTF-8 character over bytes in place (lengths still hold).
                6 => {
                    let c = ["\u{e9}", "\u{20ac}", "\u{1d11e}"][self.below(3) as usize].as_bytes();
                    if at + c.len() <= v.len() {
                        v[at..at + c.len()].copy_from_slice(c);
                    } else {
                        v.splice(at..at, c.iter().copied());
                    }
                }
                1 if at < v.len() => v[at] = self.next_u64() as u8,
                2 => {
                    let n = 1 + self.below(8) as usize;
                    let extra = self.bytes(n);
                    v.splice(at..at, extra);
                }
                3 if at < v.len() => {
                    let end = (at + 1 + self.below(16) as usize).min(v.len());
                    v.drain(at..end);
                }
                4 if at < v.len() => {
                    let end = (at + 1 + self.below(32) as usize).min(v.len());
                    let piece = v[at..end].to_vec();
                    v.splice(at..at, piece);
                }
                _ => v.truncate(at),
            }
        }
        v
    }
}
