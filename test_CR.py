"""Evaluate a trained checkpoint on SEN12MS-CR, or remove clouds from a whole Sentinel-2 scene.

Evaluate (scores per image and on average, for the model and for the identity baseline, i.e. the cloudy
input taken as the prediction; inside clouds, in clear pixels, and by cloud-cover bin):
    python test_CR.py --checkpoint checkpoints/glf_cr_enhanced_v3/best.pth \\
        --data_list_filepath data.csv --input_data_folder ROOT --split test --save_geotiff --save_png

Protocols (what is scored): --protocol full scores whole 256 x 256 patches (UnCRtainTS, EMRDM, ECRformer);
--protocol glfcr the centred 128 x 128 crop, as GLF-CR's test script does. GLF-CR's own flags --load_size,
--crop_size, --is_use_cloudmask and --cloud_threshold are accepted with GLF-CR's meaning and override it.

Whole-scene prediction (any raster size; overlapping tiles blended with feathered weights):
    python test_CR.py --predict --checkpoint best.pth --cloudy S2.tif --sar S1.tif --out cloudfree.tif
Without radar (no Sentinel-1 file is read; a model trained with --sar_dropout knows radar is absent): --no_sar when
evaluating a list, --predict without --sar.

Several cloudy dates (a checkpoint trained with --input_t N reads N dates per sample from a time series list; its
--input_t is read from the checkpoint); the per-pixel least-cloudy-date mosaic scored as a baseline without one:
    python test_CR.py --checkpoint ts.pth --data_list_filepath series.csv --input_data_folder ROOT --save_confidence
    python test_CR.py --baseline mosaic --input_t 3 --data_list_filepath series.csv --input_data_folder ROOT
    python test_CR.py --predict --checkpoint ts.pth --cloudy S2_t0.tif S2_t1.tif S2_t2.tif \\
        --sar S1_t0.tif S1_t1.tif S1_t2.tif --out cloudfree.tif

Predicted uncertainty (a model with the uncertainty head, or several checkpoints as an ensemble) is scored beside
the prediction and written with --save_uncertainty (docs/uncertainty.md).

Clamping rule (applied identically when scoring, saving GeoTIFFs and drawing PNGs): the network output is
clamped to [0, 1] (a reflectance cannot be negative, and the dataset's encoding tops out at 10000) and then
rounded to the uint16 x10000 grid of the dataset, i.e. exactly the values the saved GeoTIFF holds. The
scores therefore describe the delivered product; the rounding moves a PSNR of 30 dB by < 1e-4 dB.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import bands
import cloud_masks
import clouds
import datalist
import dataloader
import files
import inference
import net_CR_temporal
import quicklooks
import rasters
import reports
import runtime
import scanning
import scoring
import splits

# (load_size, crop_size) of each protocol; None = the whole patch. glfcr: GLF-CR's test_CR.py defaults.
PROTOCOLS = {"full": (None, None), "glfcr": (256, 128)}
# Rows are appended here batch by batch; metrics.csv replaces it (atomically) when the run completes.
PARTIAL_CSV = "metrics.partial.csv"


# ----------------------------------------------------------------------------- what a run does

def main(argv=None):
    """Evaluate a list or predict a scene. Expected user errors (bad flags, data, checkpoint) are raised as
    runtime.UsageError / files.DataError / runtime.CheckpointError; run as a script, runtime.run_cli prints
    them as one line and exits 2."""
    args = build_parser().parse_args(argv)
    if args.batch_sz < 1:
        raise runtime.UsageError(f"--batch_sz must be at least 1, got {args.batch_sz}")
    if args.save_first is not None and args.save_first < 0:
        raise runtime.UsageError(f"--save_first must be 0 or more, got {args.save_first}")
    if bool(args.checkpoint) == bool(args.baseline) or (args.baseline and args.predict):
        raise runtime.UsageError("pass --checkpoint (a trained model) or, to evaluate a list, --baseline mosaic")
    if args.predict:
        predict(args)
    else:
        evaluate(args)
    return 0


# ----------------------------------------------------------------------------- shared helpers

def resolve_device_and_amp(args):
    """(device, autocast dtype) from --device and --amp; a flag the machine cannot honour is a UsageError. The
    training script's rule, so scores match its validation."""
    device = runtime.resolve_device(args.device)
    amp_warning = runtime.describe_amp(args.amp, device)[1]
    if amp_warning:
        print(amp_warning, file=sys.stderr)
    return device, runtime.resolve_amp(args.amp, device)[0]


def ensure_writable_dir(folder, what):
    """Prove that `folder` can be created and takes a file, before any work, and leave nothing behind: an unwritable
    results folder used to fail only after every image was scored, and a run that fails at the start must not leave
    an empty folder. The caller creates the folder once every input has been checked."""
    folder = Path(folder)
    made = files.outermost_new_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise runtime.UsageError(f"cannot write to {what} {folder}: {e.strerror or e}; "
                                 f"choose a folder you can write to") from None
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return folder


