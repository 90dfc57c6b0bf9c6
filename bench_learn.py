"""`benchmark.py learn`: does the model learn, and what each part of the design buys (trains and scores every
variant with the real scripts, several seeds)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import datalist
import dataloader
import losses
import net_CR_CrossAttention as net
import synthetic_sets

# ----------------------------------------------------------------------------------------- learning and ablations
# Does the model learn, and what does each part of the design buy? Trains every variant with the real
# scripts (train_CR_kaggle.py, then test_CR.py on the test split) in fresh subprocesses on the synthetic
# dataset, for several seeds, and reports test-split scores beside the identity baseline (cloudy input
# taken as the prediction). The base loss set is losses.LOSS_PRESETS["design_no_vgg"] (the design's minus the two
# VGG terms), or "design" when --vgg_weights is given: pretrained VGG weights cannot be had offline, and random VGG
# features measure nothing perceptual. A variant is training flags (LEARN_VARIANTS) plus, where it changes the loss
# set, overrides of the base preset's options (LEARN_LOSS_OVERRIDES).
LEARN_VARIANTS = {
    "full": [],
    # what each part added to the design document's network buys (BENCHMARKS.md, "Learning and ablations")
    "no_confidence_loss": ["--confidence_weight", "0"],
    "no_residual_loss": ["--residual_weight", "0"],
    "no_confidence_refinement": ["--no-use_confidence_refinement"],
    "no_sar_skips": ["--no-use_sar_skips"],
    "no_affine_residual": ["--no-affine_residual"],  # the default before the affine residual head
    "design": lambda: _design_flags(),  # the design document's network and losses, nothing added
    "with_date_correction": ["--use_date_correction"],
    # the design's own parts
    "no_spectral_attention": ["--no-use_spectral_attention"],
    "no_cloud_predictor": ["--no-use_cloud_predictor"],  # plain residual; the map's loss terms go with it
    "no_cloud_focused_loss": [],  # plain L1 in place of the cloud-focused L1: LEARN_LOSS_OVERRIDES
    "no_sar": ["--sar_input", "zeros"],
    # radar optional (issue 29): a share of the samples trained without radar, the network told so
    "sar_dropout": ["--sar_dropout", "0.5", "--sar_absent", "token"],
    "sar_dropout_skip": ["--sar_dropout", "0.5", "--sar_absent", "skip"],
    "sar_dropout_20": ["--sar_dropout", "0.2", "--sar_absent", "token"],
    "no_cross_attn": ["--no-use_cross_attn"],
    "fp32": ["--amp", "off"],
    "fp16": ["--amp", "fp16"],  # a T4's precision (fp16 autocast, GradScaler); on a CPU its convolutions are slow
    "DSen2CR": ["--model_name", "DSen2CR"],
    # the default with the uncertainty head, trained by each NLL (docs/uncertainty.md)
    "uncertainty_gaussian": ["--use_uncertainty_head", "--nll_distribution", "gaussian"],
    "uncertainty_laplace": ["--use_uncertainty_head", "--nll_distribution", "laplace"],
    # time series (issue 30), on --setting ts: three dates, one date (the first of those three, the target the same),
    # and the per-pixel least-cloudy-date mosaic of the three (no training: test_CR.py --baseline mosaic)
    "ts_3_dates": ["--input_t", str(3)],
    "ts_3_dates_no_date_confidence": ["--input_t", str(3), "--date_confidence_weight", "0"],  # dates unsupervised
    "ts_1_date": [],
    "ts_mosaic": [],
}
TS_VARIANTS = ("ts_3_dates", "ts_3_dates_no_date_confidence", "ts_1_date", "ts_mosaic")
TS_INPUTS = 3  # the dates the ts variants take


# Variants that train nothing: another variant's checkpoints (listed before them in --variants), scored by
# test_CR.py with extra flags; here without radar (no Sentinel-1 file read).
LEARN_RESCORED = {"full_without_sar": ("full", ["--no_sar"]),
                  "sar_dropout_without_sar": ("sar_dropout", ["--no_sar"]),
                  "sar_dropout_skip_without_sar": ("sar_dropout_skip", ["--no_sar"]),
                  "sar_dropout_20_without_sar": ("sar_dropout_20", ["--no_sar"])}


def _design_flags():
    """Every switch added since the design document at its older value, and the map's loss terms off."""
    return ([f"--{'' if on else 'no-'}{switch}" for switch, on in net.design_switches().items()]
            + [arg for t in losses.LOSS_TERMS if t.needs == "use_cloud_predictor"
               for arg in (f"--{t.name}_weight", "0")])


