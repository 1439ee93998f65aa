//! `stu dataset check` on the shared datasets and on corrupted copies; NIfTI round trips.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use stu_data::nifti_io::{read_image, read_label, write_image, write_label};
use tests::{shared, stu_bin};

fn datasets() -> Vec<PathBuf> {
    ["Dataset801_TotalSegExampleCT", "Dataset802_TotalSegExampleMR", "Dataset803_Colin27AAL"].iter().map(|d| shared().join("data").join(d)).collect()
}

fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(stu_bin!()).args(["dataset", "check"]).arg(dir).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A writable copy of the MR dataset (1 case, 117×91×20).
fn copy_mr(tmp: &Path) -> PathBuf {
    let src = shared().join("data/Dataset802_TotalSegExampleMR");
    let dst = tmp.join("Dataset802_TotalSegExampleMR");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join("dataset.json"), dst.join("dataset.json")).unwrap();
    dst
}

const IMAGE: &str = "imagesTr/ts_mr_sm_0000.nii.gz";
const LABEL: &str = "labelsTr/ts_mr_sm.nii.gz";

#[test]
fn the_shared_datasets_pass() {
    for d in datasets() {
        let (ok, out) = check(&d);
        assert!(ok, "{out}");
        assert!(out.contains("OK: no problems found"), "{out}");
    }
}

#[test]
fn corrupted_copies_fail_naming_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    type Corrupt = fn(&Path);
    let cases: Vec<(&str, Corrupt, &str, &str)> = vec![
        ("truncated gzip", |d| {
            let p = d.join(IMAGE);
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 3]).unwrap();
        }, "ts_mr_sm_0000.nii.gz", "corrupt or truncated gzip"),
        ("negative size in the header", |d| {
            // dim[1] = -5: the `nifti` crate reads sizes unsigned (65531).
            let p = d.join(LABEL);
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap()).read_to_end(&mut raw).unwrap();
            raw[42..44].copy_from_slice(&(-5i16).to_le_bytes());
            let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
            gz.write_all(&raw).unwrap();
            gz.finish().unwrap();
        }, "ts_mr_sm.nii.gz", "dim[1] = -5 is not a size"),
        ("undeclared label value", |d| {
            let p = d.join(LABEL);
            let mut l = read_label(&p).unwrap();
            l.data[1234] = 99;
            write_label(&p, &l.data, &l.geom).unwrap();
        }, "ts_mr_sm.nii.gz", "label values [99] are not declared"),
        ("shape mismatch", |d| {
            let p = d.join(LABEL);
            let mut l = read_label(&p).unwrap();
            let n = l.geom.shape[1] * l.geom.shape[2];
            l.geom.shape[0] -= 1;
            l.data.truncate(l.data.len() - n);
            write_label(&p, &l.data, &l.geom).unwrap();
        }, "ts_mr_sm_0000.nii.gz", "shape [20, 91, 117] differs"),
        ("affine mismatch", |d| {
            let p = d.join(LABEL);
            let mut l = read_label(&p).unwrap();
            l.geom.header.srow_x[3] += 4.5;
            write_label(&p, &l.data, &l.geom).unwrap();
        }, "ts_mr_sm_0000.nii.gz", "affine differs"),
        ("missing channel", |d| {
            let p = d.join("dataset.json");
            let s = std::fs::read_to_string(&p).unwrap().replace("\"0\": \"MRI\"", "\"0\": \"MRI\", \"1\": \"T2\"");
            std::fs::write(&p, s).unwrap();
        }, "ts_mr_sm_0001.nii.gz", "has no channel 1"),
        ("bad dataset.json", |d| {
            let p = d.join("dataset.json");
            let s = std::fs::read_to_string(&p).unwrap().replace("\"background\": 0", "\"background\": 1");
            std::fs::write(&p, s).unwrap();
        }, "dataset.json", "`labels.background`: must be the integer 0"),
        ("NaN in the image", |d| {
            let p = d.join(IMAGE);
            let mut v = read_image(&p).unwrap();
            v.data[10] = f32::NAN;
            v.data[11] = f32::INFINITY;
            write_image(&p, &v.data, &v.geom).unwrap();
        }, "ts_mr_sm_0000.nii.gz", "1 NaN and 1 infinite voxel(s)"),
        ("label without image", |d| {
            std::fs::copy(d.join(LABEL), d.join("labelsTr/orphan.nii.gz")).unwrap();
        }, "orphan.nii.gz", "does not belong to any case"),
        ("numTraining", |d| {
            let p = d.join("dataset.json");
            let s = std::fs::read_to_string(&p).unwrap().replace("\"numTraining\": 1", "\"numTraining\": 2");
            std::fs::write(&p, s).unwrap();
        }, "dataset.json", "numTraining is 2 but 1 cases"),
    ];
    for (i, (what, corrupt, file, message)) in cases.into_iter().enumerate() {
        let dir = copy_mr(&tmp.path().join(i.to_string()));
        corrupt(&dir);
        let (ok, out) = check(&dir);
        assert!(!ok, "{what}: the check passed:\n{out}");
        let line = out.lines().find(|l| l.contains(message)).unwrap_or_else(|| panic!("{what}: no line with `{message}`:\n{out}"));
        assert!(line.contains(file), "{what}: `{line}` does not name {file}");
        assert_eq!(line.matches(file).count(), 1, "{what}: `{line}` names {file} more than once");
    }
}