def uncertainty_source(model):
    """What the model's uncertainty is made of, in words, or None when it predicts none."""
    members = getattr(model, "members", None)
    if model is None:  # a baseline
        return None
    if members is not None:
        parts = ("aleatoric + epistemic" if all(getattr(m.config, "use_uncertainty_head", False) for m in members)
                 else "epistemic")
        return f"ensemble of {len(members)}: {parts} (members' spread)"
    return "aleatoric (uncertainty head)" if getattr(model.config, "use_uncertainty_head", False) else None


def check_uncertainty_wanted(args, model):
    """--save_uncertainty needs a model that predicts an uncertainty: a UsageError before any work otherwise."""
    if args.save_uncertainty and uncertainty_source(model) is None:
        raise runtime.UsageError(f"--save_uncertainty: {args.checkpoint[0]} has no uncertainty head, so it predicts "
                                 f"no uncertainty; pass a checkpoint trained with --use_uncertainty_head, or several "
                                 f"checkpoints (an ensemble)")


# ----------------------------------------------------------------------------- evaluation

def save_outputs(args, results, batch, cloudy, sar, out, target, first_index=0):
    """--save_geotiff / --save_confidence / --save_uncertainty / --save_png for each image of a batch (out: the batch's
    inference.forward_all output; its first image is image first_index of the split), up to --save_first images in
    all."""
    prediction, confidence = out["prediction"], out["confidence"]
    std = None if out["variance"] is None else out["variance"].sqrt().cpu()
    for i, name in enumerate(batch["file_name"]):
        if args.save_first is not None and first_index + i >= args.save_first:
            break
        stem = Path(name).stem
        if args.save_geotiff or args.save_uncertainty or (args.save_confidence and confidence is not None):
            crs, transform = rasters.raster_georef(batch["cloudy_path"][i], batch["window"][i].tolist())
        if args.save_geotiff:
            names = bands.s2_bands(bands.s2_product_of_count(prediction.shape[1]))
            rasters.write_s2_geotiff(results / "geotiff" / f"{stem}.tif", prediction[i].cpu(), crs, transform,
                                     descriptions=names)
        if args.save_confidence and confidence is not None:
            rasters.write_float_geotiff(results / "confidence" / f"{stem}.tif", confidence[i].cpu(), crs, transform,
                                           description="cloud confidence (0 clear .. 1 cloudy)")
        if args.save_confidence and out.get("date_confidence") is not None:  # one band per input date
            rasters.write_float_geotiff(results / "confidence" / f"{stem}_dates.tif", out["date_confidence"][i, :, 0]
                                        .cpu(), crs, transform, description=[
                                            f"cloud confidence of input date {t} (0 clear .. 1 cloudy)"
                                            for t in range(out["date_confidence"].shape[1])])
        if args.save_uncertainty:  # setup_evaluation made sure the model predicts one
            rasters.write_float_geotiff(results / "uncertainty" / f"{stem}.tif", std[i], crs, transform,
                                           description=inference.uncertainty_band_descriptions(len(std[i])))
        if args.save_png:
            quicklooks.save_quicklook(results / "png" / f"{stem}.png", cloudy[i].cpu(),
                                      None if sar is None else sar[i].cpu(),
                                      prediction[i].cpu(), target[i].cpu(),
                                      None if confidence is None else confidence[i].cpu(), title=stem,
                                      uncertainty=None if std is None else std[i].mean(0, keepdim=True))


def csv_row(row):
    """repr keeps every float bit; NaN (no such pixels in the image) is written as "nan"."""
    return {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}


def write_results(results, per_image, summary):
    """metrics.csv and summary.json, atomically; then the partial CSV of the run is no longer needed."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=scoring.CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_row(row) for row in per_image)
    files.write_text_atomic(results / "metrics.csv", buf.getvalue())
    files.write_text_atomic(results / "summary.json", json.dumps(summary, indent=2))
    (results / PARTIAL_CSV).unlink(missing_ok=True)


def describe_checkpoints(paths, ckpts):
    """summary.json's "checkpoint", "model_name" and "epoch": as before for one checkpoint, lists for an ensemble."""
    if len(paths) == 1:
        return {"checkpoint": str(paths[0]), "model_name": ckpts["model_name"], "epoch": ckpts.get("epoch")}
    return {"checkpoint": [str(p) for p in paths], "model_name": f"Ensemble of {len(ckpts)} "
            + "/".join(sorted({c["model_name"] for c in ckpts})), "epoch": [c.get("epoch") for c in ckpts]}


