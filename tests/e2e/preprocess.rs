//! Resampling against nnU-Net's own `resample_data_or_seg_to_shape` (fixtures made by
//! tests/fixtures/make_resample_fixtures.py), and preprocessing end to end.

use stu_data::resample::{resample_data, resample_seg, separate_axis};
use tests::own_fixtures;

fn tensor<T: Copy>(st: &safetensors::SafeTensors, key: &str, f: fn(&[u8]) -> T, size: usize) -> (Vec<usize>, Vec<T>) {
    let t = st.tensor(key).unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(size).map(f).collect())
}

#[test]
fn resampling_matches_nnunet() {
    let bytes = std::fs::read(own_fixtures().join("resample.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("resample.json")).unwrap()).unwrap();
    let f32le = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let i16le = |b: &[u8]| i16::from_le_bytes([b[0], b[1]]);
    for (name, spec) in index.as_object().unwrap() {
        let sp: [f64; 3] = serde_json::from_value(spec["spacing"].clone()).unwrap();
        let new_sp: [f64; 3] = serde_json::from_value(spec["new_spacing"].clone()).unwrap();
        let new_shape: [usize; 3] = serde_json::from_value(spec["new_shape"].clone()).unwrap();
        let (shape, data) = tensor(&st, &format!("{name}.data"), f32le, 4);
        let (_, want) = tensor(&st, &format!("{name}.data_out"), f32le, 4);
        let (_, seg) = tensor(&st, &format!("{name}.seg"), i16le, 2);
        let (_, want_seg) = tensor(&st, &format!("{name}.seg_out"), i16le, 2);
        let s = [shape[1], shape[2], shape[3]];
        let sep = separate_axis(sp, new_sp);
        let n_in: usize = s.iter().product();
        let n_out: usize = new_shape.iter().product();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for c in 0..shape[0] {
            let ours = resample_data(&data[c * n_in..(c + 1) * n_in], s, new_shape, sep);
            let err = ours.iter().zip(&want[c * n_out..(c + 1) * n_out]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err / scale < 1e-4, "{name} channel {c}: max error {err} (scale {scale})");
        }
        let ours = resample_seg(&seg, s, new_shape, sep);
        let diff = ours.iter().zip(&want_seg).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} segmentation voxels differ");
    }
}