#[test]
fn labels_and_images_round_trip_with_their_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    for d in datasets() {
        for sub in ["labelsTr", "imagesTr"] {
            for e in std::fs::read_dir(d.join(sub)).unwrap() {
                let p = e.unwrap().path();
                let out = tmp.path().join(p.file_name().unwrap());
                if sub == "labelsTr" {
                    let a = read_label(&p).unwrap();
                    write_label(&out, &a.data, &a.geom).unwrap();
                    let b = read_label(&out).unwrap();
                    assert_eq!(a.data, b.data, "{}", p.display());
                    assert_eq!((a.geom.shape, a.geom.affine), (b.geom.shape, b.geom.affine), "{}", p.display());
                } else {
                    let a = read_image(&p).unwrap();
                    write_image(&out, &a.data, &a.geom).unwrap();
                    let b = read_image(&out).unwrap();
                    assert_eq!(a.data, b.data, "{}", p.display());
                    assert_eq!((a.geom.shape, a.geom.spacing, a.geom.affine), (b.geom.shape, b.geom.spacing, b.geom.affine), "{}", p.display());
                }
            }
        }
    }
}

#[test]
fn multi_member_gzip_and_nifti2_are_handled() {
    let tmp = tempfile::tempdir().unwrap();
    let src = shared().join("data/Dataset802_TotalSegExampleMR").join(LABEL);
    // Split the decompressed stream into two gzip members.
    let raw = {
        use std::io::Read;
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&src).unwrap()).read_to_end(&mut v).unwrap();
        v
    };
    let member = |bytes: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let mut two = member(&raw[..raw.len() / 2]);
    two.extend(member(&raw[raw.len() / 2..]));
    let p = tmp.path().join("multi.nii.gz");
    std::fs::write(&p, two).unwrap();
    assert_eq!(read_label(&p).unwrap().data, read_label(&src).unwrap().data);

    let mut v2 = raw.clone();
    v2[..4].copy_from_slice(&540i32.to_le_bytes());
    let p = tmp.path().join("v2.nii");
    std::fs::write(&p, v2).unwrap();
    let msg = read_label(&p).unwrap_err().to_string();
    assert!(msg.contains("v2.nii") && msg.contains("NIfTI-2"), "{msg}");
}

