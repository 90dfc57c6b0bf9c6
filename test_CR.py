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
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window
from scipy import ndimage
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import bands
import dataloader
import files
import metrics
import runtime
import splits

METRIC_NAMES = metrics.METRIC_NAMES
# Whole-image score, then inside clouds and in clear pixels (metrics.masked_metrics halves).
REGIONS = ("all", "cloudy", "clear")
PREDICTORS = ("model", "identity")  # identity: the cloudy input itself taken as the prediction
# Cloud-cover bins in percent of cloudy pixels: [lo, hi), the last one closed at 100.
COVER_BINS = ((0, 10), (10, 30), (30, 60), (60, 100))
# Where the data has true cloud maps (synthetic sets, dataloader.truth_path), pixels are also scored by their true
# cloud: PSNR of the squared error pooled over a bin's pixels and bands, so a reader sees whether the error lies under
# thin cloud that lets the ground through or under opaque cloud, at a cloud's edge or deep inside. Opacity bins are
# (lo, hi]; "clear" has neither cloud nor shadow above dataloader.TRUTH_THRESHOLD.
OPACITY_BINS = ((0.05, 0.3), (0.3, 0.7), (0.7, 0.9), (0.9, 1.0))
EDGE_PX = 4  # "at the edge": a cloudy pixel at most this far (Euclidean, px) from a pixel outside the cloud
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


@torch.no_grad()
def forward_all(model, cloudy, sar, ctx):
    """Everything a forward pass gives, float32: {"prediction" (finished), "confidence" (or None), the variances
    (N,13,H,W) "aleatoric" (the uncertainty head's), "epistemic" (an ensemble's spread) and "variance" (their sum,
    the predictive variance), each None where the model has no such part}. ctx: the run's autocast context."""
    with ctx:
        prediction, aux = model(cloudy, sar, return_aux=True)
    log_variance, epistemic, confidence = (aux.get(k) for k in ("log_variance", "epistemic_variance", "confidence"))
    aleatoric = None if log_variance is None else log_variance.float().exp()
    epistemic = None if epistemic is None else epistemic.float()
    parts = [v for v in (aleatoric, epistemic) if v is not None]
    return {"prediction": bands.finish_s2(prediction),
            "confidence": None if confidence is None else confidence.float(),
            "aleatoric": aleatoric, "epistemic": epistemic, "variance": sum(parts) if parts else None}


def forward(model, cloudy, sar, ctx):
    """(finished prediction, confidence or None) in float32; ctx is the run's autocast context (runtime.autocast)."""
    out = forward_all(model, cloudy, sar, ctx)
    return out["prediction"], out["confidence"]


def uncertainty_source(model):
    """What the model's uncertainty is made of, in words, or None when it predicts none."""
    members = getattr(model, "members", None)
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


# ----------------------------------------------------------------------------- quicklooks and the calibration plot

QUICKLOOK_PANELS = ("cloudy input", "SAR (VV, VH, mean)", "prediction", "target (cloud-free)", "cloud confidence")
UNCERTAINTY_PANEL = "uncertainty (std, band mean)"  # a sixth panel, for models that predict an uncertainty
QUICKLOOK_MIN_SIDE = 256  # smaller patches are enlarged by a whole factor (nearest neighbour) to at least this
QUICKLOOK_CMAP = "magma"  # perceptually uniform, dark = clear, bright = cloudy
UNCERTAINTY_CMAP = "viridis"  # another map than the confidence's, so the two panels are not read as one quantity
# One fixed colour scale for the std in every quicklook (like the RGB stretch): 0 .. 0.05 reflectance, about the RMSE
# of a cloudy input (26.8 dB on the synthetic test split is 0.046), so clear pixels stay dark and clouds light up.
QUICKLOOK_STD_MAX = 0.05
QUICKLOOK_DPI = 100
_QL_MARGIN, _QL_GAP, _QL_TOP, _QL_BAR = 12, 12, 56, 88  # px: border, between panels, title + labels, colour bar


def quicklook_layout(height, width, uncertainty=False):
    """Pixel layout of the quicklook of an (height, width) image: {"scale", "size": (H, W) of the PNG,
    "panels": [(top, left)] per QUICKLOOK_PANELS entry (and UNCERTAINTY_PANEL with uncertainty=True),
    "colorbar": (top, left, height, width) of the confidence's colour bar, "colorbars": every colour bar}. Panel k
    holds the image enlarged `scale` times: PNG rows top..top+scale*height, columns left..left+scale*width."""
    scale = max(1, math.ceil(QUICKLOOK_MIN_SIDE / max(height, width)))
    ph, pw = height * scale, width * scale
    lefts = [_QL_MARGIN + k * (pw + _QL_GAP) for k in range(len(QUICKLOOK_PANELS))]
    bars = [lefts[-1] + pw + _QL_GAP]
    if uncertainty:  # after the confidence's colour bar: the std panel and its own bar
        lefts.append(bars[0] + _QL_BAR)
        bars.append(lefts[-1] + pw + _QL_GAP)
    colorbars = [(_QL_TOP, left, ph, 14) for left in bars]
    return {"scale": scale, "size": (_QL_TOP + ph + _QL_MARGIN, bars[-1] + _QL_BAR),
            "panels": [(_QL_TOP, left) for left in lefts], "colorbar": colorbars[0], "colorbars": colorbars}


def _quicklook_images(cloudy, sar, prediction, target, confidence, uncertainty):
    """(H,W,3) float arrays of the quicklook's panels, in QUICKLOOK_PANELS order (then the uncertainty's)."""
    from matplotlib import colormaps

    images = [bands.s2_to_rgb(cloudy), bands.sar_to_rgb(sar), bands.s2_to_rgb(prediction),
              bands.s2_to_rgb(target)]
    images = [img.float().cpu().permute(1, 2, 0).numpy() for img in images]
    images.append(np.full_like(images[0], 0.85) if confidence is None
                  else colormaps[QUICKLOOK_CMAP](confidence[0].float().clamp(0, 1).cpu().numpy())[..., :3])
    if uncertainty is not None:
        std = (uncertainty[0].float().cpu().numpy() / QUICKLOOK_STD_MAX).clip(0, 1)
        images.append(colormaps[UNCERTAINTY_CMAP](std)[..., :3])
    return images