def learn_variant_flags(variant):
    flags = LEARN_VARIANTS[variant]
    return flags() if callable(flags) else list(flags)


LEARN_LOSS_OVERRIDES = {
    "no_cloud_focused_loss": {"use_cloud_focused_loss": False},
}


# The data settings of `learn`. 128 px: a quarter as many patches as 64 px, so a run trains on the same pixels,
# and batch 1, so a step sees the same pixels and a run takes about as many steps (96 against 112).
LEARN_SETTINGS = {"64": dict(n=80, size=64, batch_sz=4, out="runs/learn"),
                  "128": dict(n=20, size=128, batch_sz=1, out="runs/learn128"),
                  # time series of 4 dates (3 inputs and the target), split by region (make_synthetic_ts_dataset)
                  "ts": dict(n=48, size=64, batch_sz=4, out="runs/learn_ts")}
TS_DATES = TS_INPUTS + 1


def _add_learn_args(parser):
    parser.add_argument("--variants", default="full,no_confidence_loss,no_residual_loss,no_confidence_refinement,"
                        "no_sar_skips,no_affine_residual,design,no_cloud_predictor",
                        help=f"comma-separated, from: {', '.join([*LEARN_VARIANTS, *LEARN_RESCORED])}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds per variant")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs per run (the fixed budget)")
    parser.add_argument("--setting", choices=list(LEARN_SETTINGS), default="64",
                        help="data setting: '64' = 80 patches of 64 px, batch 4; '128' = 20 patches of 128 px, "
                             "batch 1 (the same pixels per run and per step, 4x the context per patch, so a "
                             "receptive-field advantage shows); 'ts' = 48 synthetic time series of 4 dates, 64 px, "
                             "batch 4, for the ts_* variants; --n, --size, --batch_sz override its values")
    parser.add_argument("--n", type=int, default=None, help="synthetic patches (split by scene into train/val/test)")
    parser.add_argument("--size", type=int, default=None, help="synthetic patch size in pixels (trained uncropped)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--batch_sz", type=int, default=None, help="training batch size")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument("--amp", default="bf16", help="precision of every variant except 'fp32'")
    parser.add_argument("--vgg_weights", default=None,
                        help="VGG weights path: adds the design's perceptual and contrastive terms")
    parser.add_argument("--out", default=None, help="folder for data, checkpoints and results "
                        "(default runs/learn, or runs/learn128 for --setting 128: run names do not hold the size)")
    parser.add_argument("--extra", default="", help="extra training flags for every variant, e.g. '--lr 1e-3'; a "
                        "single flag as --extra=--use_date_correction (argparse takes a lone '--flag' for an option)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also score each variant's seeds as one ensemble (test_CR.py with all their checkpoints)")


def _learn_loss_flags(variant, vgg_weights):
    """Training flags of a variant's loss set: the design's preset (without its two VGG terms unless vgg_weights is
    given), changed by the variant's LEARN_LOSS_OVERRIDES."""
    overrides = dict(LEARN_LOSS_OVERRIDES.get(variant, {}))
    if vgg_weights:
        overrides["vgg_weights"] = vgg_weights
    return losses.preset_flags("design" if vgg_weights else "design_no_vgg", **overrides)