#[test]
fn plan_writes_nnunet_fields_and_the_stunet_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |preset: &str, out: &Path| {
        let o = Command::new(stu_bin!())
            .args(["plan"])
            .arg(shared().join("data/Dataset801_TotalSegExampleCT"))
            .arg("--out")
            .arg(out)
            .args(["--preset", preset])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        v
    };
    let p = run("nnunet", &tmp.path().join("a/plans.json"));
    let c = &p["configurations"]["3d_fullres"];
    for key in ["spacing", "patch_size", "batch_size", "median_image_size_in_voxels", "pool_op_kernel_sizes", "conv_kernel_sizes", "normalization_schemes"] {
        assert!(!c[key].is_null(), "missing {key}");
    }
    assert!(!p["transpose_forward"].is_null());
    assert_eq!(c["normalization_schemes"], serde_json::json!(["CTNormalization"]));
    assert!(tmp.path().join("a/dataset_fingerprint.json").exists());
    // What `stu forward --plans` reads back: pool_op_kernel_sizes after the stage-0 entry.
    let strides = stu_harness::plans::strides_from_plans(&tmp.path().join("a/plans.json"), "3d_fullres").unwrap();
    assert_eq!(strides.len() + 1, c["pool_op_kernel_sizes"].as_array().unwrap().len());

    let s = run("stunet", &tmp.path().join("b/plans.json"));
    let c = &s["configurations"]["3d_fullres"];
    assert_eq!(c["spacing"], serde_json::json!([1.5, 1.5, 1.5]));
    assert_eq!(c["patch_size"], serde_json::json!([128, 128, 128]));
    assert_eq!(c["batch_size"], 2);
    assert_eq!(c["normalization_schemes"], serde_json::json!(["ZScoreNormalization"]));
    let strides = stu_harness::plans::strides_from_plans(&tmp.path().join("b/plans.json"), "3d_fullres").unwrap();
    assert_eq!(strides, [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]]);
}

#[test]
fn plans_match_nnunets_own_planner_on_the_shared_datasets() {
    // nnU-Net 2.8.1 `nnUNetv2_extract_fingerprint` + `nnUNetv2_plan_experiment` on these datasets
    // (run 2026-11-26): spacing, patch, batch, strides, batch_dice, foreground mean and std.
    type Row<'a> = (&'a str, [f64; 3], [u64; 3], u64, serde_json::Value, bool, f64, f64);
    let rows: [Row; 3] = [
        ("Dataset801_TotalSegExampleCT", [3.0; 3], [32, 112, 128], 2, serde_json::json!([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]), false, 17.10, 253.45),
        ("Dataset802_TotalSegExampleMR", [3.0; 3], [20, 96, 128], 2, serde_json::json!([[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]), false, 72.76, 55.48),
        ("Dataset803_Colin27AAL", [1.0; 3], [112, 128, 112], 2, serde_json::json!([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]), false, 85.97, 19.86),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (name, spacing, patch, batch, strides, batch_dice, mean, std) in rows {
        let out = tmp.path().join(name).join("plans.json");
        let o = Command::new(stu_bin!()).arg("plan").arg(shared().join("data").join(name)).arg("--out").arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let c = &p["configurations"]["3d_fullres"];
        assert_eq!(c["spacing"], serde_json::json!(spacing), "{name}");
        assert_eq!(c["patch_size"], serde_json::json!(patch), "{name}");
        assert_eq!(c["batch_size"], batch, "{name}");
        assert_eq!(c["pool_op_kernel_sizes"], strides, "{name}");
        assert_eq!(c["batch_dice"], batch_dice, "{name}");
        let fg = &p["foreground_intensity_properties_per_channel"]["0"];
        let (m, s) = (fg["mean"].as_f64().unwrap(), fg["std"].as_f64().unwrap());
        assert!((m - mean).abs() <= 0.005 * std && (s / std - 1.0).abs() < 0.005, "{name}: mean {m} std {s} vs nnU-Net {mean} {std}");
    }
}

#[test]
fn the_phantom_is_a_valid_dataset_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phantom");
    let run = || Command::new(stu_bin!()).args(["phantom", "--cases", "3", "--test-cases", "1", "--seed", "5", "--out"]).arg(&dir).status().unwrap();
    assert!(run().success());
    let (ok, out) = check(&dir);
    assert!(ok, "{out}");
    assert!(out.contains("3 cases") && out.contains("label values present: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]"), "{out}");
    assert!(dir.join("imagesTs/phantom_003_0000.nii.gz").exists() && dir.join("labelsTs/phantom_003.nii.gz").exists());
    // Deterministic per seed, and a rerun keeps finished cases (same bytes, nothing rewritten).
    let first = std::fs::read(dir.join("labelsTr/phantom_001.nii.gz")).unwrap();
    let modified = std::fs::metadata(dir.join("labelsTr/phantom_001.nii.gz")).unwrap().modified().unwrap();
    std::fs::remove_file(dir.join("imagesTr/phantom_002_0000.nii.gz")).unwrap();
    assert!(run().success());
    assert_eq!(std::fs::read(dir.join("labelsTr/phantom_001.nii.gz")).unwrap(), first);
    assert_eq!(std::fs::metadata(dir.join("labelsTr/phantom_001.nii.gz")).unwrap().modified().unwrap(), modified);
    assert!(dir.join("imagesTr/phantom_002_0000.nii.gz").exists(), "the missing case is written again");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(json["expert_groups"]["vertebrae_L2"], "vertebrae");
}

