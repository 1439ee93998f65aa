//! Registry guards and the exact counts of `shared/docs/stunet.md` §2.

use stu_engine::model::{LoadOptions, SegNet, registry};
use stu_engine::{Device, Tensor, TensorData};

use crate::stunet::{self, ISO_STRIDES, StuNet, StuNetArch, TOTALSEG_CLASSES, TOTALSEG_STRIDES};

fn device() -> Device {
    stu_engine::backend::Backend::default_compiled().unwrap().device().unwrap()
}

#[test]
fn expected_plugins_are_registered_with_unique_names() {
    // `registry()` panics on duplicates or bad names, so building it is half the test.
    let models: Vec<_> = registry().names().collect();
    assert_eq!(models, ["stunet"]);
    let presets: Vec<_> = stu_core::scaling::registry().names().collect();
    assert_eq!(presets, ["stunet-b", "stunet-h", "stunet-l", "stunet-s"]);
    for p in stu_core::scaling::registry().iter() {
        assert!(registry().get(p.family).is_ok(), "preset {} names unknown family {}", p.id, p.family);
    }
}

/// (preset, params, state-dict tensors, MACs: TS plan weights only, TS plan + bias,
/// isotropic weights only, isotropic + bias), from stunet.md §2.1 and §2.3.
const COUNTS: [(&str, u64, usize, [u64; 4]); 4] = [
    ("stunet-s", 14_596_941, 130, [130_069_168_128, 130_633_884_160, 129_377_107_968, 129_941_676_544]),
    ("stunet-b", 58_262_669, 130, [509_011_558_400, 509_889_339_904, 506_243_317_760, 507_120_804_352]),
    ("stunet-l", 440_302_605, 218, [3_825_455_333_376, 3_827_674_898_944, 3_803_510_734_848, 3_805_729_317_376]),
    ("stunet-h", 1_457_326_221, 306, [12_667_240_316_928, 12_671_517_319_680, 12_593_403_789_312, 12_597_678_727_680]),
];

#[test]
fn preset_counts_are_exact() {
    let summaries = (registry().get("stunet").unwrap().presets)();
    assert_eq!(summaries.len(), 4);
    for (s, (name, params, tensors, macs)) in summaries.iter().zip(COUNTS) {
        assert_eq!(s.name, name);
        assert_eq!(s.params, params, "{name} params");
        assert_eq!(s.state_dict_tensors, tensors, "{name} tensors");
        assert_eq!(s.macs_128_variants["totalseg_plan_weights_only"], macs[0], "{name}");
        assert_eq!(s.macs_128_variants["totalseg_plan_with_bias"], macs[1], "{name}");
        assert_eq!(s.macs_128_variants["iso_weights_only"], macs[2], "{name}");
        assert_eq!(s.macs_128, macs[3], "{name} macs_128");
    }
}

#[test]
fn params_of_the_built_module_equal_the_key_table() {
    // The lazy module (what `stu zoo` counts) and the checkpoint key table agree for every preset,
    // and one more class adds Σ dims[0..4] + 5 parameters (997 for B).
    for p in stunet::presets() {
        let arch = StuNetArch::from_rule(p.rule, 1, TOTALSEG_CLASSES, ISO_STRIDES.to_vec());
        let net = StuNet::new(&arch, &device()).unwrap();
        let table: usize = arch.keys().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(SegNet::num_params(&net), table, "{}", p.id);
        let more = StuNet::new(&StuNetArch { num_classes: 106, ..arch.clone() }, &device()).unwrap();
        let per_class: usize = arch.dims[..5].iter().sum::<usize>() + 5;
        assert_eq!(SegNet::num_params(&more) - SegNet::num_params(&net), per_class, "{}", p.id);
    }
}

fn tiny(strides: Vec<[usize; 3]>, depth: usize, cin: usize) -> StuNetArch {
    StuNetArch { in_channels: cin, num_classes: 3, depth: vec![depth; 6], dims: vec![2, 4, 4, 8, 8, 8], strides }
}

fn input(shape: [usize; 5]) -> Tensor<5> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    Tensor::from_data(TensorData::new(data, shape), &device())
}

#[test]
fn deep_supervision_shapes_follow_the_strides() {
    let net = StuNet::new(&tiny(TOTALSEG_STRIDES.to_vec(), 1, 1), &device()).unwrap();
    let outs = net.forward_ds(input([1, 1, 16, 16, 32]));
    let dims: Vec<_> = outs.iter().map(|o| o.dims()).collect();
    assert_eq!(dims, [[1, 3, 16, 16, 32], [1, 3, 8, 8, 16], [1, 3, 4, 4, 8], [1, 3, 2, 2, 4], [1, 3, 1, 1, 2]]);
    // Inference mode returns the full-resolution head only, with the same values.
    let full = net.forward(input([1, 1, 16, 16, 32]));
    assert_eq!(full.dims(), [1, 3, 16, 16, 32]);
    let a = stu_engine::ops::to_vec(full);
    let b = stu_engine::ops::to_vec(outs[0].clone());
    assert_eq!(a, b);

    let aniso = vec![[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]];
    let net = StuNet::new(&tiny(aniso, 2, 2), &device()).unwrap();
    assert_eq!(net.input_divisor(), [4, 16, 16]);
    let outs = net.forward_ds(input([2, 2, 4, 16, 16]));
    let dims: Vec<_> = outs.iter().map(|o| o.dims()).collect();
    assert_eq!(dims, [[2, 3, 4, 16, 16], [2, 3, 4, 8, 8], [2, 3, 2, 4, 4], [2, 3, 1, 2, 2], [2, 3, 1, 1, 1]]);
    assert!(stu_engine::ops::to_vec(outs[0].clone()).iter().all(|v| v.is_finite()));
}

#[test]
fn exported_keys_follow_the_reference_order() {
    let arch = tiny(ISO_STRIDES.to_vec(), 2, 3);
    let net = StuNet::new(&arch, &device()).unwrap();
    let exported: Vec<(String, Vec<usize>)> = net.state_dict().into_iter().map(|t| (t.name, t.shape)).collect();
    assert_eq!(exported, arch.keys());
}

#[test]
fn load_options_strides_must_match_the_stage_count() {
    let opts = LoadOptions { strides: Some(vec![[2, 2, 2]; 4]) };
    assert_eq!(opts.strides.as_ref().unwrap().len(), 4);
    let arch = StuNetArch { strides: vec![[2, 2, 2]; 4], ..tiny(ISO_STRIDES.to_vec(), 1, 1) };
    assert!(arch.validate().unwrap_err().contains("4 strides given for 6 stages"));
}