def resolve_learn_setting(args):
    """args with --n, --size, --batch_sz and --out taken from --setting where not given."""
    for key, value in LEARN_SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def learn_train_flags(variant, seed, args, csv_path, out):
    """train_CR_kaggle.py's flags for one learn run. The memory layout is pinned (channels-last, the CPU default when
    the rows of BENCHMARKS.md were first measured): under bf16 it changes the arithmetic, so a run is reproducible
    only in a fixed one, and --channels_last auto's timing probe picks either where the two time alike (seed 0 of the
    default: 37.05 dB channels-last, 36.52 not). --extra may still set another."""
    return ["--data_list_filepath", str(csv_path), "--input_data_folder", str(Path(csv_path).parent),
            "--load_size", str(args.size), "--crop_size", str(args.size), "--max_epochs", str(args.epochs),
            "--batch_sz", str(args.batch_sz), "--lr", str(args.lr), "--warmup_epochs", "1", "--num_workers", "1",
            "--amp", args.amp, "--channels_last", "on", "--seed", str(seed), "--save_model_dir", str(out / "ckpt"),
            "--experiment_name", f"{variant}_s{seed}", "--train_from_scratch", "--num_quicklooks", "0",
            *_learn_loss_flags(variant, args.vgg_weights), *learn_variant_flags(variant), *args.extra.split()]


def ts_single_date_list(ts_csv):
    """A single-date list (datalist.write_data_list) beside a time series list: per series the first input date the
    3-date sampler picks (the leak-free default) as the cloudy image and that sampler's target as the cloud-free one,
    so ts_1_date sees one of the dates ts_3_dates sees and is scored on the same targets."""
    ts_csv = Path(ts_csv)
    series = datalist.read_ts_list(ts_csv)
    dataset = dataloader.SEN12MSCRTSDataset(series, ts_csv.parent, input_t=TS_INPUTS, cloud_detector="none")
    triplets = []
    for i, s in enumerate(series):
        choice, _ = dataset.date_choice(i)
        first = choice.inputs[0]
        triplets.append(datalist.Triplet(s.split, s.s1[first], s.s2[choice.target], s.s2[first]))
    return datalist.write_data_list(ts_csv.with_name("single_date.csv"), triplets)


def _learn_run(variant, seed, args, csv_path, out):
    if variant in LEARN_RESCORED:
        trained, flags = LEARN_RESCORED[variant]
        checkpoint, results = out / "ckpt" / f"{trained}_s{seed}" / "best.pth", out / "results" / f"{variant}_s{seed}"
        return {"variant": variant, "seed": seed, "train_s": 0.0,
                **_learn_scores([checkpoint], csv_path, results, flags)}
    name = f"{variant}_s{seed}"
    if variant == "ts_1_date":
        csv_path = Path(csv_path).with_name("single_date.csv")
    if variant == "ts_mosaic":  # nothing to train: the baseline scored as test_CR.py scores a checkpoint
        return {"variant": variant, "seed": seed, "train_s": 0.0,
                **_learn_scores([], csv_path, out / "results" / name, scored=["--baseline", "mosaic", "--input_t",
                                                                       str(TS_INPUTS)])}
    train_cmd = [sys.executable, "train_CR_kaggle.py", *learn_train_flags(variant, seed, args, csv_path, out)]
    t0 = time.time()
    subprocess.run(train_cmd, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t0
    return {"variant": variant, "seed": seed, "train_s": train_s,
            **_learn_scores([out / "ckpt" / name / "best.pth"], csv_path, out / "results" / name)}


def _learn_scores(checkpoints, csv_path, results, flags=(), scored=None):
    """test_CR.py on the test split (several checkpoints: their ensemble; scored: other flags saying what is scored,
    e.g. a baseline; flags: its extra flags); the figures a learn row reads."""
    scored = scored or ["--checkpoint", *map(str, checkpoints)]
    subprocess.run([sys.executable, "test_CR.py", *scored, "--data_list_filepath",
                    str(csv_path), "--input_data_folder", str(Path(csv_path).parent), "--split", "test",
                    "--results_dir", str(results), *flags], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((results / "summary.json").read_text())
    u = summary.get("uncertainty")
    figures = None if u is None else {
        "cloudy_clear_ratio": u["cloudy_clear_ratio"], "aleatoric_std": u["aleatoric_std"],
        "epistemic_std": u["epistemic_std"],
        **{f"{key}_{region}": r[key] for region, r in u["regions"].items() if r is not None
           for key in ("spearman", "uce_pixels", "uce_pixels_constant", "uce_images", "uce_images_constant",
                       "sparsification_area", "mean_std")},
        **{f"rmse_drop_{pct}_{region}": r["rmse_drop_pct"][pct] for region, r in u["regions"].items()
           if r is not None for pct in r["rmse_drop_pct"]},
        **{f"oracle_drop_{pct}_{region}": r["oracle_rmse_drop_pct"][pct] for region, r in u["regions"].items()
           if r is not None for pct in r["oracle_rmse_drop_pct"]}}
    return {"model": summary["mean"]["model"], "identity": summary["mean"]["identity"], "n_test": summary["n_images"],
            "confidence": summary.get("confidence"), "clear_change": summary["clear_change"]["model"],
            "uncertainty": figures, "truth_bins": summary.get("truth_bins")}


def check_variants(args):
    """--variants as a list, each known, a rescored variant after the one whose checkpoints it scores, the time series
    variants alone on --setting ts; SystemExit naming the problem otherwise."""
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in LEARN_VARIANTS and v not in LEARN_RESCORED]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(LEARN_VARIANTS) + list(LEARN_RESCORED)}")
    unordered = [v for i, v in enumerate(variants) if v in LEARN_RESCORED and LEARN_RESCORED[v][0] not in variants[:i]]
    if unordered:
        needed = [LEARN_RESCORED[v][0] for v in unordered]
        raise SystemExit(f"{unordered} score another variant's checkpoints: list {needed} before them in --variants")
    if (args.setting == "ts") != all(v in TS_VARIANTS for v in variants):
        raise SystemExit(f"the time series variants {TS_VARIANTS} run on --setting ts, and only they do")
    return variants