#[test]
fn totalsegmentator_release_converts_to_stunet_order_and_expert_groups() {
    use stu_core::taxonomy::{CLASSES, ExpertGroup, label_of};
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("Totalsegmentator_dataset");
    let src = shared().join("data/Dataset801_TotalSegExampleCT");
    // The shared labels use TotalSegmentator v2 ids; build a v1-style release by class name:
    // a mask per STU-Net class, empty for the 7 classes v2 lacks.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("dataset.json")).unwrap()).unwrap();
    let v2: std::collections::HashMap<String, u16> = json["labels"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u16)).collect();
    let cases = ["ts_ct_sm", "ts_ct_full"];
    for case in cases {
        let dir = release.join(case).join("segmentations");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join(format!("imagesTr/{case}_0000.nii.gz")), release.join(case).join("ct.nii.gz")).unwrap();
        let lab = read_label(&src.join(format!("labelsTr/{case}.nii.gz"))).unwrap();
        for (name, _, _) in CLASSES {
            let id = v2.get(name).copied();
            let mask: Vec<u16> = lab.data.iter().map(|&v| u16::from(Some(v) == id)).collect();
            write_label(&stu_data::totalseg::mask_path(&release, case, name), &mask, &lab.geom).unwrap();
        }
    }
    std::fs::write(release.join("meta.csv"), "image_id;age;gender;split\nts_ct_sm;60;m;train\nts_ct_full;55;f;test\n").unwrap();

    let out = tmp.path().join("converted");
    let st = Command::new(stu_bin!())
        .args(["dataset", "prepare", "totalsegmentator", "--out"])
        .arg(&out)
        .arg("--options")
        .arg(serde_json::json!({ "path": release }).to_string())
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    // STU-Net id of the v2 label at every voxel, by name.
    let to_stunet: std::collections::HashMap<u16, u16> = v2.iter().filter_map(|(n, &id)| label_of(n).map(|s| (id, s))).collect();
    let full = read_label(&out.join("labelsTs/ts_ct_full.nii.gz")).unwrap();
    let orig = read_label(&src.join("labelsTr/ts_ct_full.nii.gz")).unwrap();
    let want: Vec<u16> = orig.data.iter().map(|v| to_stunet.get(v).copied().unwrap_or(0)).collect();
    assert_eq!(full.data, want);
    assert_eq!(full.geom.affine, orig.geom.affine);
    assert!(out.join("imagesTr/ts_ct_sm_0000.nii.gz").exists(), "train split goes to imagesTr");
    let dj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(dj["labels"]["vertebrae_T9"], 104);
    assert_eq!(dj["numTraining"], 1);
    assert!(check(&out).0, "{}", check(&out).1);

    // One expert group: its classes only, renumbered 1..K in STU-Net order.
    let out = tmp.path().join("vertebrae");
    stu_data::totalseg::convert(&release, &out, Some(ExpertGroup::Vertebrae)).unwrap();
    let v = read_label(&out.join("labelsTs/ts_ct_full.nii.gz")).unwrap();
    let group = ExpertGroup::Vertebrae.labels();
    let want: Vec<u16> = want.iter().map(|s| group.iter().position(|g| g == s).map(|i| i as u16 + 1).unwrap_or(0)).collect();
    assert_eq!(v.data, want);
    assert!(v.data.iter().any(|&x| x > 0), "the case has vertebrae");

    // A missing mask is an error naming the file.
    std::fs::remove_file(stu_data::totalseg::mask_path(&release, "ts_ct_sm", "liver")).unwrap();
    let err = stu_data::totalseg::convert(&release, &tmp.path().join("broken"), None).unwrap_err().to_string();
    assert!(err.contains("ts_ct_sm/segmentations/liver.nii.gz") && err.contains("missing mask"), "{err}");
}