def summarise_run(args: argparse.Namespace, run: "Evaluation", totals: scoring.Totals, seconds: float) -> dict:
    """summary.json's figures of an evaluation: what was run (args, the Evaluation `run`) and what it added up
    (`totals`) in `seconds` end to end."""
    per_image = totals.rows
    bins = {}
    for lo, hi in scoring.COVER_BINS:
        name = f"{lo}-{hi}"
        members = [row for row in per_image if scoring.cover_bin(row["cloud_cover"]) == name]
        bins[name] = {"n": len(members), "mean": scoring.summarise(members)}
    return {
        **(describe_checkpoints(args.checkpoint, run.ckpt) if run.model is not None else
           {"checkpoint": None, "model_name": f"{args.baseline} baseline", "epoch": None}),
        "input_t": args.input_t, "date_sampler": args.date_sampler if args.input_t > 1 else None,
        "coverage_cache": args.coverage_cache if args.input_t > 1 else None,
        "data_list": str(args.data_list_filepath), "split": args.split, "n_images": len(per_image),
        # What was scored: "full" (whole patches), "glfcr" (centred 128 of 256) or "custom" (other sizes).
        "protocol": args.protocol, "load_size": args.load_size, "crop_size": args.crop_size,
        "cloud_threshold": args.cloud_threshold,
        "cloud_detector": args.cloud_detector if not args.cloud_mask_dir else
        f"{cloud_masks.check_mask_dir(args.cloud_mask_dir, [])} (precomputed in {args.cloud_mask_dir})",
        # The binary mask behind the cloudy/clear scores and bins, and the list's split rule and leak check: what a
        # reader needs to tell whether two runs' figures compare.
        "cloud_mask": cloud_masks.describe_cloud_mask(args.cloud_detector, args.cloud_threshold, args.cloud_mask_dir),
        "split_rule": "the time series list's split (dataloader.get_ts_train_val_test)" if run.leaks is None else
        run.leaks.split_rule, "leak_check": None if run.leaks is None else run.leaks.to_json(),
        "device": str(run.device), "amp": runtime.amp_name(run.amp_dtype),
        # A model trained with --sar_input zeros (the radar ablation) sees zeros here too: it is in its config.
        "sar_input": None if run.model is None else run.model.sar_input,
        # The Sentinel-2 product scored: its bands are the metrics' bands (12 for L2A), its offset removed per file.
        "s2_product": run.s2_product, "s2_bands": list(bands.s2_bands(run.s2_product)),
        "s2_offset": args.s2_offset,  # the offset of files whose metadata carries none (rasters.s2_offset)
        "no_sar": args.no_sar,  # evaluated without radar (--no_sar): no Sentinel-1 file read
        "clamping": "prediction clamped to [0,1] and rounded to the uint16 x10000 grid before scoring and saving",
        "mean": scoring.summarise(per_image), "cloud_cover_bins": bins,
        "confidence": scoring.summarise_confidence(totals),
        "truth_bins": scoring.summarise_truth_bins(totals),
        "uncertainty": scoring.summarise_uncertainty(totals, uncertainty_source(run.model)),
        "clear_change": {"model": scoring.nanmean([row["model_clear_change"] for row in per_image]), "identity": 0.0},
        "images_per_s": len(per_image) / seconds,
        "model_images_per_s": len(per_image) / max(totals.model_seconds, 1e-9),
    }


def resolve_eval_flags(args):
    """Settle what is scored, in place: load_size and crop_size (explicit flags override --protocol's sizes;
    args.protocol becomes the name of the protocol those sizes are, else "custom") and the cloud detector
    (GLF-CR's --is_use_cloudmask False means none). Flag errors are UsageErrors, before any work."""
    if not args.data_list_filepath or not args.input_data_folder:
        raise runtime.UsageError("pass --data_list_filepath and --input_data_folder to evaluate a list (or "
                                 "--predict with --cloudy, --sar and --out for a whole scene)")
    load_size, crop_size = PROTOCOLS[args.protocol]
    args.load_size = load_size if args.load_size is None else args.load_size
    args.crop_size = crop_size if args.crop_size is None else args.crop_size
    for flag, value in (("--load_size", args.load_size), ("--crop_size", args.crop_size)):
        if value is not None and value < 1:
            raise runtime.UsageError(f"{flag} must be a positive number of pixels, got {value}")
    if args.load_size and args.crop_size and args.crop_size > args.load_size:
        raise runtime.UsageError(f"--crop_size {args.crop_size} is larger than --load_size {args.load_size}, the "
                                 f"region it is cut from; lower --crop_size or raise --load_size")
    args.protocol = next((name for name, sizes in PROTOCOLS.items() if sizes == (args.load_size, args.crop_size)),
                         "custom")
    if not 0 < args.cloud_threshold <= 1:
        raise runtime.UsageError(f"--cloud_threshold must be in (0, 1] (a cloud score is), got {args.cloud_threshold}")
    if args.is_use_cloudmask is False:
        args.cloud_detector = "none"
    elif args.is_use_cloudmask and args.cloud_detector == "none":
        raise runtime.UsageError("--is_use_cloudmask True asks for a cloud mask but --cloud_detector is none; "
                                 "pass --cloud_detector rule (GLF-CR's mask) or s2cloudless")
    return args


