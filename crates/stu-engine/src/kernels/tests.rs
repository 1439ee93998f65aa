//! The kernels against a naive f64 convolution, on shapes that exercise every path.

use super::*;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    stu_core::rng::SplitMix64::new(seed).fill_f32(n, -0.5, 0.5)
}

/// Naive channels-last conv (f64 accumulation); returns y.
fn naive(x: &[f32], w: &[f32], g: &Geom) -> Vec<f64> {
    let out = g.out();
    let p = g.pad().map(|v| v as isize);
    let k = g.k;
    let mut y = vec![0f64; g.b * out[0] * out[1] * out[2] * g.cout];
    for b in 0..g.b {
        for z in 0..out[0] {
            for yy in 0..out[1] {
                for xx in 0..out[2] {
                    for co in 0..g.cout {
                        let mut acc = 0f64;
                        for dz in 0..k[0] {
                            for dy in 0..k[1] {
                                for dx in 0..k[2] {
                                    let iz = (z * g.stride[0]) as isize + dz as isize - p[0];
                                    let iy = (yy * g.stride[1]) as isize + dy as isize - p[1];
                                    let ix = (xx * g.stride[2]) as isize + dx as isize - p[2];
                                    if iz < 0 || iy < 0 || ix < 0 || iz >= g.inp[0] as isize || iy >= g.inp[1] as isize || ix >= g.inp[2] as isize {
                                        continue;
                                    }
                                    let (iz, iy, ix) = (iz as usize, iy as usize, ix as usize);
                                    for ci in 0..g.cin {
                                        let xv = x[(((b * g.inp[0] + iz) * g.inp[1] + iy) * g.inp[2] + ix) * g.cin + ci] as f64;
                                        let wv = w[(co * g.cin + ci) * g.taps() + (dz * k[1] + dy) * k[2] + dx] as f64;
                                        acc += xv * wv;
                                    }
                                }
                            }
                        }
                        y[(((b * out[0] + z) * out[1] + yy) * out[2] + xx) * g.cout + co] = acc;
                    }
                }
            }
        }
    }
    y
}

fn close(a: &[f32], b: &[f64], what: &str, g: &Geom) {
    assert_eq!(a.len(), b.len(), "{what} length {g:?}");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(((*x as f64) - y).abs() / scale < 2e-5, "{what} [{i}] {x} vs {y} {g:?}");
    }
}

fn geoms() -> Vec<Geom> {
    vec![
        Geom { b: 1, inp: [5, 6, 7], cin: 3, cout: 4, k: [3; 3], stride: [1, 1, 1] },
        Geom { b: 2, inp: [4, 4, 4], cin: 5, cout: 2, k: [3; 3], stride: [1, 1, 1] },
        Geom { b: 2, inp: [6, 8, 5], cin: 3, cout: 4, k: [3; 3], stride: [2, 2, 2] },
        Geom { b: 1, inp: [4, 8, 8], cin: 2, cout: 3, k: [3; 3], stride: [1, 2, 2] },
        Geom { b: 1, inp: [8, 4, 6], cin: 2, cout: 3, k: [3; 3], stride: [2, 1, 2] },
        Geom { b: 2, inp: [4, 6, 5], cin: 3, cout: 5, k: [1; 3], stride: [1, 1, 1] },
        Geom { b: 1, inp: [6, 8, 8], cin: 4, cout: 3, k: [1; 3], stride: [2, 2, 1] },
        Geom { b: 1, inp: [1, 1, 1], cin: 2, cout: 2, k: [3; 3], stride: [1, 1, 1] },
        // nnU-Net's [1, 3, 3] (anisotropic stages, and every stage of a 2-D plan, one slice deep).
        Geom { b: 2, inp: [3, 6, 7], cin: 3, cout: 4, k: [1, 3, 3], stride: [1, 1, 1] },
        Geom { b: 2, inp: [1, 6, 5], cin: 2, cout: 3, k: [1, 3, 3], stride: [1, 1, 1] },
        Geom { b: 1, inp: [4, 8, 7], cin: 2, cout: 3, k: [1, 3, 3], stride: [1, 2, 2] },
        Geom { b: 1, inp: [4, 6, 6], cin: 2, cout: 2, k: [1, 3, 3], stride: [2, 2, 2] },
        Geom { b: 1, inp: [5, 4, 6], cin: 2, cout: 3, k: [3, 1, 3], stride: [1, 1, 1] },
    ]
}

