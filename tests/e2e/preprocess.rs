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


/// nnU-Net 2.8.1 `nnUNetv2_preprocess -c 3d_fullres` on the shared datasets (run 2026-11-26):
/// (dataset, case, shape, Σ data, positions, values there, label counts of the segmentation).
type NnunetRef<'a> = (&'a str, &'a str, [usize; 3], f64, &'a [[usize; 3]], &'a [f64], &'a [[i64; 2]]);
#[rustfmt::skip]
const NNUNET_PREPROCESSED: [NnunetRef; 3] = [
    ("Dataset801_TotalSegExampleCT", "ts_ct_dicom", [13, 167, 167], -903929.9206975475, &[[5, 140, 72], [9, 133, 79], [0, 144, 129], [12, 71, 134], [9, 20, 101], [2, 139, 156], [2, 68, 96], [6, 141, 137], [7, 63, 61], [6, 57, 1], [0, 60, 8], [8, 141, 115]], &[-3.973459482192993, -3.9735097885131836, -3.9698069095611572, -0.41646695137023926, 1.8315991163253784, -3.9735097885131836, -0.3272135257720947, -3.973389148712158, 0.2397604137659073, -3.973499298095703, 2.44484806060791, -3.9733738899230957], &[[-1, 14], [0, 311944], [1, 8848], [5, 25197], [6, 5015], [7, 108], [8, 86], [20, 730], [32, 1578], [33, 710], [52, 775], [63, 300], [64, 215], [69, 620], [70, 704], [79, 338], [86, 1137], [87, 1482], [97, 47], [98, 146], [99, 155], [100, 145], [101, 160], [102, 130], [103, 10], [109, 34], [110, 192], [111, 148], [112, 177], [113, 165], [114, 143], [115, 23], [117, 1081]]),
    ("Dataset802_TotalSegExampleMR", "ts_mr_sm", [20, 91, 116], 0.018439828418195248, &[[5, 12, 72], [9, 75, 5], [15, 64, 16], [1, 76, 71], [13, 6, 25], [18, 20, 101], [18, 84, 11], [10, 28, 29], [14, 50, 68], [9, 86, 13], [9, 9, 7], [1, 0, 60]], &[-1.0285987854003906, -0.796389639377594, -0.5177386999130249, -0.9666762948036194, -1.03891921043396, 2.0984840393066406, -0.9769967198371887, -0.796389639377594, 0.405937522649765, -0.9976375102996826, -1.0027977228164673, -1.007957935333252], &[[-1, 6124], [0, 160962], [1, 1941], [2, 1721], [3, 1442], [4, 1121], [5, 18480], [6, 4221], [7, 1176], [8, 91], [9, 86], [11, 6], [13, 356], [14, 508], [15, 1683], [19, 2006], [20, 652], [21, 544], [23, 672], [24, 444], [25, 511], [46, 3272], [47, 2869], [48, 97], [49, 135]]),
    ("Dataset803_Colin27AAL", "colin27", [177, 215, 181], -0.8736230975482613, &[[37, 140, 72], [137, 203, 133], [79, 192, 144], [129, 204, 71], [134, 25, 178], [20, 101, 146], [139, 156, 157], [142, 50, 68], [96, 86, 141], [137, 7, 63], [61, 22, 57], [1, 128, 60]], &[0.6185131669044495, -0.9835385680198669, -0.1718323677778244, -0.9835385680198669, -0.9835385680198669, -0.6844888925552368, -0.9835385680198669, -0.6844888925552368, 0.703955888748169, -0.9835385680198669, -0.5990461707115173, 0.72531658411026], &[[-1, 2736348], [0, 2671638], [1, 28174], [2, 27058], [3, 28915], [4, 32089], [5, 7654], [6, 7859], [7, 38722], [8, 40374], [9, 7112], [10, 8057], [11, 8271], [12, 11174], [13, 20104], [14, 17132], [15, 13590], [16, 13747], [17, 7939], [18, 10733], [19, 17282], [20, 18885], [21, 2262], [22, 2286], [23, 23852], [24, 16979], [25, 5792], [26, 6870], [27, 6864], [28, 5930], [29, 15025], [30, 14128], [31, 11289], [32, 10442], [33, 15512], [34, 17442], [35, 3715], [36, 2654], [37, 7469], [38, 7606], [39, 7891], [40, 9028], [41, 1733], [42, 1965], [43, 18157], [44, 14885], [45, 12133], [46, 11323], [47, 16932], [48, 18450], [49, 10791], [50, 11149], [51, 25989], [52, 16512], [53, 7536], [54, 7929], [55, 18333], [56, 20227], [57, 31053], [58, 30652], [59, 16519], [60, 17554], [61, 19447], [62, 10763], [63, 9907], [64, 15770], [65, 9313], [66, 14009], [67, 28358], [68, 26083], [69, 10826], [70, 6693], [71, 7682], [72, 7941], [73, 7942], [74, 8510], [75, 2285], [76, 2188], [77, 8700], [78, 8399], [79, 1804], [80, 1936], [81, 18307], [82, 25258], [83, 10228], [84, 10654], [85, 39353], [86, 35484], [87, 5984], [88, 9470], [89, 25647], [90, 28468], [91, 20667], [92, 21017], [93, 15216], [94, 17038], [95, 1072], [96, 1600], [97, 9034], [98, 6763], [99, 13672], [100, 14362], [101, 4639], [102, 4230], [103, 15090], [104, 18345], [105, 6924], [106, 6462], [107, 1169], [108, 1280], [109, 404], [110, 1822], [111, 5324], [112, 2956], [113, 1564], [114, 1940], [115, 1367], [116, 874]]),

];