#[test]
fn decathlon_and_v1_tasks_convert_to_the_v2_layout() {
    // tests/fixtures/make_msd_fixture.py: a 4-D two-modality Decathlon task, and nnU-Net
    // 2.8.1's own split of its training image (SimpleITK) as the reference.
    let tmp = tempfile::tempdir().unwrap();
    let task = tests::own_fixtures().join("Task09_Tiny");
    let out = tmp.path().join("Dataset009_Tiny");
    let run = |src: &Path, out: &Path| Command::new(stu_bin!()).args(["dataset", "convert"]).arg(src).arg("--out").arg(out).output().unwrap();
    let o = run(&task, &out);
    let log = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && log.contains("Decathlon") && log.contains("1 training case(s), 1 test case(s)"), "{log}{}", String::from_utf8_lossy(&o.stderr));
    for c in 0..2 {
        let ours = read_image(&out.join(format!("imagesTr/tiny_001_{c:04}.nii.gz"))).unwrap();
        let theirs = read_image(&tests::own_fixtures().join(format!("msd_split/tiny_001_{c:04}.nii.gz"))).unwrap();
        assert_eq!(ours.data, theirs.data, "channel {c}");
        assert_eq!(ours.geom.shape, theirs.geom.shape);
        let err = ours.geom.affine.iter().flatten().zip(theirs.geom.affine.iter().flatten()).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "channel {c}: affine off by {err}");
        assert!(out.join(format!("imagesTs/tiny_002_{c:04}.nii.gz")).exists());
    }
    assert_eq!(std::fs::read(out.join("labelsTr/tiny_001.nii.gz")).unwrap(), std::fs::read(task.join("labelsTr/tiny_001.nii.gz")).unwrap());
    let json = stu_data::dataset::DatasetJson::read(&out.join("dataset.json")).unwrap();
    assert_eq!(json.channel_names, ["FLAIR", "T1w"]);
    assert_eq!(json.foreground_classes(), [(1, "edema"), (2, "tumour")]);
    let (ok, report) = check(&out);
    assert!(ok, "{report}");
    // The converted folder is taken for a v1 task (split channel files) and copied as such;
    // its v2 dataset.json is recognised and refused, naming the key.
    let v1 = tmp.path().join("Task010_Again");
    std::fs::create_dir_all(&v1).unwrap();
    for d in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(v1.join(d)).unwrap();
        for e in std::fs::read_dir(out.join(d)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), v1.join(d).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(out.join("dataset.json"), v1.join("dataset.json")).unwrap();
    let o = run(&v1, &tmp.path().join("again"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`labels`") && err.contains("already"), "{err}");
    std::fs::copy(task.join("dataset.json"), v1.join("dataset.json")).unwrap();
    let o = run(&v1, &tmp.path().join("again"));
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("v1 task"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(tmp.path().join("again/imagesTr/tiny_001_0001.nii.gz")).unwrap(), std::fs::read(out.join("imagesTr/tiny_001_0001.nii.gz")).unwrap());
    // A modality count that does not match the 4-D images fails, naming the file, and leaves
    // nothing behind; an existing dataset is never written over.
    let bad = tmp.path().join("Task011_Bad");
    for d in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(bad.join(d)).unwrap();
    }
    std::fs::copy(task.join("imagesTr/tiny_001.nii.gz"), bad.join("imagesTr/tiny_001.nii.gz")).unwrap();
    std::fs::copy(task.join("labelsTr/tiny_001.nii.gz"), bad.join("labelsTr/tiny_001.nii.gz")).unwrap();
    let text = std::fs::read_to_string(task.join("dataset.json")).unwrap().replace(r#""1": "T1w""#, r#""1": "T1w", "2": "T2w""#);
    std::fs::write(bad.join("dataset.json"), text).unwrap();
    let o = run(&bad, &tmp.path().join("bad-out"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tiny_001.nii.gz") && err.contains("2 volume(s)") && err.contains("names 3"), "{err}");
    assert!(!tmp.path().join("bad-out").exists());
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".tmp-")), "the partial dataset is removed");
    let o = run(&task, &out);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not empty"));
}

