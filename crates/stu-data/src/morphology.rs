//! Binary morphology on `[Z, Y, X]` masks: 26-connected components (skimage's `label` at full
//! connectivity, which nnU-Net's post-processing and cascade augmentation use), skimage's
//! `ball(r)` for fractional radii, and dilation, erosion, opening and closing as
//! batchgeneratorsv2 computes them (`tests/fixtures/make_morphology_fixture.py`).
//!
//! batchgeneratorsv2 dilates with an FFT convolution padded `'same'`: output voxel `i` is set
//! when any kernel voxel `j` lands on a set input voxel `i + j − ⌊(k−1)/2⌋`. An even-sized ball
//! is therefore off-centre by half a voxel, and erosion (the complement's dilation, zero padded)
//! never erodes from the volume's border. Here each kernel row along x is a run, and a row's
//! prefix sums answer "any set voxel in this run" in O(1): the cost is voxels × kernel rows.

/// The 26-connected components of the voxels whose value is `member`, neighbours joining when
/// `joined(a, b)` holds for their values: each voxel's component id (`u32::MAX` outside), and
/// each component's first value and size. Components are numbered in raster order of their
/// first voxel.
pub fn components(seg: &[u16], shape: [usize; 3], member: &(dyn Fn(u16) -> bool + Sync), joined: &dyn Fn(u16, u16) -> bool) -> (Vec<u32>, Vec<(u16, usize)>) {
    let n = seg.len();
    let mut comp = vec![u32::MAX; n];
    let mut sizes: Vec<(u16, usize)> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..n {
        if !member(seg[start]) || comp[start] != u32::MAX {
            continue;
        }
        let id = sizes.len() as u32;
        comp[start] = id;
        stack.push(start);
        let mut size = 0;
        while let Some(v) = stack.pop() {
            size += 1;
            let (z, y, x) = ((v / (shape[1] * shape[2])) as i64, (v / shape[2] % shape[1]) as i64, (v % shape[2]) as i64);
            for dz in -1..=1i64 {
                for dy in -1..=1i64 {
                    for dx in -1..=1i64 {
                        let (nz, ny, nx) = (z + dz, y + dy, x + dx);
                        if nz < 0 || ny < 0 || nx < 0 || nz >= shape[0] as i64 || ny >= shape[1] as i64 || nx >= shape[2] as i64 {
                            continue;
                        }
                        let w = (nz as usize * shape[1] + ny as usize) * shape[2] + nx as usize;
                        if member(seg[w]) && comp[w] == u32::MAX && joined(seg[v], seg[w]) {
                            comp[w] = id;
                            stack.push(w);
                        }
                    }
                }
            }
        }
        sizes.push((seg[start], size));
    }
    (comp, sizes)
}

/// A cubic structuring element of side `size`, `[z, y, x]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    /// Side length.
    pub size: usize,
    /// Membership of each of the `size³` voxels.
    pub set: Vec<bool>,
}

/// skimage's `ball(radius)` (`strict_radius=True`): `⌊2r + 1⌋` grid points spanning `[−r, r]`
/// per axis (numpy's `mgrid` with a complex step), the voxels with `x² + y² + z² ≤ r²`.
pub fn ball(radius: f64) -> Kernel {
    let size = (2.0 * radius + 1.0) as usize;
    let step = if size > 1 { (radius - -radius) / (size - 1) as f64 } else { 0.0 };
    let c = |i: usize| i as f64 * step + -radius;
    let mut set = Vec::with_capacity(size.pow(3));
    for z in 0..size {
        for y in 0..size {
            for x in 0..size {
                set.push(c(x).powi(2) + c(y).powi(2) + c(z).powi(2) <= radius * radius);
            }
        }
    }
    Kernel { size, set }
}

