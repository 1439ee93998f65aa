//! nnU-Net's `2d` configuration: prediction equal to nnU-Net 2.8.1's own predictor on the same
//! model folder (`tests/fixtures/make_predict2d_fixture.py`), and the whole chain through
//! nnU-Net's commands on the shared MR (plan, preprocess, train, predict).

use std::path::Path;

use tests::{own_fixtures, read_tensor, shared};

use crate::nnunet_cli::{fails, nnunet, ok};

/// A little-endian float32 `.npy` file (C order): its values.
fn npy_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let header = u16::from_le_bytes([b[8], b[9]]) as usize;
    let text = String::from_utf8_lossy(&b[10..10 + header]);
    assert!(text.contains("'<f4'") && text.contains("'fortran_order': False"), "{text}");
    b[10 + header..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Two CT cases of 4 mm and 2.5 mm slices through a 2-D model folder as nnU-Net trained it
/// (`.pth`, a `2d` configuration of nnU-Net ≥ 2.4 form): each case keeps its slice spacing, the
/// in-plane axes are resampled, the sliding window runs slice by slice with in-plane mirroring.
/// The label maps equal nnU-Net's voxel for voxel (where its top two probabilities are apart by
/// more than 1e-3) and the probabilities agree within 2.5e-3 (ours are stored in float16;
/// nnU-Net accumulates its sliding window in float16, which shows at the image corners, where
/// the Gaussian weights are small).
#[test]
fn nnunet_2d_prediction_equals_nnunets_own() {
    let f = own_fixtures().join("predict2d");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pred");
    let model = f.join("Dataset998_Tiny2d/nnUNetTrainer__nnUNetPlans__2d/fold_0");
    let log = ok(&nnunet(&[], &["predict", "-i", f.join("images").to_str().unwrap(), "-o", out.to_str().unwrap(), "--checkpoint", model.to_str().unwrap(), "--save-probabilities"]));
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("predict.json")).unwrap()).unwrap();
    assert_eq!(record["options"]["configuration"], "2d", "{record}");
    let mut compared = 0;
    for (case, slices) in [("case_a", 3), ("case_b", 4)] {
        let want = stu_data::nifti_io::read_label(&f.join(format!("reference/{case}.nii.gz"))).unwrap();
        let ours = stu_data::nifti_io::read_label(&out.join(format!("{case}.nii.gz"))).unwrap();
        assert_eq!(ours.geom.shape, [slices, 40, 52], "{log}");
        assert_eq!(ours.geom.affine, want.geom.affine);
        let reference = npy_f32(&f.join(format!("reference/{case}_probabilities.npy")));
        let (shape, probs) = read_tensor(&out.join(format!("{case}.probabilities.safetensors")), "probabilities");
        assert_eq!(shape, [3, slices, 40, 52]);
        let n = slices * 40 * 52;
        let worst = probs.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 2.5e-3, "{case}: probabilities differ by {worst}");
        for v in 0..n {
            let mut p: Vec<f32> = (0..3).map(|k| reference[k * n + v]).collect();
            p.sort_by(f32::total_cmp);
            if p[2] - p[1] > 1e-3 {
                assert_eq!(ours.data[v], want.data[v], "{case}: voxel {v}");
                compared += 1;
            }
        }
    }
    assert!(compared > 2 * 3 * 40 * 52 * 9 / 10, "{compared}");

    // nnU-Net's own files (`--npz`: `{case}.npz` float32 and `{case}.pkl`), which Python
    // nnU-Net's `nnUNetv2_ensemble` reads (checked by hand with nnU-Net 2.8.1: the same labels
    // and geometry); here `stu ensemble` reads them back (header, CRC) and, the first member
    // being an `.npz`, writes its mean the same way with the first member's `.pkl`.
    let npz = tmp.path().join("npz");
    ok(&nnunet(&[], &["predict", "-i", f.join("images").to_str().unwrap(), "-o", npz.to_str().unwrap(), "--checkpoint", model.to_str().unwrap(), "--npz"]));
    let ens = tmp.path().join("ens");
    ok(&nnunet(&[], &["ensemble", "--pred", npz.to_str().unwrap(), npz.to_str().unwrap(), "-o", ens.to_str().unwrap(), "--save-probabilities"]));
    for case in ["case_a", "case_b"] {
        let pkl = std::fs::read(npz.join(format!("{case}.pkl"))).unwrap();
        assert!(pkl.starts_with(&[0x80, 2]) && pkl.ends_with(b".") && pkl.windows(10).any(|w| w == b"sitk_stuff"));
        assert!(!npz.join(format!("{case}.probabilities.safetensors")).exists() && !npz.join(format!(".{case}.npz.f32")).exists());
        let one = stu_data::nifti_io::read_label(&npz.join(format!("{case}.nii.gz"))).unwrap().data;
        assert_eq!(one, stu_data::nifti_io::read_label(&out.join(format!("{case}.nii.gz"))).unwrap().data);
        assert_eq!(stu_data::nifti_io::read_label(&ens.join(format!("{case}.nii.gz"))).unwrap().data, one);
        assert_eq!(std::fs::read(ens.join(format!("{case}.pkl"))).unwrap(), pkl);
        assert!(ens.join(format!("{case}.npz")).is_file());
    }

    // A 2-D network with a 3-D plan (strides across slices) is refused, naming both.
    let mut plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.parent().unwrap().join("plans.json")).unwrap()).unwrap();
    let mut c = plans["configurations"]["2d"].clone();
    c.as_object_mut().unwrap().remove("architecture");
    c["patch_size"] = serde_json::json!([8, 32, 32]);
    c["spacing"] = serde_json::json!([2.0, 1.2, 1.0]);
    c["pool_op_kernel_sizes"] = serde_json::json!([[1, 1, 1], [2, 2, 2], [1, 2, 2], [2, 2, 2]]);
    plans["configurations"] = serde_json::json!({"3d_fullres": c});
    let plans3d = tmp.path().join("plans3d.json");
    std::fs::write(&plans3d, plans.to_string()).unwrap();
    let weights = own_fixtures().join("plainconv2d_tiny.safetensors");
    fails(&nnunet(&[], &["predict", "-i", f.join("images").to_str().unwrap(), "-o", tmp.path().join("p3").to_str().unwrap(), "--checkpoint", weights.to_str().unwrap(), "--plans", plans3d.to_str().unwrap()]), &["plainconv2d_tiny.safetensors", "2-D network", "[2, 2, 2]"]);
}