def _colour_bar(fig, at, box, cmap, ticks, labels):
    """A vertical colour bar in the PNG pixel box (top, left, height, width), values 0..1 of cmap."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    top, left, height, width = box
    x, y = at(top + height, left)
    cax = fig.add_axes((x, y, width / fig.bbox.width, height / fig.bbox.height))
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[cmap]), cax=cax, ticks=ticks)
    cax.set_yticklabels(labels, fontsize=8)


def save_quicklook(path, cloudy, sar, prediction, target, confidence, title="", uncertainty=None):
    """One labelled PNG row cloudy | SAR | prediction | target | confidence (| uncertainty); (C,H,W) tensors in [0,1].
    RGB panels use the fixed stretch of bands.s2_to_rgb (reflectance 0-0.3) unresampled but for a whole-number
    enlargement, so panels compare across images; confidence is a heat map with its colour bar (0 clear .. 1
    cloudy); uncertainty, a (1,H,W) standard deviation, another with its own (0 .. QUICKLOOK_STD_MAX)."""
    from matplotlib.figure import Figure  # matplotlib only where a PNG is asked for

    layout = quicklook_layout(*cloudy.shape[-2:], uncertainty=uncertainty is not None)
    (fig_h, fig_w), scale = layout["size"], layout["scale"]
    images = _quicklook_images(cloudy, sar, prediction, target, confidence, uncertainty)
    fig = Figure(figsize=(fig_w / QUICKLOOK_DPI, fig_h / QUICKLOOK_DPI), dpi=QUICKLOOK_DPI, facecolor="white")
    at = lambda top, left: (left / fig_w, 1 - top / fig_h)  # PNG pixel -> figure fraction
    fig.text(*at(6, _QL_MARGIN), f"{title}   RGB = B4, B3, B2, reflectance 0-0.3", va="top", fontsize=10)
    for (top, left), label, img in zip(layout["panels"], QUICKLOOK_PANELS + (UNCERTAINTY_PANEL,), images):
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        fig.figimage(big, xo=left, yo=fig_h - top - big.shape[0], origin="upper")
        fig.text(*at(top - 5, left), label, va="bottom", fontsize=10, weight="bold")
    top, left, height, width = layout["colorbar"]
    if confidence is None:
        x, y = at(top + height / 2, layout["panels"][4][1] + 8)
        fig.text(x, y, "no confidence map:\nthis model predicts none", va="center", fontsize=9)
    else:
        _colour_bar(fig, at, layout["colorbar"], QUICKLOOK_CMAP, [0, 0.5, 1], ["0 clear", "0.5", "1 cloudy"])
    if uncertainty is not None:
        _colour_bar(fig, at, layout["colorbars"][1], UNCERTAINTY_CMAP, [0, 0.5, 1],
                    ["0", f"{QUICKLOOK_STD_MAX / 2:g}", f">= {QUICKLOOK_STD_MAX:g}"])
    with files.atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=QUICKLOOK_DPI)


CALIBRATION_COLOURS = {"all": "black", "cloudy": "tab:blue", "clear": "tab:orange"}


def save_calibration_plot(path, uncertainty):
    """PNG of the calibration over pixels: each UCE bin's RMSE against its root mean variance (the predicted
    uncertainty), per region, marker area by the bin's share of pixels, on log axes with the diagonal of a perfect
    calibration drawn. Returns the path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(5.5, 5), dpi=QUICKLOOK_DPI)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    points = []
    for region, colour in CALIBRATION_COLOURS.items():
        figures = uncertainty["regions"].get(region)
        if figures is None:
            continue
        bins = figures["pixel_bins"]
        kept = [(x, y, w) for x, y, w in zip(bins["rmv"], bins["rmse"], bins["weight"]) if x and y]
        points += kept
        ax.scatter([x for x, _, _ in kept], [y for _, y, _ in kept], s=[8 + 400 * w for _, _, w in kept],
                   color=colour, alpha=0.6, label=f"{region}: UCE {figures['uce_pixels']:.4f}")
    if points:
        lo, hi = min(min(x, y) for x, y, _ in points) / 1.5, max(max(x, y) for x, y, _ in points) * 1.5
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="perfect calibration")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    for axis in (ax.xaxis, ax.yaxis):  # 1-2-5 ticks in plain numbers: a decade or less is shown, often
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predicted uncertainty of the bin (root mean variance)")
    ax.set_ylabel("RMSE of the bin")
    ax.set_title(f"calibration over pixels, {uncertainty['source']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with files.atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# ----------------------------------------------------------------------------- evaluation

def score_batch(prediction, target, cloud_mask, threshold):
    """{region: {metric: (N,) tensor}} for one predictor, via metrics.py only."""
    halves = metrics.masked_metrics(prediction, target, cloud_mask, threshold=threshold)
    return {"all": metrics.compute_metrics(prediction, target), "cloudy": halves["cloudy"], "clear": halves["clear"]}


def confidence_scores(confidence, prediction, cloudy, mask, true_mask=None):
    """{CONFIDENCE_COLUMNS name: (N,) tensor} of a batch; mask: the binary cloud mask in use, true_mask: the true
    one where the data has it. Clear pixels are those of the true map where it exists, else those of the mask."""
    clear = ~(mask if true_mask is None else true_mask)
    n = prediction.shape[0]
    nan = torch.full((n,), float("nan"))
    change = (prediction - cloudy).abs().mean(dim=1, keepdim=True)  # mean over bands, then over clear pixels
    out = {"model_clear_change": ((change * clear).sum(dim=(1, 2, 3)) / clear.sum(dim=(1, 2, 3))).cpu()}
    if confidence is None:  # DSen2CR, or no cloud predictor: nothing to score
        return {**out, **{k: nan for k in CONFIDENCE_COLUMNS if k != "model_clear_change"}}
    out["conf_mean_clear"] = ((confidence * clear).sum(dim=(1, 2, 3)) / clear.sum(dim=(1, 2, 3))).cpu()
    out["conf_auc_mask"], out["conf_iou_mask"] = metrics.roc_auc(confidence, mask), metrics.iou(confidence >= 0.5, mask)
    if true_mask is None:
        out["conf_auc_truth"] = out["conf_iou_truth"] = nan
    else:
        out["conf_auc_truth"] = metrics.roc_auc(confidence, true_mask)
        out["conf_iou_truth"] = metrics.iou(confidence >= 0.5, true_mask)
    return {k: v.cpu().float() for k, v in out.items()}


def column(predictor, region, metric):
    return f"{predictor}_{metric}" if region == "all" else f"{predictor}_{region}_{metric}"


# The confidence map scored as a cloud detector (against the mask in use, and the true cloud map where the data has
# one), its mean on clear pixels, and how much the model changed clear pixels (the identity changes nothing).
CONFIDENCE_COLUMNS = ("conf_auc_mask", "conf_iou_mask", "conf_auc_truth", "conf_iou_truth", "conf_mean_clear",
                      "model_clear_change")
# The predicted uncertainty per image: the mean standard deviation (over bands and the region's pixels), the mean
# variance (UCE's per-image input), the means of the aleatoric and epistemic parts' standard deviations, and the
# image's mean signed error (target - prediction over bands and pixels: UnCRtainTS's per-image error, its UCE's input).
UNCERTAINTY_COLUMNS = tuple(f"unc_{q}{'' if r == 'all' else '_' + r}" for q in ("std", "var") for r in REGIONS) + (
    "unc_aleatoric_std", "unc_epistemic_std", "unc_mean_error")
CSV_COLUMNS = (["file_name", "cloud_cover"] + [column(p, r, m) for r in REGIONS for m in METRIC_NAMES
                                               for p in PREDICTORS] + list(CONFIDENCE_COLUMNS)
               + list(UNCERTAINTY_COLUMNS))
# Pixels per image kept for the pooled uncertainty figures (Spearman, pixel UCE, sparsification): a random subset
# where an image has more, so memory stays bounded on the whole test split (7,899 images of 256 px would be 518 M
# pixels); 64 px patches are kept whole.
UNCERTAINTY_PIXELS_PER_IMAGE = 4096


# ----------------------------------------------------------------------------- predicted uncertainty

UNCERTAINTY_BAND_DESCRIPTIONS = tuple(f"{band} predicted standard deviation (reflectance, 0-1)"
                                      for band in bands.S2_BANDS)


def _region_means(values, cloudy):
    """{"all", "cloudy", "clear"}: (N,) means of values (N,C,H,W) over the bands and the region's pixels (NaN where an
    image has none); cloudy: the (N,1,H,W) bool mask in use."""
    def mean(selected):
        return (values * selected).sum(dim=(1, 2, 3)) / (selected.sum(dim=(1, 2, 3)) * values.shape[1])
    return {"all": values.mean(dim=(1, 2, 3)), "cloudy": mean(cloudy.float()), "clear": mean(1.0 - cloudy.float())}


def uncertainty_scores(out, cloudy, target):
    """{UNCERTAINTY_COLUMNS name: (N,) tensor} of a batch's forward_all output; NaN where there is no such part."""
    n = out["prediction"].shape[0]
    nan = torch.full((n,), float("nan"))
    if out["variance"] is None:
        return dict.fromkeys(UNCERTAINTY_COLUMNS, nan)
    cols = {}
    for quantity, values in (("std", out["variance"].sqrt()), ("var", out["variance"])):
        for region, mean in _region_means(values, cloudy).items():
            cols[f"unc_{quantity}{'' if region == 'all' else '_' + region}"] = mean
    for part in ("aleatoric", "epistemic"):
        cols[f"unc_{part}_std"] = nan if out[part] is None else out[part].sqrt().mean(dim=(1, 2, 3))
    cols["unc_mean_error"] = (target - out["prediction"]).mean(dim=(1, 2, 3))
    return {k: v.cpu().float() for k, v in cols.items()}


def sample_pixels(out, target, cloudy, generator, cap=UNCERTAINTY_PIXELS_PER_IMAGE):
    """Per-pixel figures of up to `cap` random pixels of each image (every pixel where it has no more), as 1-D numpy
    arrays: "std" and "var" (the means over bands of the predicted standard deviation and variance), "se" and "ae"
    (of the squared and absolute error of the finished prediction) and "cloudy" (the mask in use)."""
    error = out["prediction"] - target
    flat = {"std": out["variance"].sqrt().mean(1), "var": out["variance"].mean(1), "se": error.square().mean(1),
            "ae": error.abs().mean(1), "cloudy": cloudy[:, 0]}
    flat = {k: v.flatten(1) for k, v in flat.items()}
    n, pixels = flat["std"].shape
    if pixels > cap:
        picks = torch.stack([torch.randperm(pixels, generator=generator)[:cap] for _ in range(n)])
        flat = {k: v.gather(1, picks.to(v.device)) for k, v in flat.items()}
    return {k: v.flatten().cpu().numpy() for k, v in flat.items()}


def _finite(value):
    """JSON-safe: NaN (no such samples) -> None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _drops(removed, rmse):
    """{percent removed: % by which the RMSE fell} at metrics.SPARSIFICATION_REPORTED, from a sparsification curve."""
    return {f"{round(f * 100)}": 100.0 * (1.0 - rmse[removed.index(f)] / rmse[0])
            for f in metrics.SPARSIFICATION_REPORTED}


def _uncertainty_region(px, per_image, region):
    """The pooled figures of one region: Spearman, UCE/AUCE over pixels and over images (each beside the constant-
    uncertainty baseline's: the mean variance), the sparsification curve with its drops at the reported fractions,
    and for the whole images ("all") UCE/AUCE as UnCRtainTS's released code computes them; None without pixels."""
    if px["std"].size < 2:
        return None
    suffix = "" if region == "all" else "_" + region
    pixels = metrics.uce_auce(px["var"], np.sqrt(px["se"]))
    constant = metrics.uce_auce(metrics.constant_uncertainty(px["var"]), np.sqrt(px["se"]))
    images = [(row[f"unc_var{suffix}"], row[column("model", region, "RMSE")], row[f"unc_std{suffix}"])
              for row in per_image]
    images = np.array([t for t in images if not any(math.isnan(v) for v in t)]).reshape(-1, 3)
    by_image = image_constant = None
    if len(images):
        by_image = metrics.uce_auce(images[:, 0], images[:, 1])
        image_constant = metrics.uce_auce(metrics.constant_uncertainty(images[:, 0]), images[:, 1])
    theirs = None
    if region == "all":  # UnCRtainTS's samples are whole images: their mean variance and mean signed error
        signed = np.array([(row["unc_var"], row["unc_mean_error"]) for row in per_image]).reshape(-1, 2)
        signed = signed[~np.isnan(signed).any(axis=1)]
        theirs = metrics.uce_auce_uncrtaints(signed[:, 0], signed[:, 1]) if len(signed) else None
    curve = metrics.sparsification(px["std"], px["se"])
    return {"n_pixels": int(px["std"].size), "mean_std": float(px["std"].mean()),
            "rmse": float(np.sqrt(px["se"].mean())),
            "spearman": _finite(metrics.spearman(px["std"], px["ae"])),
            "uce_pixels": pixels["uce"], "auce_pixels": pixels["auce"], "uce_pixels_constant": constant["uce"],
            "uce_images": by_image and by_image["uce"], "auce_images": _finite(by_image and by_image["auce"]),
            "uce_images_constant": image_constant and image_constant["uce"],
            "uce_uncrtaints": theirs and _finite(theirs["uce"]), "auce_uncrtaints": theirs and _finite(theirs["auce"]),
            "rmse_drop_pct": _drops(curve["removed"], curve["rmse"]),
            "oracle_rmse_drop_pct": _drops(curve["removed"], curve["oracle_rmse"]),
            "sparsification_area": curve["area_between"], "sparsification": curve,
            "pixel_bins": {k: [_finite(v) for v in pixels[f"bin_{k}"]] for k in ("rmv", "rmse", "weight")}}


def summarise_uncertainty(per_image, pooled, source):
    """The uncertainty block of summary.json; None for a model that predicts no uncertainty."""
    if source is None or not pooled.get("pixels"):
        return None
    px = {k: np.concatenate([p[k] for p in pooled["pixels"]]) for k in pooled["pixels"][0]}
    selections = {"all": np.ones_like(px["cloudy"]), "cloudy": px["cloudy"], "clear": ~px["cloudy"]}
    regions = {r: _uncertainty_region({k: v[sel] for k, v in px.items()}, per_image, r)
               for r, sel in selections.items()}
    mean_std = {r: None if regions[r] is None else regions[r]["mean_std"] for r in REGIONS}
    ratio = None if None in (mean_std["cloudy"], mean_std["clear"]) else mean_std["cloudy"] / mean_std["clear"]
    return {"source": source, "unit": "standard deviation of reflectance (0-1 scale)",
            "pixels_sampled": int(px["std"].size), "pixels_per_image_cap": UNCERTAINTY_PIXELS_PER_IMAGE,
            "mean_std": mean_std, "cloudy_clear_ratio": ratio,
            "aleatoric_std": _nanmean([row["unc_aleatoric_std"] for row in per_image]),
            "epistemic_std": _nanmean([row["unc_epistemic_std"] for row in per_image]), "regions": regions}


def cover_bin(cover_percent):
    for lo, hi in COVER_BINS:
        if lo <= cover_percent < hi or (hi == 100 and cover_percent == 100):
            return f"{lo}-{hi}"
    raise ValueError(f"cloud cover {cover_percent} outside [0, 100]")


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None  # None -> JSON null: no image had such pixels


def summarise(rows):
    """Means per predictor and region over rows (NaN, i.e. no such pixels in an image, skipped)."""
    return {p: {r: {m: _nanmean([row[column(p, r, m)] for row in rows]) for m in METRIC_NAMES} for r in REGIONS}
            for p in PREDICTORS}


def format_table(summary, bins):
    out = io.StringIO()
    header = f"{'region':<8}{'metric':<7}{'model':>10}{'identity':>10}{'gain':>10}"
    out.write(header + "\n" + "-" * len(header) + "\n")
    fmt = lambda v: f"{v:>10.4f}" if v is not None else f"{'-':>10}"
    for r in REGIONS:
        for m in METRIC_NAMES:
            a, b = summary["model"][r][m], summary["identity"][r][m]
            gain = None if a is None or b is None else a - b
            out.write(f"{r:<8}{m:<7}{fmt(a)}{fmt(b)}{fmt(gain)}\n")
    out.write(f"\nby cloud cover (PSNR / SSIM, model vs identity)\n{'bin %':<8}{'n':>4}"
              f"{'PSNR model':>12}{'PSNR ident':>12}{'SSIM model':>12}{'SSIM ident':>12}\n")
    for name, b in bins.items():
        s = b["mean"]
        out.write(f"{name:<8}{b['n']:>4}  {fmt(s['model']['all']['PSNR'])}  {fmt(s['identity']['all']['PSNR'])}"
                  f"  {fmt(s['model']['all']['SSIM'])}  {fmt(s['identity']['all']['SSIM'])}\n")
    return out.getvalue()


def image_rows(batch, scores, cover, confidence_cols):
    """One CSV row per image of a scored batch."""
    rows = []
    for i, name in enumerate(batch["file_name"]):
        row = {"file_name": name, "cloud_cover": float(cover[i])}
        for p in PREDICTORS:
            for r in REGIONS:
                for m in METRIC_NAMES:
                    row[column(p, r, m)] = float(scores[p][r][m][i])
        row.update({k: float(v[i]) for k, v in confidence_cols.items()})
        rows.append(row)
    return rows


def save_outputs(args, results, batch, cloudy, sar, out, target, first_index=0):
    """--save_geotiff / --save_confidence / --save_uncertainty / --save_png for each image of a batch (out: the batch's
    forward_all output; its first image is image first_index of the split), up to --save_first images in all."""
    prediction, confidence = out["prediction"], out["confidence"]
    std = None if out["variance"] is None else out["variance"].sqrt().cpu()
    for i, name in enumerate(batch["file_name"]):
        if args.save_first is not None and first_index + i >= args.save_first:
            break
        stem = Path(name).stem
        if args.save_geotiff or args.save_uncertainty or (args.save_confidence and confidence is not None):
            crs, transform = dataloader.raster_georef(batch["cloudy_path"][i], batch["window"][i].tolist())
        if args.save_geotiff:
            dataloader.write_s2_geotiff(results / "geotiff" / f"{stem}.tif", prediction[i].cpu(), crs, transform)
        if args.save_confidence and confidence is not None:
            dataloader.write_float_geotiff(results / "confidence" / f"{stem}.tif", confidence[i].cpu(), crs, transform,
                                           description="cloud confidence (0 clear .. 1 cloudy)")
        if args.save_uncertainty:  # setup_evaluation made sure the model predicts one
            dataloader.write_float_geotiff(results / "uncertainty" / f"{stem}.tif", std[i], crs, transform,
                                           description=UNCERTAINTY_BAND_DESCRIPTIONS)
        if args.save_png:
            save_quicklook(results / "png" / f"{stem}.png", cloudy[i].cpu(), sar[i].cpu(), prediction[i].cpu(),
                           target[i].cpu(), None if confidence is None else confidence[i].cpu(), title=stem,
                           uncertainty=None if std is None else std[i].mean(0, keepdim=True))


def csv_row(row):
    """repr keeps every float bit; NaN (no such pixels in the image) is written as "nan"."""
    return {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}


def write_results(results, per_image, summary):
    """metrics.csv and summary.json, atomically; then the partial CSV of the run is no longer needed."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_row(row) for row in per_image)
    files.write_text_atomic(results / "metrics.csv", buf.getvalue())
    files.write_text_atomic(results / "summary.json", json.dumps(summary, indent=2))
    (results / PARTIAL_CSV).unlink(missing_ok=True)


def truth_bin_masks(cloud_truth):
    """(N,2,H,W) true opacity and shadow -> {bin name: bool (N,H,W)}. A bin may be empty; the bins overlap only
    where a name says so (the opacity bins and the two edge bins each split the cloudy pixels)."""
    opacity, shadow = cloud_truth[:, 0], cloud_truth[:, 1]
    cloud = opacity > dataloader.TRUTH_THRESHOLD
    masks = {"clear": ~cloud & (shadow <= dataloader.TRUTH_THRESHOLD),
             "shadow, no cloud": ~cloud & (shadow > dataloader.TRUTH_THRESHOLD)}
    masks.update({f"opacity {lo}-{hi}": (opacity > lo) & (opacity <= hi) for lo, hi in OPACITY_BINS})
    # A patch's border is not a cloud's edge: a patch without clear pixels has all of its cloud "inside".
    distance = torch.from_numpy(np.stack([ndimage.distance_transform_edt(c) if (~c).any() else np.full(c.shape, np.inf)
                                          for c in cloud.cpu().numpy()])).to(cloud.device)
    masks[f"cloud, edge {EDGE_PX} px"] = cloud & (distance <= EDGE_PX)
    masks["cloud, inside"] = cloud & (distance > EDGE_PX)
    return masks


def accumulate_truth_bins(pooled, cloud_truth, predictions, target):
    """Add a batch's squared error per true-cloud bin, per predictor, to pooled["truth_bins"]."""
    sums = pooled.setdefault("truth_bins", {})
    errors = {name: ((p - target) ** 2).mean(dim=1) for name, p in predictions.items()}  # (N,H,W), mean over bands
    for name, mask in truth_bin_masks(cloud_truth).items():
        entry = sums.setdefault(name, {"pixels": 0, **{p: 0.0 for p in predictions}})
        entry["pixels"] += int(mask.sum())
        for predictor, error in errors.items():
            entry[predictor] += float(error[mask].double().sum())


def summarise_truth_bins(pooled):
    """{bin: {"pixels", "PSNR_model", "PSNR_identity"}} from the pooled squared errors (PSNR None for an empty bin,
    capped like metrics.psnr); None without true cloud maps."""
    if "truth_bins" not in pooled:
        return None
    out = {}
    for name, entry in pooled["truth_bins"].items():
        n = entry["pixels"]  # every pixel has every band: the mean of the per-pixel band means is the pooled MSE
        psnr = {p: None if n == 0 else min(metrics.PSNR_CAP, -10 * math.log10(max(entry[p] / n, 1e-30)))
                for p in PREDICTORS}
        out[name] = {"pixels": entry["pixels"], **{f"PSNR_{p}": v for p, v in psnr.items()}}
    return out


def format_truth_bins(bins):
    fmt = lambda v: f"{'-':>9}" if v is None else f"{v:>9.2f}"
    lines = [f"PSNR by true cloud (squared error pooled over each bin's pixels)\n{'pixels':<26}{'n':>8}{'model':>9}"
             f"{'identity':>9}"]
    lines += [f"{name:<26}{b['pixels']:>8}{fmt(b['PSNR_model'])}{fmt(b['PSNR_identity'])}" for name, b in bins.items()]
    return "\n".join(lines)


def accumulate_histograms(pooled, confidence, mask, true_mask):
    """Add a batch's confidence histograms (against the mask, and the truth if any) to the data set's."""
    for key, labels in (("auc_mask", mask), ("auc_truth", true_mask)):
        if labels is not None:
            counts = metrics.auc_histograms(confidence, labels)
            pooled[key] = counts if key not in pooled else tuple(a + b for a, b in zip(pooled[key], counts))


def summarise_confidence(per_image, pooled):
    """Means over images (NaN skipped: an image with one class has no AUC) and the AUC pooled over all pixels;
    None for a model without a confidence map (nothing was pooled)."""
    if "auc_mask" not in pooled:
        return None
    out = {name[len("conf_"):]: _nanmean([row[name] for row in per_image])
           for name in CONFIDENCE_COLUMNS if name.startswith("conf_")}
    for key in ("auc_mask", "auc_truth"):
        out[f"{key}_pooled"] = metrics.auc_from_histograms(*pooled[key]) if key in pooled else None
    return out


def describe_checkpoints(paths, ckpts):
    """summary.json's "checkpoint", "model_name" and "epoch": as before for one checkpoint, lists for an ensemble."""
    if len(paths) == 1:
        return {"checkpoint": str(paths[0]), "model_name": ckpts["model_name"], "epoch": ckpts.get("epoch")}
    return {"checkpoint": [str(p) for p in paths], "model_name": f"Ensemble of {len(ckpts)} "
            + "/".join(sorted({c["model_name"] for c in ckpts})), "epoch": [c.get("epoch") for c in ckpts]}


def summarise_run(args, ckpt, model, device, amp_dtype, per_image, seconds, t_model, pooled, leaks):
    bins = {}
    for lo, hi in COVER_BINS:
        name = f"{lo}-{hi}"
        members = [row for row in per_image if cover_bin(row["cloud_cover"]) == name]
        bins[name] = {"n": len(members), "mean": summarise(members)}
    return {
        **describe_checkpoints(args.checkpoint, ckpt),
        "data_list": str(args.data_list_filepath), "split": args.split, "n_images": len(per_image),
        # What was scored: "full" (whole patches), "glfcr" (centred 128 of 256) or "custom" (other sizes).
        "protocol": args.protocol, "load_size": args.load_size, "crop_size": args.crop_size,
        "cloud_threshold": args.cloud_threshold,
        "cloud_detector": args.cloud_detector if not args.cloud_mask_dir else
        f"{dataloader.check_mask_dir(args.cloud_mask_dir, [])} (precomputed in {args.cloud_mask_dir})",
        # The binary mask behind the cloudy/clear scores and bins, and the list's split rule and leak check: what a
        # reader needs to tell whether two runs' figures compare.
        "cloud_mask": dataloader.describe_cloud_mask(args.cloud_detector, args.cloud_threshold, args.cloud_mask_dir),
        "split_rule": leaks.split_rule, "leak_check": leaks.to_json(),
        "device": str(device), "amp": runtime.amp_name(amp_dtype),
        # A model trained with --sar_input zeros (the radar ablation) sees zeros here too: it is in its config.
        "sar_input": model.sar_input,
        "clamping": "prediction clamped to [0,1] and rounded to the uint16 x10000 grid before scoring and saving",
        "mean": summarise(per_image), "cloud_cover_bins": bins,
        "confidence": summarise_confidence(per_image, pooled),
        "truth_bins": summarise_truth_bins(pooled),
        "uncertainty": summarise_uncertainty(per_image, pooled, uncertainty_source(model)),
        "clear_change": {"model": _nanmean([row["model_clear_change"] for row in per_image]), "identity": 0.0},
        "images_per_s": len(per_image) / seconds, "model_images_per_s": len(per_image) / max(t_model, 1e-9),
    }


def format_confidence(summary):
    """Lines saying what the confidence map is worth as a cloud map, and how much clear pixels were changed."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"clear pixels changed by the model: mean |prediction - cloudy| = {fmt(summary['clear_change']['model'])}"
             f" (identity: 0)"]
    c = summary["confidence"]
    if c is not None:
        lines.append(f"confidence map vs the {summary['cloud_detector']} mask: ROC AUC {fmt(c['auc_mask'])} "
                     f"(pooled {fmt(c['auc_mask_pooled'])}), IoU at 0.5 {fmt(c['iou_mask'])}; "
                     f"mean on clear pixels {fmt(c['mean_clear'])}")
        if c["auc_truth"] is not None:
            lines.append(f"confidence map vs the true cloud map: ROC AUC {fmt(c['auc_truth'])} "
                         f"(pooled {fmt(c['auc_truth_pooled'])}), IoU at 0.5 {fmt(c['iou_truth'])}")
    return "\n".join(lines)


def format_uncertainty(u):
    """Lines saying how the predicted uncertainty ranks and matches the error, per region."""
    fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)
    lines = [f"predicted uncertainty: {u['source']}; std of reflectance, {u['pixels_sampled']} pixels pooled "
             f"(at most {u['pixels_per_image_cap']} per image)",
             f"mean std: all {fmt(u['mean_std']['all'])}, cloudy {fmt(u['mean_std']['cloudy'])}, clear "
             f"{fmt(u['mean_std']['clear'])} (cloudy / clear {fmt(u['cloudy_clear_ratio'], '.2f')}); aleatoric "
             f"{fmt(u['aleatoric_std'])}, epistemic {fmt(u['epistemic_std'])}",
             f"{'region':<8}{'Spearman':>9}{'UCE px':>9}{'(const)':>9}{'UCE img':>9}{'(const)':>9}{'area':>7}"
             f"   RMSE change after removing the 5/10/25/50 % most uncertain pixels (the oracle's)"]
    for region in REGIONS:
        r = u["regions"][region]
        if r is None:
            lines.append(f"{region:<8}  no pixels")
            continue
        drops = "/".join(f"{-v:.0f}" for v in r["rmse_drop_pct"].values())
        oracle = "/".join(f"{-v:.0f}" for v in r["oracle_rmse_drop_pct"].values())
        lines.append(f"{region:<8}{fmt(r['spearman'], '.3f'):>9}{fmt(r['uce_pixels']):>9}"
                     f"{fmt(r['uce_pixels_constant']):>9}{fmt(r['uce_images']):>9}{fmt(r['uce_images_constant']):>9}"
                     f"{r['sparsification_area']:>7.3f}   {drops} % ({oracle} %)")
    theirs = u["regions"]["all"] and u["regions"]["all"].get("uce_uncrtaints")
    if theirs is not None:
        lines.append(f"UnCRtainTS's UCE / AUCE (their released code: whole images, mean signed error), to compare with "
                     f"their tables: {fmt(theirs)} / {fmt(u['regions']['all']['auce_uncrtaints'])}")
    return "\n".join(lines)


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


def setup_evaluation(args):
    """Everything before the first image, inputs first: flags and device; then the results folder (checked, not yet
    created), the data list with the header of every file of the split, and the checkpoint, reported together when
    several are wrong; the leak check; only then the results folder is created. Returns (results, made, device,
    amp_dtype, model, ckpt, loader, leaks); made: the outermost folder this run created (None: it existed)."""
    resolve_eval_flags(args)
    device, amp_dtype = resolve_device_and_amp(args)
    results = Path(args.results_dir)
    folders = [results] + [results / sub for sub, wanted in (
        ("geotiff", args.save_geotiff), ("png", args.save_png), ("confidence", args.save_confidence),
        ("uncertainty", args.save_uncertainty)) if wanted]

    def read_rows():
        rows = dataloader.select_split(dataloader.read_data_list(args.data_list_filepath), args.split,
                                       source=str(args.data_list_filepath))
        dataloader.check_listed_files(rows, args.input_data_folder,
                                      f"the {args.split} split of {args.data_list_filepath}")
        return rows

    _, rows, (model, ckpt) = runtime.check_together(
        lambda: [ensure_writable_dir(folder, "--results_dir") for folder in folders], read_rows,
        lambda: runtime.load_models(args.checkpoint, device))
    check_uncertainty_wanted(args, model)
    dataset = dataloader.SEN12MSCRDataset(rows, args.input_data_folder, crop_size=args.crop_size,
                                          load_size=args.load_size, augment=False,
                                          cloud_detector=args.cloud_detector, cloud_threshold=args.cloud_threshold,
                                          cloud_mask_dir=args.cloud_mask_dir)
    loader = DataLoader(dataset, batch_size=args.batch_sz, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    leaks = dataloader.startup_leak_check(args.data_list_filepath, args.input_data_folder)
    warning = dataloader.leak_warning(leaks, splits.SPLIT_PAIRS, args.input_data_folder)
    if warning:
        print(warning + " (recorded in summary.json)", file=sys.stderr)
    made = files.outermost_new_folder(results)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return results, made, device, amp_dtype, model, ckpt, loader, leaks


def evaluate_batch(args, results, model, ctx, device, batch, pooled, first_index=0):
    """Predict, score and save one batch (its first image is image first_index of the split); adds its confidence
    histograms and a sample of its pixels' uncertainty to `pooled`. Returns (CSV rows, seconds spent in the model)."""
    cloudy, target, sar, cloud_mask = (batch[k].to(device) for k in
                                       ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask"))
    t0 = time.perf_counter()
    out = forward_all(model, cloudy, sar, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    prediction, confidence = out["prediction"], out["confidence"]
    identity = bands.finish_s2(cloudy)
    scores = {"model": score_batch(prediction, target, cloud_mask, args.cloud_threshold),
              "identity": score_batch(identity, target, cloud_mask, args.cloud_threshold)}
    # Same pixels as masked_metrics and the dataset count as cloudy (score >= threshold).
    mask = cloud_mask >= args.cloud_threshold
    cover = mask.float().mean(dim=(1, 2, 3)) * 100.0
    true_mask = dataloader.truth_mask(batch["cloud_truth"].to(device)) if "cloud_truth" in batch else None
    conf_cols = confidence_scores(confidence, prediction, identity, mask, true_mask)
    if confidence is not None:
        accumulate_histograms(pooled, confidence, mask, true_mask)
    if "cloud_truth" in batch:
        accumulate_truth_bins(pooled, batch["cloud_truth"].to(device), {"model": prediction, "identity": identity},
                              target)
    if out["variance"] is not None:  # a fixed seed: the same pixels are drawn on every run
        generator = pooled.setdefault("generator", torch.Generator().manual_seed(0))
        pooled.setdefault("pixels", []).append(sample_pixels(out, target, mask, generator))
    save_outputs(args, results, batch, cloudy, sar, out, target, first_index)
    return image_rows(batch, scores, cover, {**conf_cols, **uncertainty_scores(out, mask, target)}), seconds


def evaluate(args):
    """Score every image of the split; write metrics.csv and summary.json (and GeoTIFF/PNG outputs). Rows are
    also appended to metrics.partial.csv as they are scored, so a run that stops part-way keeps them."""
    results, made, device, amp_dtype, model, ckpt, loader, leaks = setup_evaluation(args)
    ctx = runtime.autocast(device, amp_dtype)
    per_image, t_model, t0 = [], 0.0, time.perf_counter()
    pooled = {}  # summed confidence histograms and sampled pixels, for the figures pooled over the whole split
    try:
        with open(results / PARTIAL_CSV, "w", newline="") as partial:
            partial_rows = csv.DictWriter(partial, fieldnames=CSV_COLUMNS)
            partial_rows.writeheader()
            for batch in tqdm(loader, desc=f"evaluating {args.split}", dynamic_ncols=True):
                rows, seconds = evaluate_batch(args, results, model, ctx, device, batch, pooled, len(per_image))
                t_model += seconds
                per_image += rows
                partial_rows.writerows(csv_row(row) for row in rows)
                partial.flush()
    except BaseException:
        if not per_image:  # stopped before the first image was scored: nothing to keep
            (results / PARTIAL_CSV).unlink(missing_ok=True)
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
        raise
    summary = summarise_run(args, ckpt, model, device, amp_dtype, per_image, time.perf_counter() - t0, t_model,
                            pooled, leaks)
    if summary["uncertainty"] is not None:
        summary["uncertainty"]["calibration_plot"] = str(save_calibration_plot(results / "calibration.png",
                                                                               summary["uncertainty"]))
    write_results(results, per_image, summary)
    print(f"{summary['model_name']} from {' '.join(map(str, args.checkpoint))} on {len(per_image)} {args.split} images "
          f"({args.data_list_filepath}); protocol {args.protocol}, device {device}, "
          f"{runtime.describe_amp(args.amp, device)[0]}")
    print(format_table(summary["mean"], summary["cloud_cover_bins"]))
    print(format_confidence(summary))
    if summary["truth_bins"] is not None:
        print(format_truth_bins(summary["truth_bins"]))
    if summary["uncertainty"] is not None:
        print(format_uncertainty(summary["uncertainty"]))
    print(f"{summary['images_per_s']:.2f} images/s; per-image scores in {results / 'metrics.csv'}, "
          f"means in {results / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------- whole-scene prediction

def tile_starts(length, tile, overlap):
    """Start offsets of tiles of side min(tile, length) covering [0, length); the last one ends at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def feather(n, overlap):
    """1-D blending weight of a tile of n pixels: a linear ramp over `overlap` pixels at each end, 1 inside.
    Strictly positive (the outermost pixel weighs 0.5/overlap), so scene borders, covered by one tile
    only, still get that tile's value after normalisation."""
    i = np.arange(n, dtype=np.float32)
    if overlap <= 0:
        return np.ones(n, dtype=np.float32)
    return np.minimum(1.0, np.minimum(i + 0.5, n - i - 0.5) / overlap).astype(np.float32)


def scene_sar_fill_db(sar_src, strip=256):
    """Per-band dB value that normalize_s1 maps to the scene mean of the normalised finite pixels.

    The dataset fills an S1 NaN with the band mean of the image it reads; filling per tile would make the value
    depend on the tiling (visible as a seam through a NaN hole). One strip-wise pass over the two SAR bands
    finds the scene mean instead; it is written into each tile's NaN pixels before normalize_s1."""
    sums = np.zeros(len(bands.S1_BANDS), np.float64)
    counts = np.zeros(len(bands.S1_BANDS), np.int64)
    for y in range(0, sar_src.height, strip):
        raw = dataloader.read_window(sar_src, (y, 0, min(strip, sar_src.height - y), sar_src.width))
        valid = ~np.isnan(raw)
        normed = bands.normalize_s1(raw)  # only NaN pixels are changed by the fill: valid ones are exact
        sums += np.where(valid, normed, 0).sum(axis=(1, 2), dtype=np.float64)
        counts += valid.sum(axis=(1, 2))
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)  # all-NaN band -> 0, as dataloader
    return bands.s1_db_of(means)


def check_scene_pair(cloudy_src, sar_src):
    """S1 and S2 must share size, and CRS and transform where both files carry one (dataloader.grid_problems, the
    rule of the dataset's triplets); the error names both files."""
    if cloudy_src.count != len(bands.S2_BANDS):
        raise files.DataError(f"{cloudy_src.name}: expected {len(bands.S2_BANDS)} Sentinel-2 bands, "
                                   f"found {cloudy_src.count}")
    if sar_src.count != len(bands.S1_BANDS):
        raise files.DataError(f"{sar_src.name}: expected {len(bands.S1_BANDS)} Sentinel-1 bands "
                                   f"(VV, VH), found {sar_src.count}")
    problems = dataloader.grid_problems(sar_src, cloudy_src)
    if problems:
        raise files.DataError(f"{sar_src.name} and {cloudy_src.name} are not on the same grid: "
                                   + "; ".join(problems) + " (resample the SAR onto the Sentinel-2 grid first)")


def _read_s2(src, window):
    raw = dataloader.read_window(src, window)
    dataloader.check_s2_encoding(raw, src.name)  # float [0, 1] reflectance would give a black scene
    return raw


def _fill(raw_db, fill_db):
    nan = np.isnan(raw_db)
    if nan.any():
        raw_db[nan] = np.broadcast_to(fill_db[:, None, None], raw_db.shape)[nan]
    return raw_db


@contextlib.contextmanager
def _scene_output(path, cloudy_src, dtype="uint16", descriptions=None):
    """An open output GeoTIFF of predict_scene: the input's size, CRS and transform, 13 bands, tiled, deflate."""
    height, width = cloudy_src.height, cloudy_src.width
    profile = dict(driver="GTiff", height=height, width=width, count=len(bands.S2_BANDS), dtype=dtype,
                   crs=cloudy_src.crs, transform=cloudy_src.transform, compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER")
    # GDAL's block cache (default 5% of RAM) would grow with the scene; two rows of 256 px output blocks
    # (13 bands) plus 32 MB for the input reads is all predict_scene ever revisits.
    block_row = math.ceil(width / 256) * 256 * 256 * len(bands.S2_BANDS) * np.dtype(dtype).itemsize
    cache_mb = 32 + 2 * block_row // 2 ** 20
    with rasterio.Env(GDAL_CACHEMAX=cache_mb), warnings.catch_warnings():
        # An input without georeferencing gives an output without it, as it should.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            for band, text in enumerate(descriptions or (), start=1):
                dst.set_band_description(band, text)
            yield dst


class BlendedStrip:
    """The rows of a whole-scene output that tiles still add to: feather-weighted sums of `bands` bands and the sum of
    the weights, for the `height` scene rows from `top` on (one row of tiles)."""

    def __init__(self, bands, height, width):
        self.acc = np.zeros((bands, height, width), dtype=np.float32)
        self.wsum = np.zeros((height, width), dtype=np.float32)
        self.top = 0  # scene row of acc[:, 0]

    def add(self, y, x, values, weight):
        """Add a tile's (bands, h, w) values at scene row y, column x, weighted by the (h, w) weight."""
        rows, cols = slice(y - self.top, y - self.top + weight.shape[0]), slice(x, x + weight.shape[1])
        self.acc[:, rows, cols] += values * weight
        self.wsum[rows, cols] += weight

    def take(self, upto, what="scene"):
        """The finished scene rows [top, upto) as their weighted means, (bands, rows, width); the strip moves past
        them. No tile will add to them again: tiles arrive in row order."""
        k, height = upto - self.top, self.wsum.shape[0]
        if not (self.wsum[:k] > 0).all():  # cannot happen with tile_starts + feather; guard anyway
            raise RuntimeError(f"rows {self.top}..{upto} of {what} were not covered by any tile")
        rows = self.acc[:, :k] / self.wsum[:k]
        self.acc[:, :height - k], self.wsum[:height - k] = self.acc[:, k:].copy(), self.wsum[k:].copy()
        self.acc[:, height - k:], self.wsum[height - k:] = 0.0, 0.0
        self.top = upto
        return rows


def _scene_tiles(model, cloudy_src, sar_src, y, xs, size, sar_fill, device, ctx):
    """forward_all of the tiles at scene row y and columns xs, size (th, tw), as numpy arrays on the host."""
    window = lambda x: (y, x, *size)
    cloudy = np.stack([bands.normalize_s2(_read_s2(cloudy_src, window(x))) for x in xs])
    sar = np.stack([bands.normalize_s1(_fill(dataloader.read_window(sar_src, window(x)), sar_fill)) for x in xs])
    out = forward_all(model, torch.from_numpy(cloudy).to(device), torch.from_numpy(sar).to(device), ctx)
    return {k: None if v is None else v.cpu().numpy() for k, v in out.items()}


def _write_rows(outputs, strips, upto, what):
    """Write the finished rows of each output: the prediction finished to uint16 x10000 (the rounding happens once,
    here, after blending the clamped float predictions), the blended variance as its square root, float32."""
    for name, strip in strips.items():
        top = strip.top
        if upto <= top:
            continue
        rows = strip.take(upto, what)
        if name == "prediction":
            rows = bands.denormalize_s2(bands.finish_s2(torch.from_numpy(rows)))
        else:
            rows = np.sqrt(rows).astype(np.float32)
        outputs[name].write(rows, window=Window(0, top, rows.shape[-1], upto - top))


@torch.no_grad()
def predict_scene(model, cloudy_path, sar_path, out_path, tile=256, overlap=32, batch_sz=4, device="cpu",
                  amp_dtype=None, progress=True, uncertainty_path=None):
    """Cloud-free prediction of a whole scene, written as a uint16 x10000 GeoTIFF with the input's grid; with
    uncertainty_path, the predicted standard deviation of each band beside it (float32, same grid).

    Tiles of `tile` px overlapping by `overlap` px are blended with separable feathered weights (the uncertainty as
    a variance, with the same weights). Memory is one strip of tiles per output: the weighted sum and weights of
    the rows the current tile row covers (13 x tile x width float32); rows no later tile touches are finished,
    written with a windowed write, and dropped. Input tiles are read with rasterio windows and normalised tile by
    tile; an S1 NaN gets the band mean of the whole scene (scene_sar_fill_db), as a whole-image pass would give it."""
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    device, out_path = torch.device(device), Path(out_path)
    ctx = runtime.autocast(device, amp_dtype)
    model.eval()
    with dataloader.open_raster(cloudy_path) as cloudy_src, dataloader.open_raster(sar_path) as sar_src, \
            contextlib.ExitStack() as stack:
        check_scene_pair(cloudy_src, sar_src)
        height, width = cloudy_src.height, cloudy_src.width
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        size = (min(tile, height), min(tile, width))
        sar_fill = scene_sar_fill_db(sar_src)
        weight = np.outer(feather(size[0], overlap), feather(size[1], overlap))
        products = {"prediction": (out_path, "uint16", None), "variance": (uncertainty_path, "float32",
                                                                         UNCERTAINTY_BAND_DESCRIPTIONS)}
        outputs = {name: stack.enter_context(_scene_output(stack.enter_context(files.atomic_output(path, ".tif")),
                                                           cloudy_src, dtype, text))
                   for name, (path, dtype, text) in products.items() if path is not None}
        strips = {name: BlendedStrip(len(bands.S2_BANDS), size[0], width) for name in outputs}
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", disable=not progress, dynamic_ncols=True)
        for y in ys:
            _write_rows(outputs, strips, y, cloudy_path)
            for b in range(0, len(xs), batch_sz):
                chunk = xs[b:b + batch_sz]
                out = _scene_tiles(model, cloudy_src, sar_src, y, chunk, size, sar_fill, device, ctx)
                if "variance" in strips and out["variance"] is None:
                    raise ValueError("an uncertainty output was asked for, but the model predicts no uncertainty")
                for i, x in enumerate(chunk):
                    for name, strip in strips.items():
                        strip.add(y, x, out[name][i], weight)
                bar.update(len(chunk))
        bar.close()
        _write_rows(outputs, strips, height, cloudy_path)
    return out_path


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
            given = Path(getattr(args, given_flag))
            same = path.exists() and given.exists() and os.path.samefile(path, given)
            if path.resolve() == given.resolve() or same:
                raise runtime.UsageError(f"{flag} {path} is the --{given_flag} input: writing there would destroy it; "
                                         f"choose another --out")
        if path.is_dir():
            raise runtime.UsageError(f"{flag} {path} is a folder; give --out a file name, e.g. --out "
                                     f"{out / 'cloudfree.tif'}")
        if path.exists() and not args.overwrite:
            raise runtime.UsageError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another --out")
    ensure_writable_dir(out.parent, "the folder of --out")
    return out


def predict(args):
    missing = [f"--{k}" for k in ("cloudy", "sar", "out") if not getattr(args, k)]
    if missing:
        raise runtime.UsageError(f"--predict needs {', '.join(missing)}")
    if args.tile < 8 or not 0 <= args.overlap < args.tile:
        raise runtime.UsageError(f"need --tile >= 8 and 0 <= --overlap < --tile, got --tile {args.tile} "
                                 f"--overlap {args.overlap}")
    check_predict_output(args)
    device, amp_dtype = resolve_device_and_amp(args)

    def check_scene():
        with dataloader.open_raster(args.cloudy) as cloudy_src, dataloader.open_raster(args.sar) as sar_src:
            check_scene_pair(cloudy_src, sar_src)

    _, (model, ckpt) = runtime.check_together(check_scene, lambda: runtime.load_models(args.checkpoint, device))
    check_uncertainty_wanted(args, model)
    uncertainty = uncertainty_output_path(args.out) if args.save_uncertainty else None
    t0 = time.perf_counter()
    out = predict_scene(model, args.cloudy, args.sar, args.out, tile=args.tile, overlap=args.overlap,
                        batch_sz=args.batch_sz, device=device, amp_dtype=amp_dtype, uncertainty_path=uncertainty)
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
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="checkpoint written by train_CR_kaggle.py (last.pth or best.pth); the network is rebuilt "
                        "from it, no architecture flags needed. Several: an ensemble, scored on the mean of their "
                        "predictions, with their spread as the epistemic part of the uncertainty")
    runtime.add_shared_flag(p, "device")
    runtime.add_shared_flag(p, "amp", note="here the autocast of inference")
    p.add_argument("--batch_sz", type=int, default=4, help="images (or whole-scene tiles) per forward pass")
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
    g.add_argument("--cloud_threshold", type=float, default=0.2,
                   help="GLF-CR's flag: soft cloud score from which a pixel counts as cloudy (score >= threshold), "
                        "in (0, 1]; s2cloudless's mask is already binary, so it does not change it")
    runtime.add_shared_flag(g, "cloud_mask_dir")
    runtime.add_shared_flag(g, "num_workers")
    g.add_argument("--save_geotiff", action="store_true",
                   help="write each prediction as a 13-band uint16 x10000 GeoTIFF with the input crop's CRS and "
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
                   help="write the predicted standard deviation of each of the 13 bands (reflectance, 0-1 scale) as a "
                        "float32 GeoTIFF with the prediction's CRS and transform: results_dir/uncertainty/NAME.tif, "
                        "or with --predict OUT_uncertainty.tif beside --out. Needs a model with the uncertainty head "
                        "or several checkpoints")
    g = p.add_argument_group("whole-scene prediction")
    g.add_argument("--predict", action="store_true", help="predict one whole scene instead of evaluating a list")
    g.add_argument("--cloudy", default=None, help="--predict: cloudy Sentinel-2 GeoTIFF (13 bands, reflectance x10000)")
    g.add_argument("--sar", default=None, help="--predict: Sentinel-1 GeoTIFF (VV, VH in dB) on the same grid")
    g.add_argument("--out", default=None, help="--predict: output GeoTIFF (13 bands, uint16 x10000); never an input")
    g.add_argument("--overwrite", action="store_true", help="--predict: replace --out if it exists")
    g.add_argument("--tile", type=int, default=256, help="--predict: tile side in pixels")
    g.add_argument("--overlap", type=int, default=32, help="--predict: overlap of neighbouring tiles in pixels")
    return p


if __name__ == "__main__":
    sys.exit(runtime.run_cli(main))
