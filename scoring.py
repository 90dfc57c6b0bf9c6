"""What an evaluation scores: the per-image columns of metrics.csv (model and identity, over the whole image, in
clouds and in clear pixels; the confidence map as a cloud detector; the predicted uncertainty) and the figures pooled
over a split (Totals, added up batch by batch, and its summaries: means by cloud cover, PSNR by true cloud, the pooled
AUC, the uncertainty's calibration). Tensors in, numbers out: no files, no model.

    totals = Totals()
    totals.rows += image_rows(batch, {"model": score_batch(...), "identity": score_batch(...)}, cover, columns)
    summarise(totals.rows), summarise_truth_bins(totals), summarise_confidence(totals)
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

import metrics
import rasters

METRIC_NAMES = metrics.METRIC_NAMES
# Whole-image score, then inside clouds and in clear pixels (metrics.masked_metrics halves).
REGIONS = ("all", "cloudy", "clear")
PREDICTORS = ("model", "identity")  # identity: the cloudy input itself taken as the prediction
# Cloud-cover bins in percent of cloudy pixels: [lo, hi), the last one closed at 100.
COVER_BINS = ((0, 10), (10, 30), (30, 60), (60, 100))
# Where the data has true cloud maps (synthetic sets, rasters.truth_path), pixels are also scored by their true
# cloud: PSNR of the squared error pooled over a bin's pixels and bands, so a reader sees whether the error lies under
# thin cloud that lets the ground through or under opaque cloud, at a cloud's edge or deep inside. Opacity bins are
# (lo, hi]; "clear" has neither cloud nor shadow above rasters.TRUTH_THRESHOLD.
OPACITY_BINS = ((0.05, 0.3), (0.3, 0.7), (0.7, 0.9), (0.9, 1.0))
EDGE_PX = 4  # "at the edge": a cloudy pixel at most this far (Euclidean, px) from a pixel outside the cloud


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

def _region_means(values, cloudy):
    """{"all", "cloudy", "clear"}: (N,) means of values (N,C,H,W) over the bands and the region's pixels (NaN where an
    image has none); cloudy: the (N,1,H,W) bool mask in use."""
    def mean(selected):
        return (values * selected).sum(dim=(1, 2, 3)) / (selected.sum(dim=(1, 2, 3)) * values.shape[1])
    return {"all": values.mean(dim=(1, 2, 3)), "cloudy": mean(cloudy.float()), "clear": mean(1.0 - cloudy.float())}


def uncertainty_scores(out, cloudy, target):
    """{UNCERTAINTY_COLUMNS name: (N,) tensor} of a batch's inference.forward_all output; NaN where there is no such
    part."""
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


def summarise_uncertainty(totals, source):
    """The uncertainty block of summary.json; None for a model that predicts no uncertainty."""
    if source is None or not totals.pixels:
        return None
    per_image = totals.rows
    px = {k: np.concatenate([p[k] for p in totals.pixels]) for k in totals.pixels[0]}
    selections = {"all": np.ones_like(px["cloudy"]), "cloudy": px["cloudy"], "clear": ~px["cloudy"]}
    regions = {r: _uncertainty_region({k: v[sel] for k, v in px.items()}, per_image, r)
               for r, sel in selections.items()}
    mean_std = {r: None if regions[r] is None else regions[r]["mean_std"] for r in REGIONS}
    # no ratio without clear pixels, or where the std is 0 on them (an ensemble of agreeing members without a head)
    ratio = None if None in (mean_std["cloudy"], mean_std["clear"]) or not mean_std["clear"] else (
        mean_std["cloudy"] / mean_std["clear"])
    return {"source": source, "unit": "standard deviation of reflectance (0-1 scale)",
            "pixels_sampled": int(px["std"].size), "pixels_per_image_cap": UNCERTAINTY_PIXELS_PER_IMAGE,
            "mean_std": mean_std, "cloudy_clear_ratio": ratio,
            "aleatoric_std": nanmean([row["unc_aleatoric_std"] for row in per_image]),
            "epistemic_std": nanmean([row["unc_epistemic_std"] for row in per_image]), "regions": regions}


def cover_bin(cover_percent):
    for lo, hi in COVER_BINS:
        if lo <= cover_percent < hi or (hi == 100 and cover_percent == 100):
            return f"{lo}-{hi}"
    raise ValueError(f"cloud cover {cover_percent} outside [0, 100]")


def nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None  # None -> JSON null: no image had such pixels


def summarise(rows):
    """Means per predictor and region over rows (NaN, i.e. no such pixels in an image, skipped)."""
    return {p: {r: {m: nanmean([row[column(p, r, m)] for row in rows]) for m in METRIC_NAMES} for r in REGIONS}
            for p in PREDICTORS}


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


def truth_bin_masks(cloud_truth):
    """(N,2,H,W) true opacity and shadow -> {bin name: bool (N,H,W)}. A bin may be empty; the bins overlap only
    where a name says so (the opacity bins and the two edge bins each split the cloudy pixels)."""
    opacity, shadow = cloud_truth[:, 0], cloud_truth[:, 1]
    cloud = opacity > rasters.TRUTH_THRESHOLD
    masks = {"clear": ~cloud & (shadow <= rasters.TRUTH_THRESHOLD),
             "shadow, no cloud": ~cloud & (shadow > rasters.TRUTH_THRESHOLD)}
    masks.update({f"opacity {lo}-{hi}": (opacity > lo) & (opacity <= hi) for lo, hi in OPACITY_BINS})
    # A patch's border is not a cloud's edge: a patch without clear pixels has all of its cloud "inside".
    distance = torch.from_numpy(np.stack([ndimage.distance_transform_edt(c) if (~c).any() else np.full(c.shape, np.inf)
                                          for c in cloud.cpu().numpy()])).to(cloud.device)
    masks[f"cloud, edge {EDGE_PX} px"] = cloud & (distance <= EDGE_PX)
    masks["cloud, inside"] = cloud & (distance > EDGE_PX)
    return masks


@dataclass
class Totals:
    """What an evaluation adds up over the split, batch by batch: the CSV rows, the seconds spent in the model, and
    what the figures pooled over the whole split are made of: the confidence's histograms against the mask in use
    and the true cloud map (metrics.auc_histograms; None until a model with a confidence map has scored an image),
    the squared error per true-cloud bin ({bin: {"pixels", "model", "identity"}}; None without true cloud maps), and
    a sample of pixels' predicted uncertainty (sample_pixels; empty for a model that predicts none)."""
    rows: list[dict] = field(default_factory=list)
    model_seconds: float = 0.0
    auc_mask: tuple | None = None
    auc_truth: tuple | None = None
    truth_bins: dict[str, dict] | None = None
    pixels: list[dict[str, np.ndarray]] = field(default_factory=list)
    # A fixed seed: the same pixels are drawn on every run.
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def add_histograms(self, confidence, mask, true_mask):
        """Add a batch's confidence histograms (against the mask, and the truth if any) to the data set's."""
        for key, labels in (("auc_mask", mask), ("auc_truth", true_mask)):
            if labels is not None:
                counts = metrics.auc_histograms(confidence, labels)
                total = getattr(self, key)
                setattr(self, key, counts if total is None else tuple(a + b for a, b in zip(total, counts)))

    def add_truth_bins(self, cloud_truth, predictions, target):
        """Add a batch's squared error per true-cloud bin, per predictor ({name: prediction}), to truth_bins."""
        if self.truth_bins is None:
            self.truth_bins = {}
        errors = {name: ((p - target) ** 2).mean(dim=1) for name, p in predictions.items()}  # (N,H,W), band mean
        for name, mask in truth_bin_masks(cloud_truth).items():
            if name not in self.truth_bins:
                self.truth_bins[name] = {"pixels": 0, **{p: 0.0 for p in predictions}}
            entry = self.truth_bins[name]
            entry["pixels"] += int(mask.sum())
            for predictor, error in errors.items():
                entry[predictor] += float(error[mask].double().sum())

    def add_pixels(self, out, target, mask):
        """Add a sample of a batch's pixels (sample_pixels) for the pooled uncertainty figures."""
        self.pixels.append(sample_pixels(out, target, mask, self.generator))