#[test]
fn overlays_equal_nnunets_pixel_for_pixel() {
    // tests/fixtures/make_overlay_fixture.py: nnU-Net 2.8.1's generate_overlay of the shared MR
    // case on the slice its labels cover most (slice 19 of 20).
    let tmp = tempfile::tempdir().unwrap();
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tests::own_fixtures().join("overlay_mr.json")).unwrap()).unwrap();
    let img = read_image(&shared().join("data/Dataset802_TotalSegExampleMR").join(IMAGE)).unwrap();
    let seg = read_label(&shared().join("data/Dataset802_TotalSegExampleMR").join(LABEL)).unwrap();
    assert_eq!(stu_report::overlay::select_slice(&seg.data, seg.geom.shape), want["slice"].as_u64().unwrap() as usize);
    let o = Command::new(stu_bin!()).args(["dataset", "overlay"]).arg(shared().join("data/Dataset802_TotalSegExampleMR")).arg("--out").arg(tmp.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let decode = |p: &Path| {
        let mut r = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap())).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        let px = info.color_type.samples();
        buf.truncate(info.buffer_size());
        (buf.chunks_exact(px).flat_map(|p| [p[0], p[1], p[2]]).collect::<Vec<u8>>(), info.width, info.height)
    };
    let (ours, w, h) = decode(&tmp.path().join("ts_mr_sm.png"));
    let (theirs, tw, th) = decode(&tests::own_fixtures().join("overlay_mr.png"));
    assert_eq!((w, h), (tw, th));
    assert_eq!((w as usize, h as usize), (img.geom.shape[2], img.geom.shape[1]));
    let off = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    assert_eq!(off, 0, "{off} of {} bytes differ from nnU-Net's overlay", ours.len());
}