#[test]
fn forward_matches_naive() {
    for (i, g) in geoms().into_iter().enumerate() {
        let x = rand(g.b * g.inp.iter().product::<usize>() * g.cin, i as u64 + 1);
        let w = rand(g.cout * g.cin * g.taps(), i as u64 + 100);
        let bias = rand(g.cout, i as u64 + 7);
        let mut want = naive(&x, &w, &g);
        for (j, v) in want.iter_mut().enumerate() {
            *v += bias[j % g.cout] as f64;
        }
        close(&conv_forward(&x, &w, Some(&bias), &g), &want, "forward", &g);
    }
}

/// Gradients by linearity: ⟨dy, conv(x, w)⟩ = ⟨dx(dy), x⟩ = ⟨dw(x, dy), w⟩, checked per
/// element with unit vectors replaced by a naive adjoint computed from `naive`.
#[test]
fn gradients_match_the_adjoint_of_the_forward() {
    for (i, g) in geoms().into_iter().enumerate() {
        let n_in = g.b * g.inp.iter().product::<usize>() * g.cin;
        let n_w = g.cout * g.cin * g.taps();
        let out = g.out();
        let n_out = g.b * out.iter().product::<usize>() * g.cout;
        let x = rand(n_in, i as u64 + 11);
        let w = rand(n_w, i as u64 + 12);
        let dy = rand(n_out, i as u64 + 13);
        // dx[j] = Σ dy · ∂y/∂x[j] = ⟨dy, conv(e_j, w)⟩
        let want_dx: Vec<f64> = (0..n_in)
            .map(|j| {
                let mut e = vec![0f32; n_in];
                e[j] = 1.0;
                naive(&e, &w, &g).iter().zip(&dy).map(|(a, b)| a * *b as f64).sum()
            })
            .collect();
        close(&conv_backward_data(&dy, &w, &g), &want_dx, "dx", &g);
        let want_dw: Vec<f64> = (0..n_w)
            .map(|j| {
                let mut e = vec![0f32; n_w];
                e[j] = 1.0;
                naive(&x, &e, &g).iter().zip(&dy).map(|(a, b)| a * *b as f64).sum()
            })
            .collect();
        close(&conv_backward_weight(&x, &dy, &g), &want_dw, "dw", &g);
        let want_db: Vec<f64> = (0..g.cout).map(|c| dy.iter().skip(c).step_by(g.cout).map(|v| *v as f64).sum()).collect();
        close(&conv_backward_bias(&dy, g.cout), &want_db, "db", &g);
    }
}

#[test]
fn weight_layout_round_trips() {
    let w = rand(4 * 3 * 27, 5);
    assert_eq!(wg_to_weight(&weight_to_wg(&w, 4, 3, 27), 4, 3, 27), w);
}

/// The blocked weight transposes equal their definitions, with channel counts that fill one
/// 16-channel block, several, and leave a partial one.
#[test]
fn weight_transposes_match_their_definitions() {
    for (cout, cin, t) in [(37, 21, 27), (16, 5, 27), (17, 33, 1), (3, 40, 27), (9, 18, 9)] {
        let w = rand(cout * cin * t, (cout * 100 + cin) as u64);
        let wg = weight_to_wg(&w, cout, cin, t);
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..t {
                    assert_eq!(wg[(tap * cin + ci) * cout + co], w[(co * cin + ci) * t + tap], "[k0, k1, k2, Cin, Cout] ({cout}, {cin}, {t})");
                }
            }
        }
        assert_eq!(wg_to_weight(&wg, cout, cin, t), w, "round trip ({cout}, {cin}, {t})");
        if t > 1 {
            let f = flip_transpose(&w, cout, cin, t);
            for co in 0..cout {
                for ci in 0..cin {
                    for tap in 0..t {
                        assert_eq!(f[((t - 1 - tap) * cout + co) * cin + ci], w[(co * cin + ci) * t + tap], "flipped ({cout}, {cin}, {t})");
                    }
                }
            }
        }
    }
}

#[test]
fn larger_volumes_match_naive() {
    for (i, g) in [
        Geom { b: 1, inp: [16, 64, 32], cin: 4, cout: 8, k: [3; 3], stride: [1, 1, 1] },
        Geom { b: 2, inp: [16, 32, 32], cin: 4, cout: 8, k: [3; 3], stride: [1, 2, 2] },
        Geom { b: 1, inp: [8, 32, 32], cin: 12, cout: 8, k: [1; 3], stride: [1, 1, 1] },
        Geom { b: 3, inp: [1, 48, 40], cin: 6, cout: 8, k: [1, 3, 3], stride: [1, 1, 1] },
    ]
    .into_iter()
    .enumerate()
    {
        let x = rand(g.b * g.inp.iter().product::<usize>() * g.cin, i as u64 + 21);
        let w = rand(g.cout * g.cin * g.taps(), i as u64 + 22);
        let bias = vec![0.0f32; g.cout];
        close(&conv_forward(&x, &w, Some(&bias), &g), &naive(&x, &w, &g), "forward", &g);
    }
}

