//! Wrong checkpoint files fail with a message naming the file and the key; export round-trips.

use std::path::Path;
use std::process::Command;

use stu_engine::backend::Backend;
use stu_engine::checkpoint::{NamedTensor, StateDict, write_safetensors};
use stu_harness::forward::{ModelSource, StrideSource, export, load};
use tests::{parity_dir, read_tensor, stu_bin};

fn source(path: &Path) -> ModelSource {
    ModelSource { checkpoint: path.to_path_buf(), model: None, strides: StrideSource::Default, backend: Backend::Flex }
}

fn load_err(path: &Path) -> String {
    match load(&source(path)) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// The fixture's weights without the `weights.` prefix, as an editable list.
fn fixture_weights() -> Vec<NamedTensor> {
    let path = parity_dir().join("tiny_iso.safetensors");
    let dict = StateDict::open(&path).unwrap().select_model("conv_blocks_context.0.0.conv1.weight").unwrap();
    let keys: Vec<String> = dict.keys().map(str::to_string).collect();
    keys.into_iter()
        .filter(|k| !k.starts_with("input") && !k.starts_with("output"))
        .map(|k| {
            let shape = dict.shape(&k).unwrap().to_vec();
            let data = dict.read(&k, &shape).unwrap();
            NamedTensor { name: k, shape, data }
        })
        .collect()
}

#[test]
fn truncated_and_foreign_files_are_rejected_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    for (name, src) in [("cut.model", "tiny_iso_nnunetv1.model"), ("cut.pth", "tiny_iso_nnunetv2.pth"), ("cut.safetensors", "tiny_iso.safetensors")] {
        let bytes = std::fs::read(parity_dir().join(src)).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = load_err(&path);
        assert!(msg.contains(name), "{msg}");
    }
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello, not a checkpoint").unwrap();
    let msg = load_err(&text);
    assert!(msg.contains("notes.txt") && msg.contains("not a readable checkpoint"), "{msg}");
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_err(&empty).contains("empty"));
    assert!(load_err(&dir.path().join("absent.pth")).contains("absent.pth"));
}

#[test]
fn missing_key_wrong_shape_unknown_key_and_nan_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let weights = fixture_weights();

    let missing: Vec<_> = weights.iter().filter(|t| t.name != "conv_blocks_context.2.0.norm1.bias").cloned().collect();
    let path = dir.path().join("missing.safetensors");
    write_safetensors(&path, &missing, None).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("missing.safetensors") && msg.contains("`conv_blocks_context.2.0.norm1.bias`"), "{msg}");

    let mut wrong = weights.clone();
    let t = wrong.iter_mut().find(|t| t.name == "upsample_layers.1.conv.weight").unwrap();
    t.shape = vec![t.shape[0], t.shape[1] / 2, 1, 1, 2];
    let path = dir.path().join("shape.safetensors");
    write_safetensors(&path, &wrong, None).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("shape.safetensors") && msg.contains("`upsample_layers.1.conv.weight`") && msg.contains("expected"), "{msg}");

    let mut extra = weights.clone();
    extra.push(NamedTensor { name: "decoder.proj.weight".into(), shape: vec![2], data: vec![0.0; 2] });
    let path = dir.path().join("extra.safetensors");
    write_safetensors(&path, &extra, None).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("unexpected key `decoder.proj.weight`"), "{msg}");

    let mut nan = weights.clone();
    nan.iter_mut().find(|t| t.name == "seg_outputs.3.bias").unwrap().data[1] = f32::NAN;
    let path = dir.path().join("nan.safetensors");
    write_safetensors(&path, &nan, None).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("`seg_outputs.3.bias`") && msg.contains("non-finite"), "{msg}");

    let other: Vec<_> = vec![NamedTensor { name: "encoder.weight".into(), shape: vec![3], data: vec![1.0; 3] }];
    let path = dir.path().join("other.safetensors");
    write_safetensors(&path, &other, None).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("other.safetensors") && msg.contains("no registered model"), "{msg}");
}

#[test]
fn strides_that_do_not_fit_are_rejected() {
    let src = ModelSource {
        strides: StrideSource::Explicit(vec![[2, 2, 2]; 4]),
        ..source(&parity_dir().join("tiny_iso_nnunetv2.pth"))
    };
    let msg = format!("{:#}", load(&src).err().unwrap());
    assert!(msg.contains("4 strides given") && msg.contains("6 stages"), "{msg}");
}