def bench_learn(args):
    """Train each design variant on synthetic data for a fixed budget, score the test split vs identity."""
    args = resolve_learn_setting(args)
    variants = check_variants(args)
    out = Path(args.out)
    csv_path = out / f"data_n{args.n}_s{args.size}_seed{args.data_seed}" / "data.csv"
    if not csv_path.is_file() and args.setting == "ts":
        synthetic_sets.make_synthetic_ts_dataset(csv_path.parent, n=args.n, size=args.size, seed=args.data_seed,
                                             n_dates=TS_DATES)
        ts_single_date_list(csv_path)
    elif not csv_path.is_file():
        synthetic_sets.make_synthetic_dataset(csv_path.parent, n=args.n, size=args.size, seed=args.data_seed)
    runs = []
    for variant in variants:
        for seed in (int(s) for s in args.seeds.split(",")):
            run = _learn_run(variant, seed, args, csv_path, out)
            runs.append(run)
            print(f"{variant:<24} seed {seed}: test PSNR {run['model']['all']['PSNR']:.2f} dB "
                  f"(identity {run['identity']['all']['PSNR']:.2f}) in {run['train_s']:.0f} s", flush=True)

    table = [_learn_row(variant, [r for r in runs if r["variant"] == variant]) for variant in variants]
    if args.ensemble:
        for variant in variants:
            members = [r for r in runs if r["variant"] == variant]
            if len(members) > 1:
                names = [f"{variant}_s{r['seed']}" for r in members]
                run = {"variant": f"{variant} (ensemble)", "seed": "+".join(str(r["seed"]) for r in members),
                       "train_s": 0.0, **_learn_scores([out / "ckpt" / n / "best.pth" for n in names], csv_path,
                                                        out / "results" / f"{variant}_ensemble")}
                runs.append(run)
                table.append(_learn_row(run["variant"], [run]))
    _print_learn_table(table, runs[0]["identity"], f"{runs[0]['n_test']} test patches of {args.size} px, "
                       f"{args.epochs} epochs each")
    _print_truth_bins(table, runs)
    return {"runs": runs, "table": table, "identity": runs[0]["identity"],
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}}