/// batchgeneratorsv2's `binary_dilation_torch` (see the module comment).
pub fn dilate(mask: &[bool], shape: [usize; 3], k: &Kernel) -> Vec<bool> {
    let [zn, yn, xn] = shape;
    let lo = ((k.size - 1) / 2) as i64;
    // Runs of set kernel voxels along x: (jz, jy, first jx, last jx).
    let mut runs = Vec::new();
    for jz in 0..k.size {
        for jy in 0..k.size {
            let row = &k.set[(jz * k.size + jy) * k.size..(jz * k.size + jy + 1) * k.size];
            let mut jx = 0;
            while jx < k.size {
                if row[jx] {
                    let a = jx;
                    while jx + 1 < k.size && row[jx + 1] {
                        jx += 1;
                    }
                    runs.push((jz as i64 - lo, jy as i64 - lo, a as i64 - lo, jx as i64 - lo));
                }
                jx += 1;
            }
        }
    }
    // Prefix counts of every input row.
    let mut prefix = vec![0u32; zn * yn * (xn + 1)];
    for r in 0..zn * yn {
        let p = &mut prefix[r * (xn + 1)..(r + 1) * (xn + 1)];
        for x in 0..xn {
            p[x + 1] = p[x] + u32::from(mask[r * xn + x]);
        }
    }
    use rayon::prelude::*;
    let mut out = vec![false; mask.len()];
    out.par_chunks_mut(yn * xn).enumerate().for_each(|(z, plane)| {
        for y in 0..yn {
            let line = &mut plane[y * xn..(y + 1) * xn];
            for &(dz, dy, a, b) in &runs {
                let (iz, iy) = (z as i64 + dz, y as i64 + dy);
                if iz < 0 || iy < 0 || iz >= zn as i64 || iy >= yn as i64 {
                    continue;
                }
                let p = &prefix[(iz as usize * yn + iy as usize) * (xn + 1)..][..xn + 1];
                if p[xn] == 0 {
                    continue;
                }
                for (x, o) in line.iter_mut().enumerate() {
                    if *o {
                        continue;
                    }
                    let from = (x as i64 + a).max(0);
                    let to = (x as i64 + b).min(xn as i64 - 1);
                    if from <= to && p[to as usize + 1] > p[from as usize] {
                        *o = true;
                    }
                }
            }
        }
    });
    out
}

/// batchgeneratorsv2's `binary_erosion_torch`: the complement's dilation, complemented (the
/// outside counts as set, so the border is not eroded).
pub fn erode(mask: &[bool], shape: [usize; 3], k: &Kernel) -> Vec<bool> {
    let not: Vec<bool> = mask.iter().map(|&v| !v).collect();
    dilate(&not, shape, k).into_iter().map(|v| !v).collect()
}

/// Erosion, then dilation.
pub fn open(mask: &[bool], shape: [usize; 3], k: &Kernel) -> Vec<bool> {
    dilate(&erode(mask, shape, k), shape, k)
}

/// Dilation, then erosion.
pub fn close(mask: &[bool], shape: [usize; 3], k: &Kernel) -> Vec<bool> {
    erode(&dilate(mask, shape, k), shape, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/morphology.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn from_indices(n: usize, set: &serde_json::Value) -> Vec<bool> {
        let mut v = vec![false; n];
        set.as_array().unwrap().iter().for_each(|i| v[i.as_u64().unwrap() as usize] = true);
        v
    }

    #[test]
    fn balls_equal_skimages() {
        for b in fixture()["balls"].as_array().unwrap() {
            let k = ball(b["radius"].as_f64().unwrap());
            assert_eq!(k.size, b["shape"][0].as_u64().unwrap() as usize, "{b}");
            assert_eq!(k.set, from_indices(k.size.pow(3), &b["set"]), "radius {}", b["radius"]);
        }
    }

    #[test]
    fn dilation_erosion_opening_closing_equal_batchgeneratorsv2s() {
        let f = fixture();
        let shape: [usize; 3] = serde_json::from_value(f["shape"].clone()).unwrap();
        let n = shape.iter().product();
        let mask = from_indices(n, &f["mask"]);
        let results = f["results"].as_array().unwrap();
        assert_eq!(results.len(), 16);
        for r in results {
            let k = ball(r["radius"].as_f64().unwrap());
            let ours = match r["op"].as_str().unwrap() {
                "dilation" => dilate(&mask, shape, &k),
                "erosion" => erode(&mask, shape, &k),
                "opening" => open(&mask, shape, &k),
                "closing" => close(&mask, shape, &k),
                op => panic!("{op}"),
            };
            assert_eq!(ours, from_indices(n, &r["set"]), "{} with ball({})", r["op"], r["radius"]);
        }
    }

    #[test]
    fn component_sizes_equal_skimages() {
        let f = fixture();
        let shape: [usize; 3] = serde_json::from_value(f["shape"].clone()).unwrap();
        let mask: Vec<u16> = from_indices(shape.iter().product(), &f["mask"]).into_iter().map(u16::from).collect();
        let (_, comps) = components(&mask, shape, &|v| v == 1, &|_, _| true);
        let mut sizes: Vec<u64> = comps.iter().map(|c| c.1 as u64).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, serde_json::from_value::<Vec<u64>>(f["component_sizes"].clone()).unwrap());
    }
}