#[test]
fn the_cli_exits_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // Wrong channel count: the fixture input has 1 channel, this model wants 2.
    let out = Command::new(stu_bin!())
        .args(["forward", "--checkpoint"])
        .arg(tests::own_fixtures().join("aniso_deep_b2c2.safetensors"))
        .args(["--strides", "1,2,2:2,2,2:2,2,1:1,2,2:1,1,1", "--input"])
        .arg(parity_dir().join("tiny_iso.safetensors"))
        .arg("--output")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tiny_iso.safetensors: input has 1 channels, the model expects 2"), "{err}");
    assert!(!dir.path().join("o.safetensors").exists(), "no output on failure");

    let out = Command::new(stu_bin!()).args(["inspect", "--checkpoint", "/nonexistent/x.model"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.model"));
}

#[test]
fn export_round_trips_keys_order_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export.safetensors");
    let n = export(&source(&parity_dir().join("tiny_iso_nnunetv1.model")), &out).unwrap();
    assert_eq!(n, 130);
    let original = StateDict::open(parity_dir().join("tiny_iso_nnunetv1.model")).unwrap();
    let exported = StateDict::open(&out).unwrap();
    assert_eq!(exported.prefix(), "", "exported keys carry no prefix");
    let a: Vec<&str> = original.keys().collect();
    let b: Vec<&str> = exported.keys().collect();
    assert_eq!(a, b);
    for key in a {
        let (shape, want) = (original.shape(key).unwrap().to_vec(), original.read(key, original.shape(key).unwrap()).unwrap());
        assert_eq!(read_tensor(&out, key), (shape, want), "{key}");
    }
    // The file's own tensor order is the reference registration order.
    let bytes = std::fs::read(&out).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let first = header.find("conv_blocks_context.0.0.conv1.weight").unwrap();
    let last = header.find("seg_outputs.4.bias").unwrap();
    assert!(first < last);
    // And the exported file runs: load it again.
    assert!(load(&source(&out)).is_ok());
}

#[test]
fn a_pickle_that_calls_os_system_is_parsed_not_executed() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    // protocol-2 pickle of `posix.system("touch <marker>")` (GLOBAL, TUPLE1, REDUCE).
    let cmd = format!("touch {}", marker.display());
    let mut p = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(b"q\x01\x85q\x02Rq\x03.");
    let path = dir.path().join("evil.pth");
    std::fs::write(&path, &p).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("evil.pth"), "{msg}");
    assert!(!marker.exists(), "the pickle's code ran");
}

#[test]
fn strides_come_from_nnunet_v2_plans_in_both_schemas() {
    let dir = tempfile::tempdir().unwrap();
    // nnU-Net ≤ 2.3: pool_op_kernel_sizes with the stage-0 entry; 6 entries → 5 strides; the
    // sixth stage's stride is dropped (STU-Net keeps 5).
    let old = dir.path().join("plans_old.json");
    std::fs::write(
        &old,
        r#"{"configurations": {"3d_fullres": {"pool_op_kernel_sizes": [[1,1,1],[1,2,2],[2,2,2],[2,2,1],[1,2,2],[1,1,1],[2,2,2]]}}}"#,
    )
    .unwrap();
    // nnU-Net ≥ 2.4: architecture.arch_kwargs.strides; only 3 downsamplings → padded with [1,1,1].
    let new = dir.path().join("plans_new.json");
    std::fs::write(
        &new,
        r#"{"configurations": {"3d_lowres": {"architecture": {"arch_kwargs": {"strides": [[1,1,1],[2,2,2],[2,2,2],[1,2,2]]}}}}}"#,
    )
    .unwrap();
    let aniso = tests::own_fixtures().join("aniso_deep_b2c2.safetensors");
    let src = |plans: &Path, conf: &str| ModelSource {
        strides: StrideSource::Plans(plans.to_path_buf(), conf.to_string()),
        ..source(&aniso)
    };
    let (net, _) = load(&src(&old, "3d_fullres")).unwrap();
    assert_eq!(net.describe()["strides"], serde_json::json!([[1, 2, 2], [2, 2, 2], [2, 2, 1], [1, 2, 2], [1, 1, 1]]));
    let (net, _) = load(&src(&new, "3d_lowres")).unwrap();
    assert_eq!(net.describe()["strides"], serde_json::json!([[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1]]));
    let msg = format!("{:#}", load(&src(&old, "2d")).err().unwrap());
    assert!(msg.contains("plans_old.json") && msg.contains("configurations.2d"), "{msg}");
}

#[test]
fn a_safetensors_header_length_starting_with_the_pickle_marker_is_still_safetensors() {
    // The 8-byte header length is little-endian; a low byte of 0x80 once sent such files to the
    // pickle reader.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let t = vec![stu_engine::checkpoint::NamedTensor { name: "a".into(), shape: vec![2], data: vec![1.0, 2.0] }];
    for pad in 0..300 {
        let meta = std::collections::HashMap::from([("pad".to_string(), "x".repeat(pad))]);
        stu_engine::checkpoint::write_safetensors(&path, &t, Some(meta)).unwrap();
        if std::fs::read(&path).unwrap()[0] == 0x80 {
            let d = StateDict::open(&path).unwrap();
            assert_eq!(d.read("a", &[2]).unwrap(), vec![1.0, 2.0]);
            return;
        }
    }
    panic!("no padding gave a 0x80 first byte");
}