#[test]
fn preprocessing_matches_nnunet_on_the_shared_datasets() {
    use std::process::Command;
    use tests::{shared, stu_bin};
    let tmp = tempfile::tempdir().unwrap();
    for (dataset, case, shape, sum, positions, values, counts) in NNUNET_PREPROCESSED {
        let root = shared().join("data").join(dataset);
        let plans = tmp.path().join(dataset).join("plans.json");
        let ok = Command::new(stu_bin!()).arg("plan").arg(&root).arg("--out").arg(&plans).status().unwrap();
        assert!(ok.success());
        // CT normalisation uses the fingerprint; take nnU-Net's own numbers so the comparison is
        // about preprocessing, not about intensity sampling (checked separately in dataset.rs).
        let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plans).unwrap()).unwrap();
        if dataset.contains("801") {
            p["foreground_intensity_properties_per_channel"]["0"] = serde_json::json!({
                "max": 3382.0, "mean": 17.098154067993164, "median": 45.0, "min": -1207.0,
                "percentile_00_5": -990.0, "percentile_99_5": 835.0, "std": 253.4530487060547});
            std::fs::write(&plans, p.to_string()).unwrap();
        }
        let out = tmp.path().join(dataset).join("pre");
        let o = Command::new(stu_bin!()).arg("preprocess").arg(&root).arg("--plans").arg(&plans).arg("--out").arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let pre = stu_data::preprocess::load(&out, case).unwrap();
        assert_eq!(pre.props.shape[1..], shape, "{case}");
        let scale = values.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (p, v) in positions.iter().zip(values) {
            let got = pre.data[(p[0] * shape[1] + p[1]) * shape[2] + p[2]] as f64;
            assert!((got - v).abs() / scale < 1e-4, "{case} at {p:?}: {got} vs nnU-Net {v}");
        }
        let ours_sum: f64 = pre.data.iter().map(|&v| v as f64).sum();
        assert!((ours_sum - sum).abs() <= 1e-5 * pre.data.iter().map(|v| v.abs() as f64).sum::<f64>(), "{case}: Σ {ours_sum} vs {sum}");
        // Labels: equal counts up to the few voxels where batchgenerators 0.25.5's argmax rule and
        // the classic ≥ 0.5 rule (ours, nnU-Net v2.2's) disagree.
        for [label, count] in counts {
            let ours = pre.seg.iter().filter(|&&s| s as i64 == *label).count() as i64;
            assert!((ours - count).abs() <= 3, "{case}: label {label}: {ours} voxels vs nnU-Net {count}");
        }
    }
}