# What each learn row reports: (key, getter of one run's figure)
LEARN_COLUMNS = (
    ("PSNR", lambda r: r["model"]["all"]["PSNR"]),
    ("PSNR_cloudy", lambda r: r["model"]["cloudy"]["PSNR"]),
    ("SSIM", lambda r: r["model"]["all"]["SSIM"]),
    ("SAM", lambda r: r["model"]["all"]["SAM"]),
    ("conf_AUC_truth", lambda r: (r["confidence"] or {}).get("auc_truth_pooled")),
    ("conf_clear", lambda r: (r["confidence"] or {}).get("mean_clear")),
    ("clear_change", lambda r: r["clear_change"]),
    # the predicted uncertainty (None for a model without one): docs/uncertainty.md
    ("unc_spearman", lambda r: (r.get("uncertainty") or {}).get("spearman_all")),
    ("unc_drop10_pct", lambda r: (r.get("uncertainty") or {}).get("rmse_drop_10_all")),
    ("unc_UCE_px", lambda r: (r.get("uncertainty") or {}).get("uce_pixels_all")),
    # the constant baseline's UCE: the same over pixels as over images when the images are of one size
    ("unc_UCE_const", lambda r: (r.get("uncertainty") or {}).get("uce_pixels_constant_all")),
    ("unc_UCE_img", lambda r: (r.get("uncertainty") or {}).get("uce_images_all")),
    ("unc_cloudy_clear", lambda r: (r.get("uncertainty") or {}).get("cloudy_clear_ratio")),
)


def _learn_row(variant, runs):
    """Mean and sample std over seeds of every LEARN_COLUMNS figure (None where a variant has no such figure), and
    the mean over seeds of each true-cloud bin's PSNR (test_CR.py's "truth_bins")."""
    row = {"variant": variant, "seeds": [r["seed"] for r in runs],
           "train_s": float(np.mean([r["train_s"] for r in runs]))}
    bins = [r["truth_bins"] for r in runs if r.get("truth_bins")]
    row["truth_bins"] = None if len(bins) < len(runs) else {
        name: None if any(b[name]["PSNR_model"] is None for b in bins)
        else float(np.mean([b[name]["PSNR_model"] for b in bins])) for name in bins[0]}
    for key, get in LEARN_COLUMNS:
        values = [get(r) for r in runs]
        if any(v is None for v in values):
            row[key] = None
            continue
        values = np.asarray(values, dtype=np.float64)
        row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return row


def _print_learn_table(table, identity, what):
    """The learn table; columns no row has a figure for (e.g. the uncertainty's, without a head) are left out."""
    keys = [key for key, _ in LEARN_COLUMNS if any(row[key] is not None for row in table)]
    print(f"\n{'variant':<32}" + "".join(f"{key:>18}" for key in keys) + f"{'train s':>9}")
    for row in table:
        cells = "".join(f"{'-':>18}" if row[k] is None else f"{row[k][0]:>10.3f} ± {row[k][1]:<5.3f}" for k in keys)
        print(f"{row['variant']:<32}{cells}{row['train_s']:>9.0f}")
    known = {"PSNR": identity["all"]["PSNR"], "PSNR_cloudy": identity["cloudy"]["PSNR"],
             "SSIM": identity["all"]["SSIM"], "SAM": identity["all"]["SAM"], "clear_change": 0.0}
    print(f"{'identity (cloudy input)':<32}" + "".join(f"{known[k]:>10.3f}{'':8}" if k in known else f"{'-':>18}"
                                                      for k in keys))
    print(f"mean ± sample std over seeds; {what}")


def _print_truth_bins(table, runs):
    """PSNR by true cloud per variant (means over seeds), beside the identity's: where each variant's error lies."""
    rows = [row for row in table if row["truth_bins"]]
    if not rows:
        return
    names = list(rows[0]["truth_bins"])
    identity = next(run["truth_bins"] for run in runs if run["truth_bins"])  # a run whose data has true cloud maps
    print(f"\nPSNR by true cloud, dB (squared error pooled over each bin's pixels; means over seeds)\n{'variant':<32}"
          + "".join(f"{name:>20}" for name in names))
    fmt = lambda v: f"{'-':>20}" if v is None else f"{v:>20.2f}"
    for row in rows:
        print(f"{row['variant']:<32}" + "".join(fmt(row["truth_bins"][name]) for name in names))
    print(f"{'identity (cloudy input)':<32}" + "".join(fmt(identity[name]["PSNR_identity"]) for name in names))
    print(f"{'pixels':<32}" + "".join(f"{identity[name]['pixels']:>20}" for name in names))


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"learn": (_add_learn_args, bench_learn)}