#[test]
fn metaimage_and_nrrd_volumes_read_as_simpleitk_converts_them_and_round_trip() {
    // tests/fixtures/make_itk_fixture.py: SimpleITK 2.5 wrote each volume as MetaImage, as NRRD
    // and as NIfTI; ours reads the first two as the voxels and RAS affine of SimpleITK's NIfTI
    // (an oblique asymmetric direction with determinant −1, compressed int16; uncompressed uint8
    // in a .mhd/.nhdr with its own data file; uncompressed float32).
    let dir = tests::own_fixtures().join("itk");
    for (mha, label) in [("oblique_int16", false), ("labels_uchar", true), ("float_plain", false)].into_iter().flat_map(|(n, l)| {
        let (meta, nrrd) = if l { (".mhd", ".nhdr") } else { (".mha", ".nrrd") };
        [(format!("{n}{meta}"), l), (format!("{n}{nrrd}"), l)]
    }) {
        let nii = dir.join(format!("{}.nii.gz", stu_data::nifti_io::split_ending(&mha).unwrap().0));
        let (ours, theirs) = (read_image(&dir.join(&mha)).unwrap(), read_image(&nii).unwrap());
        assert_eq!(ours.data, theirs.data, "{mha}");
        assert_eq!(ours.geom.shape, theirs.geom.shape, "{mha}");
        let err = ours.geom.affine.iter().flatten().zip(theirs.geom.affine.iter().flatten()).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "{mha}: affine off by {err}");
        assert!(ours.geom.spacing.iter().zip(&theirs.geom.spacing).all(|(a, b)| (a - b).abs() < 1e-6), "{mha}: spacing");
        if label {
            assert_eq!(read_label(&dir.join(&mha)).unwrap().data, read_label(&nii).unwrap().data);
        }
    }
    // Written as .mha and read back: the same voxels and affine (labels as uint8 and uint16,
    // images as int16 and float32); a NIfTI written from a MetaImage's geometry keeps its affine.
    let tmp = tempfile::tempdir().unwrap();
    let ct = read_image(&dir.join("oblique_int16.mha")).unwrap();
    let float: Vec<f32> = ct.data.iter().map(|v| v * 0.5 + 0.25).collect();
    for (name, data) in [("ct.mha", &ct.data), ("float.mha", &float), ("ct.nrrd", &ct.data), ("float.nrrd", &float)] {
        write_image(&tmp.path().join(name), data, &ct.geom).unwrap();
        let back = read_image(&tmp.path().join(name)).unwrap();
        assert_eq!(&back.data, data, "{name}");
        assert!(back.geom.affine_mismatch(&ct.geom) < 1e-12, "{name}");
    }
    for (wide, ending) in [(false, ".mha"), (true, ".mha"), (false, ".nrrd"), (true, ".nrrd")] {
        let labels: Vec<u16> = (0..ct.data.len()).map(|i| (i % 7) as u16 * if wide { 1000 } else { 1 }).collect();
        let p = tmp.path().join(format!("labels{wide}{ending}"));
        stu_data::nifti_io::write_label_as(&p, &labels, &ct.geom, wide).unwrap();
        let back = read_label(&p).unwrap();
        assert!(back.data == labels && back.geom.affine_mismatch(&ct.geom) < 1e-12, "{p:?}");
    }
    write_image(&tmp.path().join("ct.nii.gz"), &ct.data, &ct.geom).unwrap();
    assert!(read_image(&tmp.path().join("ct.nii.gz")).unwrap().geom.affine_mismatch(&ct.geom) < 1e-6);
    // Truncated voxels, a corrupt header, a .mhd without its data file, 4-D data, .mhd output:
    // errors that name the file and say what is wrong.
    let nrrd = std::fs::read(dir.join("oblique_int16.nrrd")).unwrap();
    std::fs::write(tmp.path().join("cut.nrrd"), &nrrd[..nrrd.len() - 40]).unwrap();
    let e = read_image(&tmp.path().join("cut.nrrd")).unwrap_err().to_string();
    assert!(e.contains("cut.nrrd") && (e.contains("truncated") || e.contains("gzip")), "{e}");
    std::fs::write(tmp.path().join("vector.nrrd"), String::from_utf8_lossy(&nrrd).replace("dimension: 3", "dimension: 4").replace("sizes: 6 5 4", "sizes: 3 6 5 4").as_bytes()).unwrap();
    let e = read_image(&tmp.path().join("vector.nrrd")).unwrap_err().to_string();
    assert!(e.contains("vector.nrrd") && e.contains("3-D"), "{e}");
    let bytes = std::fs::read(dir.join("oblique_int16.mha")).unwrap();
    let cut = tmp.path().join("cut.mha");
    std::fs::write(&cut, &bytes[..bytes.len() - 40]).unwrap();
    let e = read_image(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.mha") && (e.contains("truncated") || e.contains("zlib")), "{e}");
    let marker = b"ElementDataFile = LOCAL\n";
    let header_end = bytes.windows(marker.len()).position(|w| w == marker).unwrap() + marker.len();
    let text = String::from_utf8_lossy(&bytes[..header_end]).to_string();
    let mut four = text[..header_end].replace("NDims = 3", "NDims = 4").replace("DimSize = 6 5 4", "DimSize = 6 5 4 2").into_bytes();
    four.extend_from_slice(&bytes[header_end..]);
    std::fs::write(tmp.path().join("four.mha"), &four).unwrap();
    let e = read_image(&tmp.path().join("four.mha")).unwrap_err().to_string();
    assert!(e.contains("four.mha") && e.contains("3-D"), "{e}");
    std::fs::write(tmp.path().join("junk.mha"), b"\x89PNG\r\n\x1a\n binary").unwrap();
    let e = read_image(&tmp.path().join("junk.mha")).unwrap_err().to_string();
    assert!(e.contains("junk.mha") && e.contains("MetaImage"), "{e}");
    std::fs::copy(dir.join("labels_uchar.mhd"), tmp.path().join("alone.mhd")).unwrap();
    let e = read_label(&tmp.path().join("alone.mhd")).unwrap_err().to_string();
    assert!(e.contains("alone.mhd") && e.contains("labels_uchar.raw"), "{e}");
    for out in ["out.mhd", "out.nhdr"] {
        let e = write_label(&tmp.path().join(out), &[0u16; 120], &ct.geom).unwrap_err().to_string();
        assert!(e.contains(out) && e.contains(".mha or .nrrd"), "{e}");
    }
}
