//! The `stu` command line: argument parsing, logging, exit codes. Commands live in sibling modules.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use stu_engine::backend::Backend;
use stu_engine::precision::Precision;
use crate::forward::{self, ForwardOptions, ModelSource, StrideSource};

#[derive(Parser)]
#[command(name = "stu", version, about = "STU-Net research harness: models, checkpoints, training, inference", args_override_self = true, after_help = "nnU-Net's command names and flags work too, over $nnUNet_raw, $nnUNet_preprocessed and $nnUNet_results: `stu nnUNetv2` lists them.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on the embedded default dataset: phantom → check → plan → preprocess, then the quickstart study (three STU-Net widths trained, predicted and scored; a table and a figure).
    Quickstart {
        /// Output folder.
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        /// Phantom training cases.
        #[arg(long, default_value_t = 16)]
        cases: usize,
        /// Phantom seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only the data pipeline (phantom → check → plan → preprocess), no training.
        #[arg(long)]
        data_only: bool,
    },
    /// List registered models and presets with blocks, widths, parameters and MACs.
    Zoo {
        /// Print JSON (keys: name, params, macs_128, …).
        #[arg(long)]
        json: bool,
    },
    /// Show the container and the architecture inferred from a checkpoint.
    Inspect(ModelArgs),
    /// Run a checkpoint's network (deep supervision) on a tensor; write output.0 … output.4.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// safetensors file holding the input tensor (B×C×D×H×W, f32).
        #[arg(long)]
        input: PathBuf,
        /// Name of the input tensor.
        #[arg(long, default_value = "input")]
        input_key: String,
        /// safetensors file to write.
        #[arg(long)]
        output: PathBuf,
        /// Arithmetic: f32, bf16 or f16 (half precision needs `--backend tch` or `tch-cuda`; f16 training scales the loss dynamically).
        #[arg(long, default_value = "f32")]
        precision: Precision,
    },
    /// Datasets in nnU-Net raw layout.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Write the synthetic CT phantom dataset (nnU-Net raw layout; deterministic per seed).
    Phantom {
        /// Dataset folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Training cases.
        #[arg(long, default_value_t = 16)]
        cases: usize,
        /// Held-out cases (imagesTs/labelsTs).
        #[arg(long, default_value_t = 4)]
        test_cases: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Fingerprint a dataset (nnU-Net's `dataset_fingerprint.json`: spacings, shapes after cropping, foreground intensity statistics).
    Fingerprint {
        /// The dataset folder (nnU-Net raw layout).
        dir: PathBuf,
        /// The JSON to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fingerprint a dataset and write its plans: 2d, 3d_fullres and, where nnU-Net makes them, 3d_lowres and 3d_cascade_fullres (nnU-Net's rules), or the STU-Net preset's 3d_fullres.
    Plan {
        /// The dataset folder (nnU-Net raw layout).
        dir: PathBuf,
        /// plans.json to write; dataset_fingerprint.json goes beside it.
        #[arg(long)]
        out: PathBuf,
        /// `nnunet` (v2.2 planner), `resenc-m|l|xl` (nnU-Net's ResEnc planners, for
        /// `--model nnunet-resenc`) or `stunet` (1.5 mm, 128³, batch 2, z-score, released strides).
        #[arg(long, default_value = "nnunet", value_parser = stu_data::plan::Preset::NAMES)]
        preset: String,
        /// GPU memory target of nnU-Net's VRAM rule (default: the preset's, 8, 24 or 40 GB).
        #[arg(long)]
        gpu_memory_gb: Option<f64>,
    },
    /// Preprocess a dataset with a plan (crop, normalise, resample); resumes where it stopped.
    Preprocess {
        /// The dataset folder (nnU-Net raw layout).
        dir: PathBuf,
        /// plans.json (`stu plan` or nnU-Net's nnUNetPlans.json).
        #[arg(long)]
        plans: PathBuf,
        /// Configuration in the plans.
        #[arg(long, default_value = "3d_fullres")]
        configuration: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Cases processed at once (voxel loops use every core regardless).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Write the benchmark CT dataset (Dataset990_SyntheticCT, as shared/bench/make_synthetic_ct.py).
    #[command(hide = true)]
    BenchData {
        /// Parent folder.
        #[arg(long)]
        out: PathBuf,
        /// Also a whole-body-length CT for whole-volume inference, `imagesTs/long_0000.nii.gz`
        /// (512×512×807 at 0.8×0.8×1.0 mm).
        #[arg(long)]
        long: bool,
    },
    /// Time STU-Net forward and forward+backward on this machine (cases of shared/bench/cpu_anchor.py).
    Bench {
        /// Only cases whose id contains one of these (e.g. `S_64 block`); training steps
        /// (`train_S_128_b2`, …), patch inference (`infer_B_128`, …) and data-parallel
        /// all-reduces (`allreduce_B_w2`, …) and whole-volume sliding windows (`window_B_ct300`,
        /// `window_B_ct300_tta`, …; `window_B` names every B case) run only when named (`train`,
        /// `infer`, `allreduce`, `window`).
        cases: Vec<String>,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Compute backend.
        #[arg(long, default_value = "flex")]
        backend: Backend,
        /// Arithmetic: f32, bf16 or f16 (half precision needs `--backend tch` or `tch-cuda`; f16 training scales the loss dynamically).
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Run each training-step / inference case once more under libtorch's profiler and write
        /// its Chrome trace to DIR/{case}.json (`--backend tch` or `tch-cuda`; summarise with
        /// `xtask/bench/profile_table.py`).
        #[arg(long, value_name = "DIR")]
        profile: Option<PathBuf>,
        /// Cubic patch edge for the training-step and inference cases (default 128; a multiple
        /// of 32). Small patches show the per-step overhead around the kernels.
        #[arg(long, value_name = "N")]
        patch: Option<usize>,
    },
    /// Check a device's operators: on `tch`/`tch-cuda` the libtorch fast paths (ATen/cuDNN
    /// convolutions, fused instance norms, the split-row norm) against burn's composed operators
    /// (values and gradients of a residual block in each layout); on `wgpu`, `cuda` or `ndarray`
    /// burn's own kernels against flex (convolutions, GELU, a Swin window's bias lookups, one
    /// training step's gradients of every model); exits non-zero on a mismatch.
    CheckOps {
        /// `tch` (CPU) or `tch-cuda`.
        #[arg(long, default_value = "tch")]
        backend: Backend,
    },
    /// Predict NIfTI volumes (sliding window, mirroring TTA, fold ensembles) into label maps with the input's geometry.
    Predict {
        /// A NIfTI file or a folder of `{case}_{XXXX}.nii.gz` files.
        #[arg(short, long)]
        input: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Checkpoint: ours, nnU-Net v1 `.model`, v2 `.pth`, safetensors, a `stu train` run
        /// folder (its final checkpoint), or an installed model's folder (`stu install-model`:
        /// all its folds). Several (`--checkpoint runs/fold0 runs/fold1 …`, or the
        /// option repeated): an ensemble, each tile's logits averaged over them (nnU-Net's fold
        /// ensemble).
        #[arg(long = "checkpoint", required = true, num_args = 1..)]
        checkpoints: Vec<PathBuf>,
        /// Which checkpoint of a run folder given to --checkpoint: final or best (nnU-Net's `-chk`).
        #[arg(long, default_value = "final", value_parser = ["final", "best"])]
        chk: String,
        /// Model registry name (default: recognised from the keys).
        #[arg(long)]
        model: Option<String>,
        /// plans.json (default: the training run's for our checkpoints, else the released STU-Net plan: 1.5 mm, 128³, z-score). A dataset.json beside it (an nnU-Net model folder's) marks a region-based model, predicted with sigmoids in its regions_class_order.
        #[arg(long)]
        plans: Option<PathBuf>,
        /// Configuration in the plans (default: the one the checkpoints were trained with, else 3d_fullres).
        #[arg(long)]
        configuration: Option<String>,
        /// Mirroring test-time augmentation off.
        #[arg(long)]
        disable_tta: bool,
        /// Tile step as a fraction of the patch.
        #[arg(long, default_value_t = 0.5)]
        step: f64,
        /// Keep only the largest 26-connected component of each label.
        #[arg(long)]
        keep_largest: bool,
        /// Apply a `postprocessing.json` (`stu postprocess determine` on the cross-validation) to every label map.
        #[arg(long)]
        postprocessing: Option<PathBuf>,
        /// Direct inference: write a target dataset's labels from STU-Net's 104 classes (built-in map name, e.g. `btcv`, or a TOML file).
        #[arg(long)]
        label_map: Option<String>,
        /// Also write `{case}.probabilities.safetensors`: softmax per class, float16, in the input's array order.
        #[arg(long)]
        save_probabilities: bool,
        /// Write the probabilities as nnU-Net does instead (implies --save-probabilities): `{case}.npz` (float32 `probabilities`) and `{case}.pkl` (the case's properties), which Python nnU-Net's `nnUNetv2_ensemble` reads.
        #[arg(long, conflicts_with = "fast_export")]
        npz: bool,
        /// Fast export (nnU-Net v1's `--mode fast`, STU-Net's recommended inference): the argmax on the network's grid, then only the label map resampled to the input's, instead of every class's logits; labels may differ from the full export along boundaries.
        #[arg(long, conflicts_with = "save_probabilities")]
        fast_export: bool,
        /// Read the next case and export the previous one while a case runs through the network (`on`: holds two cases' logits), or one case at a time (`off`). Default: on with a GPU backend, off on the CPU, whose cores the network already fills.
        #[arg(long, value_parser = parse_on_off)]
        overlap: Option<bool>,
        /// Compute backend.
        #[arg(long, default_value = "flex")]
        backend: Backend,
        /// Arithmetic: f32, bf16 or f16 (half precision needs `--backend tch` or `tch-cuda`; f16 training scales the loss dynamically).
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Skip cases whose label map (and probabilities, when asked for) is already in the output folder (nnU-Net's --continue_prediction).
        #[arg(long)]
        continue_prediction: bool,
        /// Split the sorted cases into this many parts (processes, GPUs, job-array tasks sharing the folder; nnU-Net's -num_parts).
        #[arg(long, default_value_t = 1)]
        num_parts: usize,
        /// Which part this process predicts: cases part-id, part-id + num-parts, … (nnU-Net's -part_id).
        #[arg(long, default_value_t = 0)]
        part_id: usize,
        /// For the second stage of a cascade (`--configuration 3d_cascade_fullres`): the folder of the first stage's label maps of these cases (`stu predict` with the `3d_lowres` model), nnU-Net's -prev_stage_predictions.
        #[arg(long)]
        previous_stage: Option<PathBuf>,
    },
    /// Ensemble prediction folders (nnU-Net's `nnUNetv2_ensemble`): average the probabilities `stu predict --save-probabilities` (or nnU-Net's own `--save_probabilities`) wrote, per case, and take the argmax.
    Ensemble {
        /// Prediction folders (two or more), each with `{case}.probabilities.safetensors` (or nnU-Net's `{case}.npz`) and `{case}.nii.gz` for every case of the first.
        #[arg(long, required = true, num_args = 2..)]
        pred: Vec<PathBuf>,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Also write the averaged probabilities.
        #[arg(long)]
        save_probabilities: bool,
    },
    /// Score predictions against references: per case and label Dice, IoU and counts (nnU-Net's summary.json), NSD, HD95 and ASSD on request.
    Evaluate {
        /// Reference label maps.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// Predicted label maps (same file names). Several folders (e.g. the five folds' `RUN/validation`) are scored together as one set of cases: the cross-validation summary.
        #[arg(long, required = true, num_args = 1..)]
        pred: Vec<PathBuf>,
        /// dataset.json giving the labels to score (default: every value found in the references), or its regions for a region-based dataset, and its ignore label, whose reference voxels count nowhere (nnU-Net).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Folder for summary.json and summary.csv (default: the prediction folder; needed with several).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Normalized Surface Dice tolerance in mm: one number for every label, or `label:mm,…` (e.g. `1:5,2:3`).
        #[arg(long)]
        nsd_tolerance: Option<String>,
        /// Also compute HD95 (DeepMind's area-weighted robust Hausdorff distance).
        #[arg(long)]
        hd95: bool,
        /// Also compute ASSD (average symmetric surface distance, surfels weighted by area; MONAI's and DeepMind's surface metrics).
        #[arg(long)]
        assd: bool,
        /// Direct inference: remap the references with this label map (built-in name or TOML) and score its labels.
        #[arg(long, conflicts_with = "labels")]
        label_map: Option<String>,
        /// The labels to score without a dataset.json, e.g. `1,2,3` (nnUNetv2_evaluate_simple's -l).
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["labels", "label_map"])]
        label_list: Option<Vec<u16>>,
        /// Reference voxels with this value count nowhere (nnUNetv2_evaluate_simple's -il; with --labels, dataset.json's ignore label).
        #[arg(long, conflicts_with = "labels")]
        ignore_label: Option<u16>,
    },
    /// Compare trained models on their cross-validation, singly and ensembled in pairs, pick the best, determine its post-processing and write how to predict with it (nnU-Net's `nnUNetv2_find_best_configuration`).
    FindBestConfig {
        /// Reference label maps (the raw `labelsTr`).
        #[arg(long = "ref")]
        reference: PathBuf,
        /// The raw dataset.json: labels or regions, ignore label.
        #[arg(long)]
        labels: PathBuf,
        /// A candidate: `NAME=RUN,RUN,…`, its training run folders one per fold, with their validation predictions (or a folder holding them as `fold_K`), e.g. `--model b=runs/b/fold0,runs/b/fold1`; repeat for each candidate.
        #[arg(long = "model", required = true, value_name = "NAME=RUN[,RUN…]")]
        model: Vec<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Score the candidates alone, not their pairs' ensembles.
        #[arg(long)]
        disable_ensembling: bool,
    },
    /// nnU-Net's post-processing: decide on cross-validation predictions whether keeping the largest component (of the foreground, then of each label) raises Dice, and apply the decision.
    #[command(subcommand)]
    Postprocess(PostprocessCommand),
    /// Experiment specs.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Run every sweep point of a study spec (data, plan, preprocess, train, predict, evaluate); resumable.
    Run {
        /// The spec (TOML).
        spec: PathBuf,
        /// Overrides, `key=value` (value parsed as TOML), applied after the file and STU_* variables.
        #[arg(long = "set")]
        set: Vec<String>,
        /// Apply the spec's `[paper_scale]` overrides.
        #[arg(long)]
        paper_scale: bool,
        /// Study folder (default: runs/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the point with this index (0-based; a Slurm array task's `$SLURM_ARRAY_TASK_ID`).
        #[arg(long)]
        point: Option<usize>,
        /// Only prepare the data every point needs (before a job array), then stop.
        #[arg(long)]
        data_only: bool,
        /// Print the number of points and exit.
        #[arg(long)]
        count: bool,
    },
    /// Train a model on a preprocessed dataset and fold with nnU-Net's recipe (resumable).
    Train(Box<TrainArgs>),
    /// Save a checkpoint's weights as safetensors with unchanged state-dict keys.
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Write a freshly initialised model (seeded, each parameter drawn as the model's reference implementation initialises it, as `stu train` starts from) as safetensors with its state-dict keys: for smoke tests and for timing prediction without a trained model.
    Init {
        /// Model registry name.
        #[arg(long, default_value = "stunet")]
        model: String,
        /// The model's size options as JSON (`stu zoo`; e.g. `{"preset": "stunet-s"}`).
        #[arg(long, default_value = "{\"preset\": \"stunet-b\"}")]
        options: String,
        /// Input channels.
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Output classes, background included (105: TotalSegmentator's 104 and background).
        #[arg(long)]
        classes: usize,
        /// Strides, one per downsampling (default 2,2,2 five times: the released plan's).
        #[arg(long, value_parser = parse_strides)]
        strides: Option<StrideList>,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack a trained model (the `stu train` run folders of its folds) into one zip to share (nnUNetv2_export_model_to_zip).
    ExportModel {
        /// Run folders, one per fold (same plan and labels).
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// Zip file to write.
        #[arg(long)]
        out: PathBuf,
        /// Which checkpoint: final or best.
        #[arg(long, default_value = "final")]
        checkpoint: String,
    },
    /// Run nnU-Net's final validation of a finished training again (nnUNetv2_train's `--val`,
    /// `--val_best`, `--npz`): the fold's validation cases predicted from their raw images with
    /// mirroring TTA into `RUN/validation/`, scored into its `summary.json`. Predictions of
    /// another checkpoint are replaced; an interrupted run resumes. Fold `all` is scored on its
    /// training cases, as nnU-Net does (after training, its validation is skipped).
    Validate {
        /// The run folder (`stu train --out`).
        run: PathBuf,
        /// Which checkpoint: final or best.
        #[arg(long, default_value = "final", value_parser = ["final", "best"])]
        checkpoint: String,
        /// Also write each case's softmax probabilities (`{case}.probabilities.safetensors`).
        #[arg(long)]
        probabilities: bool,
        /// The probabilities as nnU-Net writes them (`{case}.npz` and `{case}.pkl`; implies --probabilities).
        #[arg(long)]
        npz: bool,
        /// Compute backend (default: the training's).
        #[arg(long)]
        backend: Option<Backend>,
        /// Arithmetic (default: the training's).
        #[arg(long)]
        precision: Option<Precision>,
    },
    /// Unpack a model zip (from `stu export-model`) into a folder whose fold_K folders predict as run folders (nnUNetv2_install_pretrained_model_from_zip).
    InstallModel {
        /// The zip file.
        zip: PathBuf,
        /// Folder to create.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Preprocessed folder (`stu preprocess` output: cases, dataset.json, plans.json, splits_final.json).
    preprocessed: PathBuf,
    /// Run folder (train.json, log.jsonl, progress.png, checkpoints).
    #[arg(long)]
    out: PathBuf,
    /// Fold of splits_final.json, or `all`.
    #[arg(long, default_value = "0")]
    fold: String,
    /// Plans configuration.
    #[arg(long, default_value = "3d_fullres")]
    configuration: String,
    /// For the second stage of a cascade (`--configuration 3d_cascade_fullres`): the first stage's (`3d_lowres`) run folders, whose final validations wrote their segmentations of the training cases (all five folds, or fold `all`); repeatable.
    #[arg(long, num_args = 1..)]
    previous_stage: Vec<PathBuf>,
    /// Model registry name (default: `nnunet-resenc` for a plan of nnU-Net's ResEnc planners,
    /// `stu plan --preset resenc-*`, else `stunet`).
    #[arg(long)]
    model: Option<String>,
    /// Size preset (e.g. stunet-s, stunet-b).
    #[arg(long, conflicts_with_all = ["blocks", "base_width", "model_options"])]
    preset: Option<String>,
    /// Blocks per stage (scaling rule).
    #[arg(long, conflicts_with = "model_options")]
    blocks: Option<usize>,
    /// Stage-0 width (scaling rule: widths base·[1,2,4,8,16,16]).
    #[arg(long, conflicts_with = "model_options")]
    base_width: Option<usize>,
    /// Model size options as JSON (e.g. '{"depth":[1,1,1,1,1,1],"dims":[8,16,32,64,128,128]}').
    #[arg(long)]
    model_options: Option<String>,
    /// Epochs.
    #[arg(long, default_value_t = 1000)]
    epochs: usize,
    /// Training iterations per epoch.
    #[arg(long, default_value_t = 250)]
    iterations: usize,
    /// Validation iterations per epoch.
    #[arg(long, default_value_t = 50)]
    val_iterations: usize,
    /// Write checkpoint_latest every N epochs.
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Batch size (default: the plan's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Patch size `D,H,W` (default: the plan's).
    #[arg(long, value_parser = parse_patch)]
    patch_size: Option<Patch>,
    /// Initial learning rate (default 1e-2, or 1e-3 with --init-from).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of the initial weights and of every batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fine-tune from a checkpoint (nnU-Net v1 .model, v2 .pth, ours): all but the heads transfer.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Turn augmentation off.
    #[arg(long)]
    no_augmentation: bool,
    /// Loss, as nnU-Net's trainer variants: `dice_ce` (nnUNetTrainer), `ce`
    /// (nnUNetTrainerCELoss), `dice` (nnUNetTrainerDiceLoss), `topk10` (nnUNetTrainerTopk10Loss:
    /// the 10 % hardest voxels' cross-entropy), `dice_topk10` (nnUNetTrainerDiceTopK10Loss),
    /// `dice_ce_nosmooth` (nnUNetTrainerDiceCELoss_noSmooth), `topk10_ls01`
    /// (nnUNetTrainerTopk10LossLS01: label smoothing 0.1).
    #[arg(long, default_value = "dice_ce", value_parser = stu_engine::loss::LossKind::parse)]
    loss: stu_engine::loss::LossKind,
    /// Train the full-resolution output only (nnUNetTrainerNoDeepSupervision).
    #[arg(long)]
    no_deep_supervision: bool,
    /// Optimiser: `sgd` (Nesterov, momentum 0.99; nnUNetTrainer), `adamw` (AMSGrad;
    /// nnUNetTrainerAdam) or `adam` (nnUNetTrainerVanillaAdam); weight decay 3e-5 each.
    #[arg(long, default_value = "sgd", value_parser = stu_engine::train::OptimizerKind::parse)]
    optimizer: stu_engine::train::OptimizerKind,
    /// Learning-rate schedule per epoch: `poly` (nnUNetTrainer), `cosine`
    /// (nnUNetTrainerCosAnneal) or `warmup` (50 epochs linear, then poly; nnUNetTrainer_warmup).
    #[arg(long, default_value = "poly", value_parser = stu_engine::schedule::LrSchedule::parse)]
    lr_schedule: stu_engine::schedule::LrSchedule,
    /// No mirroring, in training's augmentation nor as the checkpoints' test-time augmentation
    /// (nnUNetTrainerNoMirroring; the same as `--mirror-axes none`).
    #[arg(long, conflicts_with = "mirror_axes")]
    no_mirroring: bool,
    /// The axes mirrored in training and at test time, nnU-Net's numbering of the
    /// configuration's spatial axes (`0,1`: nnUNetTrainer_onlyMirror01, `0` in 2-D; `none`);
    /// default all.
    #[arg(long, value_parser = parse_axes)]
    mirror_axes: Option<Axes>,
    /// Fraction of training samples forced to contain foreground (nnU-Net's
    /// oversample_foreground_percent, default 0.33).
    #[arg(long)]
    oversample_foreground: Option<f64>,
    /// Force foreground per sample at random with that probability, not in the last samples of
    /// each batch (nnUNetTrainer_probabilisticOversampling; without --oversample-foreground the
    /// probability is the share the default rule gives the batch size, ½ for a batch of 2).
    #[arg(long)]
    probabilistic_oversampling: bool,
    /// How augmentation's rotation and scaling resample the label maps: `linear` per label
    /// (nnUNetTrainer) or `nearest` (nnUNetTrainer_DASegOrd0).
    #[arg(long, default_value = "linear", value_parser = stu_data::augment::SegInterpolation::parse)]
    seg_interpolation: stu_data::augment::SegInterpolation,
    /// Augment anisotropic 3-D patches in 3-D, not in plane as nnU-Net's dummy 2-D mode does
    /// (nnUNetTrainer_noDummy2DDA).
    #[arg(long)]
    no_dummy_2d: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Loader threads (batches stay the same for any number).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Fraction of the fold's training cases to use (data-fraction study).
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Compute backend.
    #[arg(long, default_value = "flex")]
    backend: Backend,
    /// Arithmetic: f32, or bf16/f16 over f32 master weights (needs `--backend tch` or `tch-cuda`; f16 scales the loss dynamically, as PyTorch's `GradScaler`).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Data-parallel processes on this machine, each with its share of every batch (and its
    /// own GPU with a GPU backend). Under torchrun or srun leave it out: their environment
    /// (RANK, WORLD_SIZE, MASTER_ADDR, …) starts each rank.
    #[arg(long, default_value_t = 1, value_parser = parse_nproc)]
    nproc: usize,
    /// Skip nnU-Net's final validation: predicting the fold's validation cases from their raw
    /// images with the final checkpoint (mirroring TTA) into `RUN/validation/`, scored into its
    /// `summary.json`. (`--resume` on a finished run does what is missing of it.)
    #[arg(long)]
    no_final_validation: bool,
    /// Also write the validation cases' softmax probabilities (`{case}.probabilities.safetensors`, nnU-Net's `--npz`), for `stu ensemble` of two trainings' validations.
    #[arg(long, conflicts_with = "no_final_validation")]
    validation_probabilities: bool,
    /// The validation probabilities as nnU-Net writes them (`{case}.npz` and `{case}.pkl`, which Python nnU-Net's ensembling reads; implies --validation-probabilities).
    #[arg(long, conflicts_with = "no_final_validation")]
    npz: bool,
}

/// The final validation of the run in `run`, with a progress bar, reported on stderr.
fn validate_run(run: &std::path::Path, req: &crate::validation::Request) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template("validation {prefix} [{elapsed_precise}] {bar:30} {pos}/{len} tiles").expect("valid template"));
    let outcome = crate::validation::final_validation(run, req, &|id, done, total| {
        bar.set_prefix(id.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    match outcome {
        crate::validation::Outcome::Done(v) => eprintln!(
            "final validation: {} case(s) ({} predicted now{}) with {}, foreground mean Dice {}; {}",
            v.cases,
            v.predicted,
            if v.removed > 0 { format!(", {} of another checkpoint replaced", v.removed) } else { String::new() },
            v.checkpoint,
            v.foreground_dice.map_or("-".into(), |d| format!("{d:.4}")),
            v.dir.join("summary.json").display()
        ),
        crate::validation::Outcome::Skipped(why) => eprintln!("final validation skipped: {why}"),
    }
    Ok(())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: expected `on` or `off`")),
    }
}

fn parse_nproc(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of processes (1 or more)")),
    }
}

#[derive(Clone)]
struct Axes(Vec<usize>);

fn parse_axes(s: &str) -> Result<Axes, String> {
    if s == "none" || s.is_empty() {
        return Ok(Axes(Vec::new()));
    }
    s.split(',').map(|x| x.trim().parse::<usize>().map_err(|_| format!("`{x}` is not an axis (0, 1, 2), in `{s}`"))).collect::<Result<_, _>>().map(Axes)
}

#[derive(Clone)]
struct Patch([usize; 3]);

fn parse_patch(s: &str) -> Result<Patch, String> {
    let v: Vec<usize> = s.split(',').map(|x| x.trim().parse().map_err(|_| format!("`{x}` is not a positive integer"))).collect::<Result<_, _>>()?;
    match v.as_slice() {
        [a, b, c] if *a > 0 && *b > 0 && *c > 0 => Ok(Patch([*a, *b, *c])),
        _ => Err(format!("patch `{s}` must be three positive integers D,H,W")),
    }
}

impl TrainArgs {
    fn request(mut self) -> Result<crate::train::TrainRequest> {
        let model = match self.model.take() {
            Some(m) => m,
            None if self.preset.is_none() && crate::train::plan_network(&self.preprocessed, &self.configuration).is_some_and(|n| n.ends_with("ResidualEncoderUNet")) => "nnunet-resenc".to_string(),
            // STU-Net is 3-D; nnU-Net's `2d` trains its PlainConvUNet.
            None if self.preset.is_none() && crate::train::plan_is_2d(&self.preprocessed, &self.configuration) => "nnunet-plainconv".to_string(),
            None => "stunet".to_string(),
        };
        let model_options = match (self.preset, self.blocks, self.base_width, self.model_options) {
            (Some(p), ..) => serde_json::json!({ "preset": p }),
            (None, _, _, Some(j)) => serde_json::from_str(&j).context("--model-options is not valid JSON")?,
            (None, None, None, None) if model == "stunet" => serde_json::json!({ "preset": "stunet-b" }),
            (None, None, None, None) => serde_json::Value::Null,
            (None, b, w, None) => {
                let mut m = serde_json::Map::new();
                if let Some(b) = b {
                    m.insert("blocks".into(), b.into());
                }
                if let Some(w) = w {
                    m.insert("base_width".into(), w.into());
                }
                serde_json::Value::Object(m)
            }
        };
        Ok(crate::train::TrainRequest {
            preprocessed: self.preprocessed,
            configuration: self.configuration,
            fold: self.fold,
            out: self.out,
            model,
            model_options,
            epochs: self.epochs,
            iterations: self.iterations,
            val_iterations: self.val_iterations,
            save_every: self.save_every,
            batch_size: self.batch_size,
            patch_size: self.patch_size.map(|p| p.0),
            lr: self.lr,
            seed: self.seed,
            init_from: self.init_from,
            augmentation: !self.no_augmentation,
            resume: self.resume,
            workers: self.workers,
            backend: self.backend,
            fraction: self.fraction,
            precision: self.precision,
            previous_stage: self.previous_stage,
            recipe: crate::train::Recipe {
                loss: self.loss,
                deep_supervision: !self.no_deep_supervision,
                optimizer: self.optimizer,
                lr_schedule: self.lr_schedule,
                mirror_axes: if self.no_mirroring { Some(Vec::new()) } else { self.mirror_axes.map(|a| a.0) },
                oversample_foreground: self.oversample_foreground,
                probabilistic_oversampling: self.probabilistic_oversampling,
                seg_interpolation: self.seg_interpolation,
                dummy_2d_augmentation: !self.no_dummy_2d,
            },
        })
    }
}

/// Progress bar per epoch: iterations, loss, pseudo Dice, ETA.
struct TrainBar {
    bar: indicatif::ProgressBar,
    losses: std::sync::Mutex<(f64, usize)>,
}

impl crate::train::Progress for TrainBar {
    fn epoch_start(&self, epoch: usize, epochs: usize, iterations: usize) {
        self.bar.reset();
        self.bar.set_length(iterations as u64);
        self.bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
        *self.losses.lock().expect("lock") = (0.0, 0);
    }
    fn step(&self, loss: f64) {
        let mut l = self.losses.lock().expect("lock");
        l.0 += loss;
        l.1 += 1;
        self.bar.set_message(format!("loss {:.4}", l.0 / l.1 as f64));
        self.bar.inc(1);
    }
    fn epoch_end(&self, log: &crate::train::EpochLog) {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        self.bar.println(format!(
            "epoch {:>4}  lr {:.2e}  train {:.4}  val {}  pseudo Dice {}  EMA {}  {:.1} s ({:.2} it/s, waited {:.1} s for data)",
            log.epoch, log.lr, log.train_loss, f(log.val_loss), f(log.mean_fg_dice), f(log.ema_fg_dice), log.epoch_seconds, log.iterations_per_second, log.data_wait_seconds
        ));
    }
}

#[derive(Subcommand)]
enum PostprocessCommand {
    /// Determine it (nnU-Net's `determine_postprocessing`): writes OUT/postprocessing.json and the post-processed maps with their summary.json in OUT/postprocessed/.
    Determine {
        /// Reference label maps.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// Predicted label maps: one folder or several (the folds' `RUN/validation`).
        #[arg(long, required = true, num_args = 1..)]
        pred: Vec<PathBuf>,
        /// dataset.json: the labels (in its order) and its ignore label.
        #[arg(long)]
        labels: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Apply a postprocessing.json to a folder of label maps.
    Apply {
        /// postprocessing.json (`stu postprocess determine`).
        #[arg(long)]
        pp: PathBuf,
        /// Label maps to post-process.
        #[arg(short, long)]
        input: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum SpecCommand {
    /// Validate a spec (keys, values, every sweep point) without running it.
    Check {
        /// The spec (TOML).
        spec: PathBuf,
        /// Overrides, `key=value`.
        #[arg(long = "set")]
        set: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// List the registered dataset plugins.
    List,
    /// Materialise a dataset plugin in nnU-Net raw layout (e.g. `totalsegmentator`, `phantom`).
    Prepare {
        /// Plugin name.
        plugin: String,
        /// Output dataset folder.
        #[arg(long)]
        out: PathBuf,
        /// The plugin's options as JSON, e.g. '{"path": "/data/Totalsegmentator_dataset", "group": "ribs"}'.
        #[arg(long, default_value = "{}")]
        options: String,
    },
    /// Convert a Medical Segmentation Decathlon task (4-D images) or an nnU-Net v1 task into nnU-Net v2's raw layout (nnUNetv2_convert_MSD_dataset / _convert_old_nnUNet_dataset).
    Convert {
        /// The task folder (dataset.json with `modality` and labels as id → name, imagesTr, labelsTr, imagesTs).
        src: PathBuf,
        /// The v2 dataset folder to create (e.g. Dataset009_Spleen); must not exist or be empty.
        #[arg(long)]
        out: PathBuf,
    },
    /// Overlay PNGs for visual checks (nnUNetv2_plot_overlay_pngs): each case's image with its labels on the axial slice that shows most of them.
    Overlay {
        /// The dataset folder (dataset.json, imagesTr, labelsTr).
        dir: PathBuf,
        /// Folder for `{case}.png`.
        #[arg(long)]
        out: PathBuf,
        /// Label maps to draw instead of labelsTr, e.g. a prediction folder (`{case}.nii.gz`).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Image channel to draw.
        #[arg(long, default_value_t = 0)]
        channel: usize,
    },
    /// Integrity check (files, geometry, label values, channels, NaN): exits non-zero on problems.
    Check {
        /// The dataset folder (with dataset.json, imagesTr, labelsTr).
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint: nnU-Net v1 `.model`, v2 `.pth`, PyTorch state dict or safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Model registry name (default: recognised from the keys).
    #[arg(long)]
    model: Option<String>,
    /// Strides, one per downsampling: `1,2,2:2,2,2:2,2,2:1,2,2:1,1,1` (default 2,2,2 for each).
    #[arg(long, value_parser = parse_strides, conflicts_with = "plans")]
    strides: Option<StrideList>,
    /// nnU-Net v2 plans.json to take the strides from.
    #[arg(long)]
    plans: Option<PathBuf>,
    /// Configuration inside the plans.
    #[arg(long, default_value = "3d_fullres")]
    configuration: String,
    /// Compute backend (compiled in: see `stu --version`).
    #[arg(long, default_value = "flex")]
    backend: Backend,
}

/// A whole stride list as one argument (clap would read `Vec` as repeated values).
#[derive(Clone)]
struct StrideList(Vec<[usize; 3]>);

fn parse_strides(s: &str) -> Result<StrideList, String> {
    stu_core::strides::parse(s).map(StrideList)
}

impl ModelArgs {
    fn source(self) -> ModelSource {
        let strides = match (self.strides, self.plans) {
            (Some(s), _) => StrideSource::Explicit(s.0),
            (None, Some(p)) => StrideSource::Plans(p, self.configuration),
            (None, None) => StrideSource::Default,
        };
        ModelSource { checkpoint: self.checkpoint, model: self.model, strides, backend: self.backend }
    }
}

/// Pretty JSON. A NaN statistic (a channel without foreground) is `null`: serde_json maps
/// non-finite floats to null, so the file stays strict JSON.
pub(crate) fn nan_safe_json(v: &serde_json::Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

/// Writes `value` to `path` atomically, creating its folder.
fn write_json_file(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create folder", parent.display()))?;
    }
    stu_engine::checkpoint::write_atomic(path, nan_safe_json(value)?.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

fn fmt_s(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Quickstart { out, cases, seed, data_only } => {
            let bar = indicatif::ProgressBar::new(cases as u64).with_style(
                indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} cases {msg}").expect("valid template"),
            );
            bar.set_prefix("preprocess");
            let s = crate::quickstart::run(&out, cases, seed, &|id| {
                bar.set_message(id.to_string());
                bar.inc(1);
            })?;
            bar.finish_and_clear();
            println!("dataset      {} ({} training + 4 held-out phantom cases; `stu dataset check` passes)", s.dataset.display(), s.cases);
            println!("plan         {} → spacing {} patch {} batch {} strides {}", s.plans.display(), s.plan["spacing"], s.plan["patch_size"], s.plan["batch_size"], s.plan["pool_op_kernel_sizes"]);
            println!("preprocessed {}", s.preprocessed.display());
            println!("timings      {}", s.seconds.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect::<Vec<_>>().join(", "));
            println!();
            print!("{}", crate::zoo_table(&crate::zoo_rows()));
            if !data_only {
                println!("\nThe scaling study of experiments/quickstart.toml (train, predict, evaluate per width; minutes):");
                let s = crate::quickstart::study(&out.join("study"), cases, seed)?;
                print!("{s}");
            }
        }
        Command::Zoo { json } => {
            let rows = crate::zoo_rows();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", crate::zoo_table(&rows));
            }
        }
        Command::Inspect(m) => println!("{}", serde_json::to_string_pretty(&forward::inspect(&m.source())?)?),
        Command::Forward { model, input, input_key, output, precision } => {
            let outs = forward::forward(&ForwardOptions { model: model.source(), input, input_key, output: output.clone(), precision })?;
            for o in &outs {
                eprintln!("{}: {:?}", o.name, o.shape);
            }
            eprintln!("wrote {}", output.display());
        }
        Command::Dataset(DatasetCommand::Convert { src, out }) => {
            let done = stu_data::convert::convert(&src, &out)?;
            println!("converted a {}: {} training case(s), {} test case(s) into {}; check it with `stu dataset check {}`", done.layout, done.training, done.test, out.display(), out.display());
        }
        Command::Dataset(DatasetCommand::Overlay { dir, out, labels, channel }) => {
            let json = stu_data::dataset::DatasetJson::read(&dir.join("dataset.json"))?;
            anyhow::ensure!(channel < json.channel_names.len(), "--channel {channel}: {} has {} channel(s)", dir.join("dataset.json").display(), json.channel_names.len());
            let (cases, _) = stu_data::dataset::discover(&dir, &json)?;
            let labels = labels.unwrap_or_else(|| dir.join("labelsTr"));
            std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
            let mut written = 0;
            for case in &cases {
                let label = labels.join(format!("{}{}", case.id, json.file_ending));
                let Some(image) = case.images[channel].as_ref().filter(|_| label.exists()) else { continue };
                let img = stu_data::nifti_io::read_image(image)?;
                let seg = stu_data::nifti_io::read_label(&label)?;
                anyhow::ensure!(img.geom.shape == seg.geom.shape, "{}: shape {:?}, its image {} has {:?}", label.display(), seg.geom.shape, image.display(), img.geom.shape);
                let (_, rgb, w, h) = stu_report::overlay::overlay_volume(&img.data, &seg.data, img.geom.shape);
                stu_report::overlay::write_png(&out.join(format!("{}.png", case.id)), &rgb, w, h)?;
                written += 1;
            }
            anyhow::ensure!(written > 0, "no case of {} has a label map in {}", dir.display(), labels.display());
            println!("wrote {written} overlay(s) to {}", out.display());
        }
        Command::Dataset(DatasetCommand::List) => {
            for e in stu_data::plugins::registry().iter() {
                println!("{:<18} {}", e.name, e.summary);
            }
        }
        Command::Dataset(DatasetCommand::Prepare { plugin, out, options }) => {
            let entry = stu_data::plugins::registry().get(&plugin)?;
            let options: serde_json::Value = serde_json::from_str(&options).context("--options is not valid JSON")?;
            let root = (entry.prepare)(&options, &out)?;
            eprintln!("dataset `{plugin}` ready at {}", root.display());
        }
        Command::Dataset(DatasetCommand::Check { dir, json }) => {
            let report = stu_data::check::check(&dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            anyhow::ensure!(report.ok(), "{}: {} problem(s) found", dir.display(), report.problems.len());
        }
        Command::Phantom { out, cases, test_cases, seed } => {
            anyhow::ensure!(cases >= 1, "--cases must be at least 1");
            stu_data::phantom::write_dataset(&stu_data::phantom::PhantomOptions { out: out.clone(), cases, test_cases, seed, group: None, stunet_ids: false })?;
            eprintln!("wrote {} training and {} held-out cases to {}", cases, test_cases, out.display());
        }
        Command::Fingerprint { dir, out } => {
            let json = stu_data::dataset::DatasetJson::read(&dir.join("dataset.json"))?;
            let fp = stu_data::fingerprint::fingerprint(&dir, &json)?;
            write_json_file(&out, &serde_json::to_value(&fp)?)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Plan { dir, out, preset, gpu_memory_gb } => {
            use stu_data::plan::{Preset, plans_json};
            let json = stu_data::dataset::DatasetJson::read(&dir.join("dataset.json"))?;
            let fp = stu_data::fingerprint::fingerprint(&dir, &json)?;
            let name = dir.canonicalize().unwrap_or(dir.clone()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let preset = Preset::parse(&preset).expect("clap checked the name");
            let plans = plans_json(&name, &json, &fp, preset, gpu_memory_gb);
            let fp_path = out.with_file_name("dataset_fingerprint.json");
            write_json_file(&fp_path, &serde_json::to_value(&fp)?)?;
            write_json_file(&out, &plans)?;
            for name in ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"] {
                let Some(c) = plans["configurations"].get(name) else { continue };
                match c.get("inherits_from").and_then(|p| p.as_str()) {
                    Some(parent) => eprintln!("{name}: {parent}'s plan, after {}", c["previous_stage"].as_str().unwrap_or("?")),
                    None => eprintln!("{name}: spacing {} patch {} batch {} strides {}", c["spacing"], c["patch_size"], c["batch_size"], c["pool_op_kernel_sizes"]),
                }
            }
            eprintln!("wrote {} and {}", out.display(), fp_path.display());
        }
        Command::BenchData { out, long } => {
            let d = stu_data::synthetic_ct::write(&out)?;
            println!("{}", d.display());
            if long {
                println!("{}", stu_data::synthetic_ct::write_long(&out)?.display());
            }
        }
        Command::Preprocess { dir, plans, configuration, out, jobs } => {
            let json = stu_data::dataset::DatasetJson::read(&dir.join("dataset.json"))?;
            let bar = indicatif::ProgressBar::new(json.num_training as u64).with_style(
                indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} cases, ETA {eta} {msg}").expect("valid template"),
            );
            bar.set_prefix("preprocess");
            let t = std::time::Instant::now();
            let (now, before) = stu_data::preprocess::preprocess_dataset(&dir, &plans, &configuration, &out, jobs, &|id| {
                bar.set_message(id.to_string());
                bar.inc(1);
            })?;
            bar.finish_and_clear();
            eprintln!("preprocessed {now} case(s) in {:.1} s ({before} already done) into {}", t.elapsed().as_secs_f64(), out.display());
        }
        Command::Bench { cases, json, backend, precision, profile, patch } => {
            let results = crate::bench::run(backend, precision, &cases, &crate::bench::Options { patch, profile }, |r| {
                if r.case.starts_with("allreduce") {
                    eprintln!("{:<16} all-reduce {:>8} s", r.case, fmt_s(r.train_s));
                } else if r.train_s.is_some() {
                    eprintln!("{:<16} train step {:>8} s", r.case, fmt_s(r.train_s));
                } else if r.case.starts_with("window") {
                    eprintln!("{:<16} sliding window {:>8} s", r.case, fmt_s(r.fwd_s));
                } else if r.fwd_bwd_s.is_none() && r.case.starts_with("infer") {
                    eprintln!("{:<16} forward {:>8} s", r.case, fmt_s(r.fwd_s));
                } else {
                    eprintln!("{:<16} fwd {:>8} s   fwd+bwd {:>8} s", r.case, fmt_s(r.fwd_s), fmt_s(r.fwd_bwd_s));
                }
            })?;
            if let Some(path) = json {
                let doc = serde_json::json!({ "backend": backend.name(), "precision": precision.name(), "threads": rayon_threads(), "results": results });
                stu_engine::checkpoint::write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
            }
        }
        Command::CheckOps { backend } => {
            let check = match backend {
                Backend::Tch | Backend::TchCuda => stu_engine::backend::check_fused_ops(backend).map_err(|e| anyhow::anyhow!("check-ops: {e}"))?,
                _ => crate::checkops::check(backend).map_err(|e| anyhow::anyhow!("check-ops: {e:#}"))?,
            };
            for l in &check.lines {
                println!("{l}");
            }
            for l in &check.failures {
                eprintln!("out of tolerance: {l}");
            }
            if !check.failures.is_empty() {
                anyhow::bail!("check-ops: {} of {} comparisons on `{}` out of tolerance (above)", check.failures.len(), check.lines.len(), backend.name());
            }
            eprintln!("check-ops: {} comparisons on `{}` within tolerance", check.lines.len(), backend.name());
        }
        Command::Predict { input, output, checkpoints, chk, model, plans, configuration, disable_tta, step, keep_largest, postprocessing, label_map, save_probabilities, npz, fast_export, overlap, backend, precision, continue_prediction, num_parts, part_id, previous_stage } => {
            let part = (num_parts != 1 || part_id != 0).then_some((part_id, num_parts));
            let previous_stage = previous_stage.map(crate::predict::Previous::Files);
            let opts = crate::predict::PredictOptions { input, output: output.clone(), checkpoints, best: chk == "best", model, plans, configuration, disable_tta, step, keep_largest, postprocessing, label_map, save_probabilities: save_probabilities || npz, npz, fast_export, overlap, backend, precision, continue_prediction, part, previous_stage };
            let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} tiles {msg}").expect("valid template"));
            let results = crate::predict::predict(&opts, &|id, done, total| {
                bar.set_prefix(id.to_string());
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            let failed: Vec<&crate::predict::CaseResult> = results.iter().filter(|r| r.output.is_err()).collect();
            let skipped = results.iter().filter(|r| r.skipped).count();
            if skipped > 0 {
                eprintln!("{skipped} case(s) already predicted in {}, left as they are (--continue-prediction)", output.display());
            }
            for r in results.iter().filter(|r| !r.skipped) {
                match &r.output {
                    Ok(p) => {
                        let phases: Vec<String> = r.phases.iter().map(|(name, s)| format!("{name} {s:.1}")).collect();
                        eprintln!("{}: {} ({:.1} s: {})", r.id, p.display(), r.seconds, phases.join(", "))
                    }
                    Err(e) => eprintln!("{}: FAILED: {e}", r.id),
                }
            }
            anyhow::ensure!(failed.is_empty(), "{} of {} case(s) failed; the others are in {}", failed.len(), results.len(), output.display());
        }
        Command::Evaluate { reference, pred, labels, out, nsd_tolerance, hd95, assd, label_map, label_list, ignore_label } => {
            let dir = match (out, pred.as_slice()) {
                (Some(d), _) => d,
                (None, [one]) => one.clone(),
                (None, _) => anyhow::bail!("--out: where to write the summary of {} prediction folders", pred.len()),
            };
            let mut surface = stu_data::metrics::EvalOptions { hd95, assd, ignore_label, ..Default::default() };
            if let Some(t) = nsd_tolerance {
                if let Ok(v) = t.trim().parse::<f64>() {
                    surface.nsd_default = Some(v);
                } else {
                    for part in t.split(',') {
                        let (l, mm) = part.split_once(':').with_context(|| format!("--nsd-tolerance `{part}`: expected `label:mm`"))?;
                        let l: u16 = l.trim().parse().with_context(|| format!("--nsd-tolerance `{part}`: label `{l}` is not an integer"))?;
                        let mm: f64 = mm.trim().parse().with_context(|| format!("--nsd-tolerance `{part}`: `{mm}` is not a number of mm"))?;
                        surface.nsd_tolerance.insert(l, mm);
                    }
                }
                for mm in surface.nsd_default.iter().chain(surface.nsd_tolerance.values()) {
                    anyhow::ensure!(mm.is_finite() && *mm >= 0.0, "--nsd-tolerance `{t}`: {mm} mm is not a tolerance (a finite number ≥ 0)");
                }
            }
            let map = label_map.as_deref().map(crate::labelmap::LabelMap::load).transpose()?;
            if let Some(m) = &map {
                surface.reference_map = Some(m.reference_table());
            }
            use stu_data::metrics::Scored;
            let labels: Vec<Scored> = match (labels, &map) {
                _ if label_list.is_some() => {
                    let l = label_list.unwrap_or_default();
                    anyhow::ensure!(!l.is_empty() && !l.contains(&0), "--label-list: foreground labels (not 0), e.g. 1,2,3");
                    anyhow::ensure!(ignore_label.is_none_or(|ig| !l.contains(&ig)), "--label-list: the ignore label is not scored");
                    Scored::of_labels(&l)
                }
                (_, Some(m)) => Scored::of_labels(&m.labels.iter().map(|l| l.value).collect::<Vec<_>>()),
                (Some(p), None) => {
                    // A region-based dataset is scored per region, as nnU-Net does.
                    let json = stu_data::dataset::DatasetJson::read(&p)?;
                    surface.ignore_label = json.ignore_label.map(|v| v as u16);
                    Scored::of_dataset(&json)
                }
                (None, None) => {
                    let mut seen = std::collections::BTreeSet::new();
                    for e in std::fs::read_dir(&reference).with_context(|| format!("{}: cannot list", reference.display()))? {
                        let p = e?.path();
                        if stu_data::nifti_io::case_of(&p).is_some() {
                            seen.extend(stu_data::nifti_io::read_label(&p)?.data.into_iter().filter(|&v| v > 0 && Some(v) != ignore_label));
                        }
                    }
                    Scored::of_labels(&seen.into_iter().collect::<Vec<_>>())
                }
            };
            let s = stu_data::metrics::evaluate_scored(&reference, &pred, &labels, &surface)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            stu_engine::checkpoint::write_atomic(&dir.join("summary.json"), nan_safe_json(&serde_json::to_value(&s)?)?.as_bytes())?;
            let mut csv = String::from("case,label,metric,value\n");
            for c in &s.metric_per_case {
                let id = stu_data::nifti_io::case_of(&c.prediction_file).map(|(id, _)| id).unwrap_or_default();
                for (l, m) in &c.metrics {
                    for (k, v) in m {
                        csv.push_str(&format!("{id},{l},{k},{}\n", if v.is_nan() { String::new() } else { v.to_string() }));
                    }
                }
            }
            stu_engine::checkpoint::write_atomic(&dir.join("summary.csv"), csv.as_bytes())?;
            println!("foreground mean Dice {:.4} over {} case(s), {} label(s) or region(s); wrote {}", s.foreground_mean.get("Dice").copied().unwrap_or(f64::NAN), s.metric_per_case.len(), labels.len(), dir.join("summary.json").display());
        }
        Command::Postprocess(PostprocessCommand::Determine { reference, pred, labels, out }) => {
            let json = stu_data::dataset::DatasetJson::read(&labels)?;
            let scored = stu_data::metrics::Scored::of_dataset(&json);
            let pp = crate::postprocess::determine(&reference, &pred, &scored, json.regions.is_some(), json.ignore_label.map(|v| v as u16), &out)?;
            println!(
                "keep the largest foreground component: {}; per label or region: {}; foreground mean Dice {:.4} → {:.4}; wrote {}",
                if pp.largest_foreground { "yes" } else { "no" },
                if pp.largest_per_label.is_empty() && pp.largest_per_region.is_empty() { "none".to_string() } else { pp.largest_per_label.iter().map(u16::to_string).chain(pp.largest_per_region.iter().map(|r| format!("{r:?}"))).collect::<Vec<_>>().join(", ") },
                pp.dice_before,
                pp.dice_after,
                out.join("postprocessing.json").display()
            );
        }
        Command::FindBestConfig { reference, labels, model, out, disable_ensembling } => {
            let candidates = model
                .iter()
                .map(|m| {
                    let (name, runs) = m.split_once('=').with_context(|| format!("--model `{m}`: expected NAME=RUN[,RUN…]"))?;
                    let runs: Vec<PathBuf> = runs.split(',').filter(|r| !r.is_empty()).map(PathBuf::from).collect();
                    anyhow::ensure!(!runs.is_empty(), "--model `{m}`: no run folders after `=`");
                    Ok(crate::best::Candidate { name: name.to_string(), runs })
                })
                .collect::<Result<Vec<_>>>()?;
            let req = crate::best::Request { reference, dataset_json: labels, candidates, out: out.clone(), ensembling: !disable_ensembling };
            let o = crate::best::find_best(&req)?;
            for e in o.candidates.iter().chain(&o.ensembles) {
                println!("{:<32} foreground mean Dice {}{}", e.name, crate::best::dice_text(e.dice), if e.name == o.best { "  ← best" } else { "" });
            }
            for s in &o.skipped {
                println!("skipped {s}");
            }
            println!("post-processing on {}: {:.4} → {:.4}; wrote {} and {}", o.best, o.postprocessing.dice_before, o.postprocessing.dice_after, out.join("best_config.json").display(), out.join("inference_instructions.txt").display());
        }
        Command::Ensemble { pred, output, save_probabilities } => {
            let ids = crate::ensemble::ensemble(&pred, &output, save_probabilities)?;
            eprintln!("ensembled {} case(s) of {} folders into {}", ids.len(), pred.len(), output.display());
        }
        Command::Postprocess(PostprocessCommand::Apply { pp, input, output }) => {
            let n = crate::postprocess::apply_folder(&crate::postprocess::Postprocessing::read(&pp)?, &input, &output)?;
            eprintln!("post-processed {n} label map(s) into {}", output.display());
        }
        Command::Spec(SpecCommand::Check { spec, set }) => print!("{}", crate::spec::check(&spec, &set)?),
        Command::Run { spec, set, paper_scale, out, point, data_only, count } => {
            let mut s = crate::spec::load(&spec, &set)?;
            if paper_scale {
                s = crate::spec::paper_scale(&s).with_context(|| spec.display().to_string())?;
            }
            if count {
                println!("{}", crate::spec::points(&s)?.len());
                return Ok(());
            }
            let root = out.unwrap_or_else(|| PathBuf::from("runs").join(&s.name));
            let select = crate::run::Select { point, data_only };
            let outcomes = crate::run::run_selected(&s, &root, select, &|m| eprintln!("{m}"))?;
            if data_only {
                eprintln!("data ready for {} point(s) under {}", outcomes.len(), root.display());
                return Ok(());
            }
            let failed = outcomes.iter().filter(|o| o.status.starts_with("failed")).count();
            eprintln!("{} point(s): {} done, {} skipped, {failed} failed; records in {}", outcomes.len(), outcomes.iter().filter(|o| o.status == "done").count(), outcomes.iter().filter(|o| o.status == "skipped").count(), root.display());
            anyhow::ensure!(failed == 0, "{failed} point(s) failed (see error.txt in their folders)");
        }
        Command::Train(args) if args.nproc > 1 => crate::train::launch_local(args.nproc)?,
        Command::Train(args) => {
            let (validate, probabilities, npz) = (!args.no_final_validation, args.validation_probabilities || args.npz, args.npz);
            let req = args.request()?;
            let changed = req.recipe.describe();
            if !changed.is_empty() && std::env::var("RANK").ok().is_none_or(|r| r == "0") {
                eprintln!("nnU-Net's recipe with: {changed}");
            }
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} it, ETA {eta} {msg}").expect("valid template"),
            );
            let s = crate::train::train(&req, &TrainBar { bar: bar.clone(), losses: std::sync::Mutex::new((0.0, 0)) })?;
            bar.finish_and_clear();
            if std::env::var("RANK").is_ok_and(|r| r != "0") {
                return Ok(()); // rank 0 reports for the group
            }
            if s.epochs_run == 0 {
                eprintln!("{}: the run was already complete", s.out.display());
            }
            eprintln!("best EMA pseudo Dice {}; checkpoints and log.jsonl in {}", s.best_ema.map_or("-".into(), |v| format!("{v:.4}")), s.out.display());
            if validate {
                let req = crate::validation::Request { probabilities, npz, ..Default::default() };
                validate_run(&s.out, &req).context("final validation (the checkpoints are written; `--resume` retries it)")?;
            }
        }
        Command::Validate { run, checkpoint, probabilities, npz, backend, precision } => {
            // (Predictor::new checks the precision against the backend.)
            let req = crate::validation::Request { best: checkpoint == "best", probabilities: probabilities || npz, npz, backend, precision, all_on_training: true };
            validate_run(&run, &req)?;
        }
        Command::ExportModel { runs, out, checkpoint } => {
            let folds = crate::modelzip::export(&runs, &checkpoint, &out)?;
            println!("packed fold(s) {} into {}", folds.join(", "), out.display());
        }
        Command::InstallModel { zip, out } => {
            let dirs = crate::modelzip::install(&zip, &out)?;
            println!("installed {} fold(s): predict with --checkpoint {}", dirs.len(), dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" "));
        }
        Command::Init { model, options, channels, classes, strides, seed, out } => {
            let options: serde_json::Value = serde_json::from_str(&options).context("--options: not JSON")?;
            let strides = strides.map_or_else(|| zoo::stunet::ISO_STRIDES.to_vec(), |s| s.0);
            let spec = stu_engine::model::NetSpec { in_channels: channels, num_classes: classes, strides, options };
            let params = forward::init(&model, &spec, seed, &out)?;
            eprintln!("wrote `{model}` ({params} parameters, seed {seed}) to {}", out.display());
        }
        Command::Export { model, output } => {
            let n = forward::export(&model.source(), &output)?;
            eprintln!("wrote {n} tensors to {}", output.display());
        }
    }
    Ok(())
}

/// Runs one `stu` command line (`args[0]` is the program name), as `main` does.
pub(crate) fn run_args(args: Vec<String>) -> Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("stu".to_string()).chain(args)).map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    run(cli)
}

/// `stu`'s clap command, whose `--version` names the backends compiled in.
fn cli_command() -> clap::Command {
    use clap::CommandFactory;
    let compiled = Backend::compiled().iter().map(|b| b.name()).collect::<Vec<_>>().join(", ");
    let long = format!("{}\nbackends compiled in: {compiled}", env!("CARGO_PKG_VERSION"));
    // clap keeps `&'static str`s (its `string` feature is off); one string per process.
    Cli::command().long_version(&*Box::leak(long.into_boxed_str()))
}

/// The process arguments parsed (clap prints help, version or usage errors and exits).
fn parse_process_args() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// Runs `stu` with the process arguments.
pub fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STU_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // nnU-Net's own command names (`stu nnUNetv2_train …`).
    let outcome = match crate::nnunet_cli::dispatch(&args) {
        Some(r) => r,
        None => run(parse_process_args()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_long_version_names_the_backends_compiled_in() {
        let v = super::cli_command().render_long_version();
        let line = v.lines().find_map(|l| l.strip_prefix("backends compiled in: ")).unwrap_or_else(|| panic!("no backends line in {v:?}"));
        let names: Vec<&str> = line.split(", ").collect();
        assert_eq!(names, stu_engine::backend::Backend::compiled().iter().map(|b| b.name()).collect::<Vec<_>>());
        #[cfg(feature = "flex")]
        assert!(names.contains(&"flex"), "{v}");
        assert!(v.starts_with(concat!("stu ", env!("CARGO_PKG_VERSION"), "\n")), "{v:?}");
    }
}