#[test]
fn preprocessing_resumes_and_never_reads_half_written_cases() {
    use std::process::Command;
    use tests::stu_bin;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("phantom");
    assert!(Command::new(stu_bin!()).args(["phantom", "--cases", "3", "--test-cases", "0", "--out"]).arg(&data).status().unwrap().success());
    let plans = tmp.path().join("plans.json");
    assert!(Command::new(stu_bin!()).arg("plan").arg(&data).arg("--out").arg(&plans).status().unwrap().success());
    let out = tmp.path().join("pre");
    let run = || Command::new(stu_bin!()).arg("preprocess").arg(&data).arg("--plans").arg(&plans).arg("--out").arg(&out).output().unwrap();
    assert!(run().status.success());
    let first = stu_data::preprocess::load(&out, "phantom_001").unwrap();
    // An interrupted run: one case lost its properties (written last), another left a temporary.
    std::fs::remove_file(out.join("phantom_001.json")).unwrap();
    std::fs::write(out.join("phantom_002_data.tmp-99"), b"partial").unwrap();
    let before = std::fs::metadata(out.join("phantom_000_data.f32")).unwrap().modified().unwrap();
    let o = run();
    assert!(String::from_utf8_lossy(&o.stderr).contains("preprocessed 1 case(s)"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(out.join("phantom_000_data.f32")).unwrap().modified().unwrap(), before, "finished cases are not redone");
    let again = stu_data::preprocess::load(&out, "phantom_001").unwrap();
    assert_eq!(first.data, again.data);
    assert_eq!(first.seg, again.seg);
    assert!(first.locations.iter().all(|(_, c)| !c.is_empty()));
    // A truncated data file is detected, not read.
    let p = out.join("phantom_000_data.f32");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 4]).unwrap();
    assert!(stu_data::preprocess::load(&out, "phantom_000").is_err());
}

#[test]
fn quickstart_runs_the_data_pipeline_on_the_phantom() {
    use std::process::Command;
    use tests::stu_bin;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let o = Command::new(stu_bin!()).args(["quickstart", "--data-only", "--cases", "3", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("stunet-b") && text.contains("spacing"), "{text}");
    for id in ["phantom_000", "phantom_001", "phantom_002"] {
        let case = stu_data::preprocess::load(&out.join("preprocessed"), id).unwrap();
        assert_eq!(case.props.shape[0], 1);
        assert!(case.seg.contains(&15), "{id}: every phantom class survives preprocessing");
    }
    let stunet: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("plans/stunet_plans.json")).unwrap()).unwrap();
    assert_eq!(stunet["configurations"]["3d_fullres"]["patch_size"], serde_json::json!([128, 128, 128]));
}

#[test]
fn preprocessing_writes_nnunets_default_split() {
    use std::process::Command;
    use tests::stu_bin;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("phantom");
    assert!(Command::new(stu_bin!()).args(["phantom", "--cases", "7", "--test-cases", "0", "--out"]).arg(&data).status().unwrap().success());
    let plans = tmp.path().join("plans.json");
    assert!(Command::new(stu_bin!()).arg("plan").arg(&data).arg("--out").arg(&plans).status().unwrap().success());
    let out = tmp.path().join("pre");
    assert!(Command::new(stu_bin!()).arg("preprocess").arg(&data).arg("--plans").arg(&plans).arg("--out").arg(&out).status().unwrap().success());
    let folds: Vec<stu_data::splits::Fold> = serde_json::from_str(&std::fs::read_to_string(out.join("splits_final.json")).unwrap()).unwrap();
    // 7 cases → validation sets {003,006}, {000,004}, {001}, {005}, {002} (sklearn KFold, seed 12345).
    let val: Vec<Vec<String>> = folds.iter().map(|f| f.val.clone()).collect();
    let ids = |v: &[usize]| v.iter().map(|i| format!("phantom_{i:03}")).collect::<Vec<_>>();
    assert_eq!(val, [ids(&[3, 6]), ids(&[0, 4]), ids(&[1]), ids(&[5]), ids(&[2])]);
}
