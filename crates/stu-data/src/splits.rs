//! nnU-Net's 5-fold cross-validation split (`splits_final.json`), reproduced exactly:
//! sklearn `KFold(5, shuffle=True, random_state=12345)` over the sorted case ids, whose shuffle
//! is numpy's legacy `RandomState(12345).shuffle` (MT19937 with masked rejection sampling).
//! Train and validation lists come out sorted, as nnU-Net writes them
//! (`shared/docs/nnunet-pipeline.md` §1.3).

use serde::{Deserialize, Serialize};

/// MT19937 as numpy's legacy `RandomState` seeds and runs it.
struct Mt19937 {
    mt: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { mt, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's `random_interval(max)`: uniform in `[0, max]` by masked rejection.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16] {
            mask |= mask >> s;
        }
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `RandomState.shuffle` of a 1-D sequence.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.interval(i as u32) as usize;
            v.swap(i, j);
        }
    }
}

/// One fold of `splits_final.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    /// Training case ids, sorted.
    pub train: Vec<String>,
    /// Validation case ids, sorted.
    pub val: Vec<String>,
}

/// nnU-Net's default split of `ids` into 5 folds (needs at least 5 cases, as sklearn's KFold).
pub fn five_fold(ids: &[String]) -> Result<Vec<Fold>, String> {
    let mut keys: Vec<String> = ids.to_vec();
    keys.sort();
    keys.dedup();
    let n = keys.len();
    if n < 5 {
        return Err(format!("a 5-fold split needs at least 5 cases, found {n}; write splits_final.json by hand or train on fold `all`"));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    Mt19937::new(12345).shuffle(&mut idx);
    let mut folds = Vec::with_capacity(5);
    let mut start = 0;
    for f in 0..5 {
        let size = n / 5 + usize::from(f < n % 5);
        let mut is_val = vec![false; n];
        for &i in &idx[start..start + size] {
            is_val[i] = true;
        }
        start += size;
        let pick = |want: bool| (0..n).filter(|&i| is_val[i] == want).map(|i| keys[i].clone()).collect();
        folds.push(Fold { train: pick(false), val: pick(true) });
    }
    Ok(folds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    fn vals(folds: &[Fold]) -> Vec<Vec<usize>> {
        folds.iter().map(|f| f.val.iter().map(|s| s[5..].parse().unwrap()).collect()).collect()
    }

    #[test]
    fn sklearn_kfold_vectors() {
        // nnunet-pipeline.md §1.3 [verified with sklearn 1.5.2].
        assert_eq!(vals(&five_fold(&ids(10)).unwrap()), [vec![0, 7], vec![3, 9], vec![4, 6], vec![1, 8], vec![2, 5]]);
        assert_eq!(vals(&five_fold(&ids(7)).unwrap()), [vec![3, 6], vec![0, 4], vec![1], vec![5], vec![2]]);
        let f = five_fold(&ids(10)).unwrap();
        assert_eq!(f[0].train.len(), 8);
        assert!(f[0].train.windows(2).all(|w| w[0] < w[1]));
        assert!(five_fold(&ids(4)).unwrap_err().contains("at least 5"));
    }

    #[test]
    fn mt19937_matches_the_reference_stream() {
        // First output of MT19937 seeded with 5489 (the reference implementation's default).
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
    }
}