def summarise_truth_bins(totals):
    """{bin: {"pixels", "PSNR_model", "PSNR_identity"}} from the pooled squared errors (PSNR None for an empty bin,
    capped like metrics.psnr); None without true cloud maps."""
    if totals.truth_bins is None:
        return None
    out = {}
    for name, entry in totals.truth_bins.items():
        n = entry["pixels"]  # every pixel has every band: the mean of the per-pixel band means is the pooled MSE
        psnr = {p: None if n == 0 else min(metrics.PSNR_CAP, -10 * math.log10(max(entry[p] / n, 1e-30)))
                for p in PREDICTORS}
        out[name] = {"pixels": entry["pixels"], **{f"PSNR_{p}": v for p, v in psnr.items()}}
    return out


def summarise_confidence(totals):
    """Means over images (NaN skipped: an image with one class has no AUC) and the AUC pooled over all pixels;
    None for a model without a confidence map (nothing was pooled)."""
    if totals.auc_mask is None:
        return None
    out = {name[len("conf_"):]: nanmean([row[name] for row in totals.rows])
           for name in CONFIDENCE_COLUMNS if name.startswith("conf_")}
    for key in ("auc_mask", "auc_truth"):
        counts = getattr(totals, key)
        out[f"{key}_pooled"] = None if counts is None else metrics.auc_from_histograms(*counts)
    return out