def resolve_input_t(args):
    """Dates per sample: --input_t where given (--baseline mosaic needs N > 1), else the first checkpoint's
    model_config (1 where it holds none, as in every checkpoint of a single-date run). A checkpoint that cannot be
    read is reported by the load that follows, together with the other inputs' problems."""
    if args.baseline and (args.input_t is None or args.input_t < 2):
        raise runtime.UsageError("--baseline mosaic picks each pixel among several dates: pass --input_t N, N >= 2")
    if args.baseline and args.cloud_detector == "none":
        raise runtime.UsageError("--baseline mosaic ranks the dates by their cloud score: choose a --cloud_detector")
    if args.input_t is not None:
        if args.input_t < 1:
            raise runtime.UsageError(f"--input_t must be at least 1, got {args.input_t}")
        return args.input_t
    try:
        return runtime.load_checkpoint(args.checkpoint[0])["model_config"].get("input_t", 1)
    except runtime.USER_ERRORS:
        return 1


def read_series(args):
    """The --split time series of a time series list, each file present (a DataError naming it otherwise)."""
    if args.cloud_mask_dir:
        raise runtime.UsageError("--cloud_mask_dir holds masks of single dates; with several dates the time series "
                                 "dataset runs --cloud_detector on every date")
    series = dict(zip(("train", "val", "test"), dataloader.get_ts_train_val_test(args.data_list_filepath)))[args.split]
    if not series:
        raise files.DataError(f"{args.data_list_filepath}: the {args.split} split holds no time series")
    root = rasters.data_root(args.input_data_folder)
    for ts in series:
        for rel in (*ts.s1, *ts.s2):
            if not (root / rel).is_file():
                raise files.DataError(f"{root / rel}: file listed in {args.data_list_filepath} not found")
    return series


@dataclass
class Evaluation:
    """What setup_evaluation prepares for an evaluation run."""
    results: Path  # the results folder, created
    made: Path | None  # the outermost folder this run created (None: it existed)
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: float32
    model: torch.nn.Module | None  # the network, or the ensemble of several checkpoints; None: --baseline
    ckpt: dict | list[dict] | None  # the checkpoint, or the ensemble's checkpoints
    loader: DataLoader
    leaks: scanning.LeakReport | None  # None: a time series list (its split is the published one, by region)
    s2_product: str = bands.DEFAULT_S2_PRODUCT  # the checkpoint's Sentinel-2 product (runtime.s2_product_of)


def checkpoint_product(args, ckpts):
    """The Sentinel-2 product the checkpoint(s) trained on (runtime.s2_product_of; L1C for --baseline, which has
    none), checked against --cloud_detector (s2cloudless takes L1C only)."""
    product = bands.DEFAULT_S2_PRODUCT if ckpts is None else runtime.checkpoints_s2_product(ckpts, args.checkpoint)
    detector = getattr(args, "cloud_detector", "none")
    try:
        clouds.check_detector_product(detector, product)
    except ValueError as e:
        raise runtime.UsageError(f"--cloud_detector {detector} with a checkpoint trained on {product}: {e}") from None
    return product


def product_remedy(args, product):
    """What to do with files of the other product than the checkpoint's (rasters.check_s2_bands' remedy)."""
    return (f"{' '.join(map(str, args.checkpoint))} trained on Sentinel-2 {product}; give it {product} files, or "
            "use a checkpoint trained with --s2_product {other}")