#[test]
fn head_writes_channels_first_and_its_gradients_match() {
    let (b, n, cin, cout) = (2, 37, 5, 7);
    let x = rand(b * n * cin, 31);
    let w = rand(cout * cin, 32);
    let bias = rand(cout, 33);
    let y = head_forward(&x, &w, &bias, b, n, cin, cout);
    let g = Geom { b, inp: [1, 1, n], cin, cout, k: [1; 3], stride: [1, 1, 1] };
    let cl = conv_forward(&x, &w, Some(&bias), &g); // [B, N, Cout]
    for bi in 0..b {
        for p in 0..n {
            for c in 0..cout {
                assert!((y[(bi * cout + c) * n + p] - cl[(bi * n + p) * cout + c]).abs() < 1e-5);
            }
        }
    }
    let dy = rand(b * cout * n, 34); // [B, Cout, N]
    let mut dy_cl = vec![0f32; dy.len()];
    for bi in 0..b {
        for p in 0..n {
            for c in 0..cout {
                dy_cl[(bi * n + p) * cout + c] = dy[(bi * cout + c) * n + p];
            }
        }
    }
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    assert!(close(&head_backward_data(&dy, &w, b, n, cin, cout), &conv_backward_data(&dy_cl, &w, &g)));
    assert!(close(&head_backward_weight(&x, &dy, b, n, cin, cout), &conv_backward_weight(&x, &dy_cl, &g)));
    assert!(close(&head_backward_bias(&dy, b, n, cout), &conv_backward_bias(&dy_cl, cout)));
}

/// Every reduction of the training step's kernels gives the same bits on 1 thread as on 3: the
/// weight and bias gradients of a 3³ convolution (stride 1 and 2) and of a 1×1×1 one, the head's
/// weight gradient, instance norm forward and backward, and the Dice + CE loss and its gradient.
/// With rayon's `fold`, whose grouping follows work stealing, they did not, and two runs of one
/// training drifted apart from the third step.
#[test]
fn reductions_give_the_same_bits_on_any_number_of_threads() {
    let (b, inp, cin, cout) = (2, [32, 32, 32], 4, 3);
    let vox: usize = inp.iter().product();
    let x = rand(b * vox * cin, 1);
    let run = || {
        let mut out: Vec<Vec<f32>> = Vec::new();
        for (k, s) in [(3, 1), (3, 2), (1, 1)] {
            let g = Geom { b, inp, cin, cout, k: [k; 3], stride: [s; 3] };
            let dy = rand(b * g.out().iter().product::<usize>() * cout, 2);
            out.push(conv_backward_weight(&x, &dy, &g));
            out.push(conv_backward_bias(&dy, cout));
        }
        let classes = 5;
        let dy = rand(b * classes * vox, 3);
        out.push(head_backward_weight(&x, &dy, b, vox, cin, classes));
        let (gamma, beta) = (rand(cin, 4), rand(cin, 5));
        let y = norm::forward(&x, &gamma, &beta, None, true, b, vox, cin);
        let grads = norm::backward(&x, &gamma, &beta, None, true, &y, b, vox, cin);
        out.extend([y, grads.dx, grads.dgamma, grads.dbeta]);
        let target: Vec<f32> = (0..b * vox).map(|i| ((i * 7919) % classes) as f32).collect();
        let terms = loss::Terms { batch_dice: false, smooth: 1e-5, ce: 1.0, dice: 1.0, topk: None, smoothing: 0.0 };
        let logits = rand(b * classes * vox, 6);
        out.push(vec![loss::forward(&logits, &target, b, classes, vox, terms) as f32]);
        out.push(loss::backward(&logits, &target, b, classes, vox, terms, 1.0));
        out.into_iter().map(|v| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>()).collect::<Vec<_>>()
    };
    let on = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(run);
    let (one, three) = (on(1), on(3));
    let names = ["conv 3³ dW", "conv 3³ db", "conv 3³/2 dW", "conv 3³/2 db", "conv 1³ dW", "conv 1³ db", "head dW", "norm y", "norm dx", "norm dγ", "norm dβ", "loss", "loss dlogits"];
    for ((name, a), b) in names.iter().zip(&one).zip(&three) {
        assert!(a == b, "{name}: 1 and 3 threads differ in {} of {} values", a.iter().zip(b).filter(|(x, y)| x != y).count(), a.len());
    }
    assert_eq!(one.len(), names.len());
}
