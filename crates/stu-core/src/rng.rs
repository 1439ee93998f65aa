//! A small deterministic generator (splitmix64) for synthetic data, sampling and tests: the same
//! seed gives the same numbers on every platform and in every build.

/// splitmix64 (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Skips the next `n` draws of [`SplitMix64::next_u64`] in O(1) (the state is a counter), so
    /// that a long stream can be generated in parallel pieces, bit for bit as one.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }

    /// `n` standard normals (each [`SplitMix64::normal`], two draws) times `scale`, generated in
    /// parallel pieces of the same stream: the same values, in the same order, as `n` calls in a
    /// row.
    pub fn normals_par(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.par_values(n, 2, |r| (r.normal() * scale) as f32)
    }

    /// `n` values uniform in `[−bound, bound)` (each one draw), generated in parallel pieces of
    /// the same stream, as [`SplitMix64::normals_par`].
    pub fn uniforms_par(&mut self, n: usize, bound: f64) -> Vec<f32> {
        self.par_values(n, 1, |r| r.uniform(-bound, bound) as f32)
    }

    /// `n` values of `value`, which takes `draws` draws each, in parallel pieces of the stream.
    fn par_values(&mut self, n: usize, draws: u64, value: impl Fn(&mut Self) -> f32 + Sync) -> Vec<f32> {
        use rayon::prelude::*;
        const PIECE: usize = 1 << 16;
        let start = self.clone();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(PIECE).enumerate().for_each(|(i, piece)| {
            let mut r = start.clone();
            r.skip(draws * (i * PIECE) as u64);
            for v in piece {
                *v = value(&mut r);
            }
        });
        self.skip(draws * n as u64);
        out
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(f64::MIN_POSITIVE, 1.0), self.uniform(0.0, 1.0));
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Uniform integer in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` values uniform in `[lo, hi)` as f32.
    pub fn fill_f32(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo as f64, hi as f64) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn parallel_normals_are_the_sequential_stream() {
        let n = (1 << 16) * 2 + 777;
        let (mut a, mut b) = (SplitMix64::new(5), SplitMix64::new(5));
        let seq: Vec<f32> = (0..n).map(|_| (a.normal() * 0.3) as f32).collect();
        assert_eq!(b.normals_par(n, 0.3), seq);
        assert_eq!(a.next_u64(), b.next_u64(), "the generator ends where the sequential one does");
    }

    #[test]
    fn parallel_uniforms_are_the_sequential_stream() {
        let n = (1 << 16) * 2 + 777;
        let (mut a, mut b) = (SplitMix64::new(9), SplitMix64::new(9));
        let seq: Vec<f32> = (0..n).map(|_| a.uniform(-0.25, 0.25) as f32).collect();
        assert_eq!(b.uniforms_par(n, 0.25), seq);
        assert_eq!(a.next_u64(), b.next_u64(), "the generator ends where the sequential one does");
    }

    #[test]
    fn deterministic_and_in_range() {
        let a: Vec<u64> = { let mut r = SplitMix64::new(1); (0..4).map(|_| r.next_u64()).collect() };
        let b: Vec<u64> = { let mut r = SplitMix64::new(1); (0..4).map(|_| r.next_u64()).collect() };
        assert_eq!(a, b);
        let mut r = SplitMix64::new(2);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.uniform(0.0, 1.0))));
        let mean = (0..20000).map(|_| r.normal()).sum::<f64>() / 20000.0;
        assert!(mean.abs() < 0.05, "{mean}");
    }
}