def setup_evaluation(args: argparse.Namespace) -> Evaluation:
    """Everything before the first image, inputs first: flags and device; then the results folder (checked, not yet
    created), the data list with the header of every file of the split, and the checkpoint, reported together when
    several are wrong; the leak check; only then the results folder is created. Returns an Evaluation."""
    resolve_eval_flags(args)
    device, amp_dtype = resolve_device_and_amp(args)
    results = Path(args.results_dir)
    folders = [results] + [results / sub for sub, wanted in (
        ("geotiff", args.save_geotiff), ("png", args.save_png), ("confidence", args.save_confidence),
        ("uncertainty", args.save_uncertainty)) if wanted]

    def read_rows():
        rows = datalist.select_split(datalist.read_data_list(args.data_list_filepath), args.split,
                                       source=str(args.data_list_filepath))
        # either product here; the checkpoint's is checked once it is loaded (check_products)
        seen = rasters.check_listed_files(rows, args.input_data_folder,
                                             f"the {args.split} split of {args.data_list_filepath}", s2_product=None,
                                             sar=not args.no_sar)
        return rows, seen

    args.input_t = resolve_input_t(args)
    if args.no_sar and args.input_t > 1:
        raise runtime.UsageError("--no_sar evaluates single dates; the time series network takes every date's radar")
    _, (rows, seen), (model, ckpt) = runtime.check_together(
        lambda: [ensure_writable_dir(folder, "--results_dir") for folder in folders],
        read_rows if args.input_t == 1 else lambda: (read_series(args), None),
        lambda: (None, None) if args.baseline else runtime.load_models(args.checkpoint, device))
    product = checkpoint_product(args, ckpt)
    if seen is not None:
        rasters.check_products(seen, product, product_remedy(args, product))
    check_uncertainty_wanted(args, model)
    warn_without_sar(args.no_sar, model)
    if model is not None and net_CR_temporal.input_t_of(model) != args.input_t:
        raise runtime.UsageError(f"{args.checkpoint[0]} takes {net_CR_temporal.input_t_of(model)} date(s) (its "
                                 f"model_config); --input_t {args.input_t} disagrees: leave --input_t out")
    dataset = build_dataset(args, rows, product)
    loader = DataLoader(dataset, batch_size=args.batch_sz, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    leaks = None  # a time series list keeps the published split by region (dataloader.get_ts_train_val_test)
    if args.input_t == 1:
        leaks = scanning.startup_leak_check(args.data_list_filepath, args.input_data_folder)
        warning = scanning.leak_warning(leaks, splits.SPLIT_PAIRS, args.input_data_folder)
        if warning:
            print(warning + " (recorded in summary.json)", file=sys.stderr)
    made = files.outermost_new_folder(results)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return Evaluation(results=results, made=made, device=device, amp_dtype=amp_dtype, model=model, ckpt=ckpt,
                      loader=loader, leaks=leaks, s2_product=product)


def build_dataset(args, rows, product):
    """The evaluation's dataset: single dates (SEN12MSCRDataset) or --input_t dates per sample (SEN12MSCRTSDataset),
    of the checkpoint's Sentinel-2 product."""
    if args.input_t > 1:
        return dataloader.SEN12MSCRTSDataset(rows, args.input_data_folder, input_t=args.input_t,
                                             crop_size=args.crop_size, load_size=args.load_size, augment=False,
                                             cloud_detector=args.cloud_detector,
                                             cloud_threshold=args.cloud_threshold, sampler=args.date_sampler,
                                             coverage_cache=args.coverage_cache,
                                             s2_product=product, s2_offset=args.s2_offset)
    return dataloader.SEN12MSCRDataset(rows, args.input_data_folder, crop_size=args.crop_size,
                                       load_size=args.load_size, augment=False, cloud_detector=args.cloud_detector,
                                       cloud_threshold=args.cloud_threshold, cloud_mask_dir=args.cloud_mask_dir,
                                       s2_product=product, s2_offset=args.s2_offset, read_sar=not args.no_sar)


def warn_without_sar(no_sar, model):
    """Print runtime.untested_without_sar's line to stderr where a model runs without radar it never trained without."""
    warning = runtime.untested_without_sar(model) if no_sar else None
    if warning:
        print(warning, file=sys.stderr)


def mosaic_outputs(cloudy, cloud_mask):
    """--baseline mosaic's outputs as inference.forward_all gives a model's: the finished mosaic, nothing else."""
    return {"prediction": bands.finish_s2(net_CR_temporal.mosaic(cloudy, cloud_mask)), "confidence": None,
            "date_confidence": None, "aleatoric": None, "epistemic": None, "variance": None}


def series_batch(batch):
    """A time series batch as scoring reads a single date's: its cloud truth (N,T,2,H,W) becomes the target's, the
    least opacity and shadow over the dates (net_CR_temporal.target_cloud_mask's rule)."""
    if "cloud_truth" not in batch:
        return batch
    return {**batch, "cloud_truth": net_CR_temporal.target_cloud_mask(batch["cloud_truth"])}


def evaluate_batch(args: argparse.Namespace, run: Evaluation, ctx, batch: dict, totals: scoring.Totals) -> list[dict]:
    """Predict, score and save one batch of the Evaluation `run` (its first image is image len(totals.rows) of the
    split); adds its CSV rows, the seconds spent in the model, its confidence histograms, its squared error per
    true-cloud bin and a sample of its pixels' uncertainty to `totals`. Returns the batch's CSV rows."""
    device, first_index = run.device, len(totals.rows)
    cloudy, target, cloud_mask = (batch[k].to(device) for k in ("cloudy_data", "cloudfree_data", "cloud_mask"))
    sar = batch["SAR_data"].to(device) if "SAR_data" in batch else None  # None: --no_sar
    series = cloudy.dim() == 5  # several dates: the input "as it is" is their mosaic, scored where no date is clear
    t0 = time.perf_counter()
    out = mosaic_outputs(cloudy, cloud_mask) if run.model is None else inference.forward_all(run.model, cloudy, sar,
                                                                                             ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    prediction, confidence = out["prediction"], out["confidence"]
    identity = bands.finish_s2(net_CR_temporal.mosaic(cloudy, cloud_mask) if series else cloudy)
    if series:
        cloud_mask, batch = net_CR_temporal.target_cloud_mask(cloud_mask), series_batch(batch)
        cloudy, sar = identity, sar[:, 0]  # what the quicklooks show: the mosaic and the first date's radar
    scores = {"model": scoring.score_batch(prediction, target, cloud_mask, args.cloud_threshold),
              "identity": scoring.score_batch(identity, target, cloud_mask, args.cloud_threshold)}
    # Same pixels as masked_metrics and the dataset count as cloudy (score >= threshold).
    mask = cloud_mask >= args.cloud_threshold
    cover = mask.float().mean(dim=(1, 2, 3)) * 100.0
    true_mask = rasters.truth_mask(batch["cloud_truth"].to(device)) if "cloud_truth" in batch else None
    conf_cols = scoring.confidence_scores(confidence, prediction, identity, mask, true_mask)
    if confidence is not None:
        totals.add_histograms(confidence, mask, true_mask)
    if "cloud_truth" in batch:
        totals.add_truth_bins(batch["cloud_truth"].to(device), {"model": prediction, "identity": identity}, target)
    if out["variance"] is not None:
        totals.add_pixels(out, target, mask)
    save_outputs(args, run.results, batch, cloudy, sar, out, target, first_index)
    rows = scoring.image_rows(batch, scores, cover, {**conf_cols, **scoring.uncertainty_scores(out, mask, target)})
    totals.rows += rows
    totals.model_seconds += seconds
    return rows


def evaluate(args):
    """Score every image of the split; write metrics.csv and summary.json (and GeoTIFF/PNG outputs). Rows are
    also appended to metrics.partial.csv as they are scored, so a run that stops part-way keeps them."""
    run = setup_evaluation(args)
    results, device = run.results, run.device
    ctx = runtime.autocast(device, run.amp_dtype)
    totals, t0 = scoring.Totals(), time.perf_counter()
    try:
        with open(results / PARTIAL_CSV, "w", newline="") as partial:
            partial_rows = csv.DictWriter(partial, fieldnames=scoring.CSV_COLUMNS)
            partial_rows.writeheader()
            for batch in tqdm(run.loader, desc=f"evaluating {args.split}", dynamic_ncols=True):
                rows = evaluate_batch(args, run, ctx, batch, totals)
                partial_rows.writerows(csv_row(row) for row in rows)
                partial.flush()
    except BaseException:
        if not totals.rows:  # stopped before the first image was scored: nothing to keep
            (results / PARTIAL_CSV).unlink(missing_ok=True)
            if run.made is not None:
                shutil.rmtree(run.made, ignore_errors=True)
        raise
    summary = summarise_run(args, run, totals, time.perf_counter() - t0)
    if summary["uncertainty"] is not None:
        summary["uncertainty"]["calibration_plot"] = str(quicklooks.save_calibration_plot(results / "calibration.png",
                                                                                          summary["uncertainty"]))
    write_results(results, totals.rows, summary)
    print(f"{summary['model_name']} from {' '.join(map(str, args.checkpoint or ['no checkpoint']))} on "
          f"{len(totals.rows)} {args.split} "
          f"images "
          f"({args.data_list_filepath}); protocol {args.protocol}, device {device}, "
          f"{runtime.describe_amp(args.amp, device)[0]}")
    print(reports.format_table(summary["mean"], summary["cloud_cover_bins"]))
    print(reports.format_confidence(summary))
    if summary["truth_bins"] is not None:
        print(reports.format_truth_bins(summary["truth_bins"]))
    if summary["uncertainty"] is not None:
        print(reports.format_uncertainty(summary["uncertainty"]))
    print(f"{summary['images_per_s']:.2f} images/s; per-image scores in {results / 'metrics.csv'}, "
          f"means in {results / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------- whole-scene prediction

def uncertainty_output_path(out):
    """Where --predict --save_uncertainty writes the standard deviation: beside --out, OUT_uncertainty.tif."""
    out = Path(out)
    return out.with_name(f"{out.stem}_uncertainty{out.suffix or '.tif'}")


def check_predict_output(args):
    """Before any work: --out (and the uncertainty output beside it) must not be an input (it would be overwritten),
    nor an existing file unless --overwrite, and its folder must be writable."""
    out = Path(args.out)
    for path, flag in [(out, "--out")] + ([(uncertainty_output_path(out), "--save_uncertainty's output")]
                                          if args.save_uncertainty else []):
        for given_flag in ("cloudy", "sar"):
            inputs = getattr(args, given_flag) or []  # no --sar: predicted without radar
            for given in map(Path, inputs):
                same = path.exists() and given.exists() and os.path.samefile(path, given)
                if path.resolve() == given.resolve() or same:
                    which = "the" if len(inputs) == 1 else "one of the"
                    raise runtime.UsageError(f"{flag} {path} is {which} --{given_flag} input: writing there would "
                                             f"destroy it; choose another --out")
        if path.is_dir():
            raise runtime.UsageError(f"{flag} {path} is a folder; give --out a file name, e.g. --out "
                                     f"{out / 'cloudfree.tif'}")
        if path.exists() and not args.overwrite:
            raise runtime.UsageError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another --out")
    ensure_writable_dir(out.parent, "the folder of --out")
    return out


def predict(args):
    missing = [f"--{k}" for k in ("cloudy", "out") if not getattr(args, k)]
    if missing:
        raise runtime.UsageError(f"--predict needs {', '.join(missing)}")
    if args.sar and args.no_sar:
        raise runtime.UsageError("--no_sar and --sar contradict each other: drop --sar to predict without radar")
    if args.tile < 8 or not 0 <= args.overlap < args.tile:
        raise runtime.UsageError(f"need --tile >= 8 and 0 <= --overlap < --tile, got --tile {args.tile} "
                                 f"--overlap {args.overlap}")
    check_predict_output(args)
    device, amp_dtype = resolve_device_and_amp(args)

    def check_scene():  # either product here; the checkpoint's is checked once it is loaded
        seen = {}
        for i, cloudy in enumerate(args.cloudy):
            sar = args.sar[i] if args.sar and i < len(args.sar) else None
            with rasters.open_raster(cloudy) as cloudy_src, (
                    rasters.open_raster(sar) if sar else contextlib.nullcontext()) as sar_src:
                scene_product = bands.s2_product_of_count(cloudy_src.count) or bands.DEFAULT_S2_PRODUCT
                inference.check_scene_pair(cloudy_src, sar_src, scene_product)
                seen.setdefault(scene_product, cloudy)
        return seen

    seen, (model, ckpt) = runtime.check_together(check_scene, lambda: runtime.load_models(args.checkpoint, device))
    product = runtime.checkpoints_s2_product(ckpt, args.checkpoint)
    rasters.check_products(seen, product, product_remedy(args, product))
    check_uncertainty_wanted(args, model)
    dates = net_CR_temporal.input_t_of(model)
    if len(args.cloudy) != dates or (args.sar and len(args.sar) != dates) or (dates > 1 and not args.sar):
        raise runtime.UsageError(f"{args.checkpoint[0]} takes {dates} date(s): pass --cloudy and --sar {dates} "
                                 f"GeoTIFF(s) each, in date order (got {len(args.cloudy)} and "
                                 f"{len(args.sar or [])}; only a single-date model predicts without --sar)")
    warn_without_sar(not args.sar, model)
    cloudy = args.cloudy if dates > 1 else args.cloudy[0]
    sar = None if not args.sar else args.sar if dates > 1 else args.sar[0]
    uncertainty = uncertainty_output_path(args.out) if args.save_uncertainty else None
    t0 = time.perf_counter()
    out = inference.predict_scene(model, cloudy, sar, args.out, tile=args.tile, overlap=args.overlap,
                                  batch_sz=args.batch_sz, device=device, amp_dtype=amp_dtype,
                                  uncertainty_path=uncertainty, s2_product=product, s2_offset=args.s2_offset)
    what = describe_checkpoints(args.checkpoint, ckpt)
    print(f"wrote {out}{f' and {uncertainty}' if uncertainty else ''} ({time.perf_counter() - t0:.1f} s; "
          f"{what['model_name']} from {' '.join(map(str, args.checkpoint))}, tile {args.tile}, overlap "
          f"{args.overlap}, device {device})")
    return out


# ----------------------------------------------------------------------------- command-line flags

def parse_bool(text):
    """argparse type for GLF-CR's boolean flags: true/false, 1/0, yes/no (any case)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dataloader.HelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="checkpoint written by train_CR_kaggle.py (last.pth or best.pth); the network is rebuilt "
                        "from it, no architecture flags needed. Several: an ensemble, scored on the mean of their "
                        "predictions, with their spread as the epistemic part of the uncertainty")
    p.add_argument("--baseline", default=None, choices=["mosaic"],
                   help="score a parameter-free baseline instead of a checkpoint: mosaic = each pixel from the input "
                        "date the --cloud_detector scores least cloudy (needs --input_t N > 1)")
    p.add_argument("--input_t", type=int, default=None,
                   help="cloudy dates per sample: a checkpoint's own (its model_config; None: read from there), or "
                        "what --baseline mosaic picks among; N > 1 reads a time series list "
                        "(dataloader.get_ts_train_val_test)")
    runtime.add_shared_flag(p, "device")
    runtime.add_shared_flag(p, "amp", note="here the autocast of inference")
    p.add_argument("--batch_sz", type=int, default=4, help="images (or whole-scene tiles) per forward pass")
    runtime.add_shared_flag(p, "s2_offset", note="the Sentinel-2 product itself comes from the checkpoint")
    g = p.add_argument_group("evaluation on a data list")
    runtime.add_shared_flag(g, "data_list_filepath")
    runtime.add_shared_flag(g, "input_data_folder")
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="rows of the list to evaluate")
    g.add_argument("--results_dir", default="results",
                   help="where metrics.csv, summary.json, geotiff/ and png/ are written (checked before any work)")
    g.add_argument("--protocol", default="full", choices=list(PROTOCOLS),
                   help="full: score whole patches (UnCRtainTS, EMRDM, ECRformer); glfcr: the centred 128 px crop "
                        "of GLF-CR's test script (--load_size 256 --crop_size 128)")
    runtime.add_shared_flag(g, "load_size", default=None, note="here a centred region (None: from --protocol; "
                                                               "larger than the patch: the whole patch)")
    g.add_argument("--crop_size", type=int, default=None,
                   help="GLF-CR's flag: score a centred crop of this side (None: from --protocol, i.e. the whole "
                        "patch for full, 128 for glfcr)")
    runtime.add_shared_flag(g, "cloud_detector", note="its mask gives the cloudy/clear scores and the cloud-cover "
                                                      "bins (a soft score thresholded at --cloud_threshold)")
    g.add_argument("--is_use_cloudmask", type=parse_bool, nargs="?", const=True, default=None,
                   help="GLF-CR's flag: False = no cloud mask (--cloud_detector none: the cloudy/clear scores are "
                        "empty); True = use the --cloud_detector mask; None: follow --cloud_detector")
    g.add_argument("--cloud_threshold", type=float, default=clouds.CLOUD_THRESHOLD,
                   help="GLF-CR's flag: soft cloud score from which a pixel counts as cloudy (score >= threshold), "
                        "in (0, 1]; s2cloudless's mask is already binary, so it does not change it")
    runtime.add_shared_flag(g, "cloud_mask_dir")
    runtime.add_shared_flag(g, "date_sampler", note="the published protocol's is 'published'")
    runtime.add_shared_flag(g, "coverage_cache")
    runtime.add_shared_flag(g, "num_workers")
    p.add_argument("--no_sar", action="store_true",
                   help="without radar: no Sentinel-1 file is read and the network is told radar is absent (as "
                        "trained with --sar_dropout; a model trained without dropout sees zeros, with a warning that "
                        "the result is untested)")
    g.add_argument("--save_geotiff", action="store_true",
                   help="write each prediction as a uint16 x10000 GeoTIFF of the checkpoint's Sentinel-2 product's "
                        "bands (13 for L1C, 12 for L2A, named in the band descriptions) with the input crop's CRS and "
                        "transform (results_dir/geotiff/NAME.tif)")
    g.add_argument("--save_confidence", action="store_true",
                   help="write the model's confidence map (0 clear .. 1 cloudy) as a float32 GeoTIFF with the crop's "
                        "CRS and transform (results_dir/confidence/NAME.tif): a cloud-probability product")
    g.add_argument("--save_png", action="store_true",
                   help="write labelled quicklooks cloudy | SAR | prediction | target | confidence heat map with "
                        "its colour bar (and the predicted uncertainty with its own, where the model has one), RGB "
                        "with one fixed stretch (results_dir/png/NAME.png)")
    g.add_argument("--save_first", type=int, default=None,
                   help="write the --save_geotiff/--save_png/--save_confidence/--save_uncertainty files of the first N "
                        "images only, so the results folder stays small on a large test split (e.g. Kaggle's 20 GB "
                        "output); every image is still scored (None: all)")
    p.add_argument("--save_uncertainty", action="store_true",
                   help="write the predicted standard deviation of each band (reflectance, 0-1 scale) as a "
                        "float32 GeoTIFF with the prediction's CRS and transform: results_dir/uncertainty/NAME.tif, "
                        "or with --predict OUT_uncertainty.tif beside --out. Needs a model with the uncertainty head "
                        "or several checkpoints")
    _prediction_flags(p.add_argument_group("whole-scene prediction"))
    return p


def _prediction_flags(g):
    g.add_argument("--predict", action="store_true", help="predict one whole scene instead of evaluating a list")
    g.add_argument("--cloudy", nargs="+", default=None,
                   help="--predict: cloudy Sentinel-2 GeoTIFF of the checkpoint's product (L1C: 13 bands, L2A: 12 "
                        "without B10), reflectance x10000, its offset in its metadata or --s2_offset; a checkpoint "
                        "trained with --input_t N takes N of them, in date order, all on one grid")
    g.add_argument("--sar", nargs="+", default=None,
                   help="--predict: Sentinel-1 GeoTIFF (VV, VH in dB) on the same grid, one per --cloudy date in the "
                        "same order; without it a single-date scene is predicted without radar (as --no_sar)")
    g.add_argument("--out", default=None, help="--predict: output GeoTIFF (the checkpoint's product's bands, named in "
                                               "the band descriptions, uint16 x10000, no offset); never an input")
    g.add_argument("--overwrite", action="store_true", help="--predict: replace --out if it exists")
    g.add_argument("--tile", type=int, default=256, help="--predict: tile side in pixels")
    g.add_argument("--overlap", type=int, default=32, help="--predict: overlap of neighbouring tiles in pixels")


if __name__ == "__main__":
    sys.exit(runtime.run_cli(main))