/// nnU-Net's commands with `-c 2d` on the shared MR: the planner's `2d` configuration is
/// preprocessed into its own folder, `nnUNetTrainer` trains the 2-D PlainConvUNet (512 features
/// at the bottom, `[1, 3, 3]` kernels), STU-Net's trainers refuse it (3-D networks), and the
/// model predicts the case at its own shape.
#[test]
fn nnunet_2d_through_nnunets_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, pre, res) = (shared().join("data"), tmp.path().join("pre"), tmp.path().join("res"));
    let env = [("nnUNet_raw", raw.as_path()), ("nnUNet_preprocessed", pre.as_path()), ("nnUNet_results", res.as_path())];
    let name = "Dataset802_TotalSegExampleMR";
    ok(&nnunet(&env, &["nnUNetv2_plan_and_preprocess", "-d", "802", "-c", "2d"]));
    let plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pre.join(name).join("nnUNetPlans.json")).unwrap()).unwrap();
    let c = &plans["configurations"]["2d"];
    assert_eq!((c["data_identifier"].as_str(), c["batch_dice"].as_bool(), c["patch_size"].as_array().map(Vec::len)), (Some("nnUNetPlans_2d"), Some(true), Some(2)), "{c}");
    let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pre.join(name).join("nnUNetPlans_2d/ts_mr_sm.json")).unwrap()).unwrap();
    assert_eq!(case["shape"][0], 1);

    fails(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "STUNetTrainer_small"]), &["2-D plan"]);
    let log = ok(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "nnUNetTrainer_1epochs", "--", "--iterations", "2", "--val-iterations", "0"]));
    assert!(log.contains("--model nnunet-plainconv"), "{log}");
    let model = res.join(name).join("nnUNetTrainer_1epochs__nnUNetPlans__2d");
    let ck = model.join("fold_all/checkpoint_final.safetensors");
    let info: serde_json::Value = serde_json::from_slice(&nnunet(&[], &["inspect", "--checkpoint", ck.to_str().unwrap()]).stdout).unwrap();
    assert_eq!(info["features"].as_array().and_then(|f| f.last()).and_then(|f| f.as_u64()), Some(512), "{info}");
    assert!(info["kernels"].as_array().unwrap().iter().all(|k| k[0] == 1), "{info}");
    let meta: serde_json::Value = serde_json::from_str(&stu_engine::checkpoint::StateDict::open(&ck).unwrap().metadata()["stu_checkpoint"]).unwrap();
    assert_eq!(meta["inference_allowed_mirroring_axes"], serde_json::json!([1, 2]), "in-plane mirroring only");

    // nnU-Net's trainer variants by name: AdamW at 3e-4, and no mirroring (none at inference).
    let log = ok(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "nnUNetTrainerAdam3en4", "--", "--iterations", "2", "--val-iterations", "0", "--epochs", "1"]));
    assert!(log.contains("--optimizer adamw") && log.contains("--lr 3e-4"), "{log}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(res.join(name).join("nnUNetTrainerAdam3en4__nnUNetPlans__2d/fold_all/train.json")).unwrap()).unwrap();
    assert_eq!((cfg["optimizer"].as_str(), cfg["initial_lr"].as_f64()), (Some("adamw"), Some(3e-4)), "{cfg}");
    ok(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "nnUNetTrainer_1epochs_NoMirroring", "--", "--iterations", "2", "--val-iterations", "0"]));
    let ck2 = res.join(name).join("nnUNetTrainer_1epochs_NoMirroring__nnUNetPlans__2d/fold_all/checkpoint_final.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&stu_engine::checkpoint::StateDict::open(&ck2).unwrap().metadata()["stu_checkpoint"]).unwrap();
    assert_eq!(meta["inference_allowed_mirroring_axes"], serde_json::json!([]), "no mirroring at inference");
    // onlyMirror01 in 2-D mirrors the first in-plane axis only (nnU-Net's (0,), here axis 1).
    let log = ok(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "nnUNetTrainer_onlyMirror01", "--", "--iterations", "2", "--val-iterations", "0", "--epochs", "1"]));
    assert!(log.contains("--mirror-axes 0 "), "{log}");
    let ck3 = res.join(name).join("nnUNetTrainer_onlyMirror01__nnUNetPlans__2d/fold_all/checkpoint_final.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&stu_engine::checkpoint::StateDict::open(&ck3).unwrap().metadata()["stu_checkpoint"]).unwrap();
    assert_eq!(meta["inference_allowed_mirroring_axes"], serde_json::json!([1]));
    fails(&nnunet(&env, &["nnUNetv2_train", "802", "2d", "all", "-tr", "nnUNetTrainerDA5"]), &["nnUNetTrainerCELoss", "STUNetTrainer_small"]);

    let images = raw.join(name).join("imagesTr");
    let out = tmp.path().join("pred");
    ok(&nnunet(&env, &["nnUNetv2_predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-d", "802", "-c", "2d", "-f", "all", "-tr", "nnUNetTrainer_1epochs"]));
    let input = stu_data::nifti_io::read_geometry(&images.join("ts_mr_sm_0000.nii.gz")).unwrap();
    assert_eq!(stu_data::nifti_io::read_label(&out.join("ts_mr_sm.nii.gz")).unwrap().geom.shape, input.shape);
}
