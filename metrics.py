"""Image-quality metrics for cloud removal, computed the way the SEN12MS-CR papers compute them.

All functions take (N, C, H, W) tensors with values in [0, 1] (Sentinel-2 reflectance / 10000, the
convention of DSen2-CR and GLF-CR). They do NOT clamp: the caller clamps predictions to [0, 1] first,
so that a metric never hides an out-of-range network output. Any device works; the arithmetic always
runs in float32 with autocast switched off locally, so a bf16/fp16 autocast region around the call
(or bf16 inputs) cannot lower the precision of the scores.

Per-image functions return (N,) float32 tensors:
    psnr, ssim, sam (degrees), mae, rmse, compute_metrics (dict of all five), masked_metrics.
GLF-CR's callables keep their names and return the batch mean as a Python float:
    PSNR(img1, img2, mask=None), SAM, MAE, RMSE; SSIM(img1, img2) returns it as a 0-d tensor, as GLF-CR's does.

Definitions (per image n, over the selected pixels P and all C bands):
    MSE  = sum_{c, p in P} (pred - target)^2 / (|P| * C)      (GLF-CR's masked MSE, same normaliser)
    PSNR = 10 log10(1 / MSE), data range 1, capped at PSNR_CAP = 100 dB. GLF-CR returns 100 when
           MSE == 0; we clamp at 100 instead, which is the same for identical images and also keeps
           MSE < 1e-10 (float rounding of "identical") from reporting more than 100 dB.
    RMSE = sqrt(MSE);  MAE = mean |pred - target|
    SAM  = mean over pixels of the angle (degrees) between the C-band spectra of pred and target,
           computed as 2 atan2(|u - v|, |u + v|) of the unit spectra u, v (Kahan's formula: accurate
           in float32 near 0 deg where acos is not). Two all-zero spectra give 0 deg, one all-zero
           spectrum gives 90 deg; never NaN.
    SSIM = GLF-CR protocol: 11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, each band
           separately (grouped convolution), zero padding of 5 px, mean of the SSIM map over bands
           and pixels.

SSIM window centre. GLF-CR builds its window with exp(-(x - window_size / 2)^2 / (2 sigma^2)) for
x = 0..10, i.e. centred at 5.5, not 5: a Gaussian shifted by half a pixel, no longer symmetric.
We follow the standard centred window (x - 5), which is Wang et al.'s SSIM and what torchmetrics
and scikit-image use, so our numbers can be checked against them; `glfcr_window=True` reproduces
GLF-CR exactly. Measured size of the difference (tests/test_metrics.py::test_glfcr_window_difference
asserts these bounds):
    real SEN12MS-CR sample ROIs2017_winter_112_p797, cloudy vs cloud-free, 13 x 256 x 256:
        SSIM 0.72876 centred vs 0.72885 GLF-CR window, |diff| = 8.8e-5 (bound in test: 2e-4);
    target + N(0, 0.05) noise, 2 x 13 x 64 x 64 uniform target: max |diff| = 1.0e-5 (SSIM 0.986);
    two independent uniform random images, 2 x 13 x 64 x 64: max |diff| = 9.8e-4 (SSIM ~0.07,
        the worst case: white noise has no structure for the window to average over).
On real imagery this is in the 4th decimal, below the precision SSIM is reported at (3 decimals).
For scale, the zero-padded border itself matters more: the same real pair scores 0.72889 when only
the windows inside the image are averaged (padding="valid", what scikit-image reports).

Float32: per-pixel SSIM values differ from a float64 computation by up to 1.2e-4 (cancellation in
E[x^2] - mu^2) on the real sample; the per-image means agree to 1e-7.

Masks: `mask` is (N, 1, H, W) (or (N, H, W)), bool or float/int holding only 0 and 1, True/1 marking
the pixels to score (e.g. the cloudy ones; ~mask gives the clear ones). Masked PSNR/MAE/RMSE use the
selected pixels in all bands; masked SAM averages the angle over the selected pixels; masked SSIM
averages the (zero-padded, full-image) SSIM map over the selected pixels, so the window still sees
the neighbouring unselected pixels. An image whose mask selects no pixel scores NaN for every metric
(there is nothing to score; 0 or a cap would bias a mean). The batch-mean wrappers (PSNR, SSIM, ...)
skip such NaNs (nanmean), and are NaN only if no image selects any pixel. A soft cloud score must be
thresholded first (pass `threshold=` to masked_metrics, or compare yourself); non-binary values raise.

Confidence maps: roc_auc and iou score the model's confidence map (or any soft cloud score) against a binary
cloud mask per image; auc_histograms / auc_from_histograms give the AUC pooled over a whole data set.

Predicted uncertainty (docs/uncertainty.md): uce_auce (UnCRtainTS's binning, the project's errors), constant_uncertainty
(its baseline), uce_auce_uncrtaints (UnCRtainTS's released figures exactly), spearman (rank correlation
of uncertainty and error) and sparsification (the error left after removing the most uncertain samples, beside the
oracle's) take 1-D numpy arrays of per-sample values.

Batch means. GLF-CR's PSNR pools the squared error of the whole batch before taking the log; ours is
the mean of the per-image PSNRs, the quantity a per-image evaluation averages (UnCRtainTS does the
same). For a batch of one, which is how GLF-CR's test script runs (--batch_sz 1), the two are identical.
GLF-CR's SSIM returns a 0-d tensor (its test script calls .item() on it); so does ours.
"""
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB reported for identical images (GLF-CR returns 100 when the MSE is 0)
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2  # (k1 * data range)^2 with data range 1
SSIM_C2 = 0.03 ** 2
METRIC_NAMES = ("PSNR", "SSIM", "SAM", "MAE", "RMSE")
_UNIT_EPS = 1e-12  # keeps an all-zero spectrum at unit vector 0 instead of 0/0 = NaN


def _no_autocast(tensor):
    """Context that switches autocast off on tensor's device, so conv/matmul stay in float32."""
    if not torch.is_tensor(tensor):  # _check_pair raises the clear error inside the context
        return nullcontext()
    device = tensor.device
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know cannot autocast either
        return nullcontext()


def _check_pair(pred, target):
    if not (torch.is_tensor(pred) and torch.is_tensor(target)):
        raise TypeError(f"metrics expect torch tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"metrics expect pred and target of the same shape (N, C, H, W); got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target on {target.device}")
    return pred.float(), target.float()


def _prepare_mask(mask, like):
    """(N,1,H,W) or (N,H,W) bool / 0-1 mask -> float32 (N,1,H,W) on like's device, or None."""
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a torch tensor, got {type(mask).__name__}")
    n, _, h, w = like.shape
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape) != (n, 1, h, w):
        raise ValueError(f"mask must have shape ({n}, 1, {h}, {w}) to match the images; got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                "mask must be bool or hold only 0 and 1; threshold a soft cloud score first "
                "(e.g. cloud_mask >= 0.2, or masked_metrics(..., threshold=0.2))"
            )
    return mask.to(device=like.device, dtype=torch.float32)


def _mean_over_selected(values, mask):
    """Per-image mean of values (N, K, H, W) over all K and the pixels mask selects; NaN if none."""
    if mask is None:
        return values.mean(dim=(1, 2, 3))
    k = values.shape[1]
    selected = mask.sum(dim=(1, 2, 3)) * k
    total = (values * mask).sum(dim=(1, 2, 3))
    # 0/0 -> NaN on purpose: an image with no selected pixel has no score.
    return total / selected


def _mse(pred, target, mask):
    return _mean_over_selected((pred - target) ** 2, mask)


def psnr(pred, target, mask=None):
    """Per-image PSNR in dB (data range 1), capped at PSNR_CAP = 100 dB. Returns (N,) float32."""
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        mse = _mse(pred, target, _prepare_mask(mask, pred))
        # log10(0) = -inf -> +inf PSNR, then the cap; NaN (empty mask) passes through clamp unchanged.
        return (-10.0 * torch.log10(mse)).clamp(max=PSNR_CAP)


def rmse(pred, target, mask=None):
    """Per-image root mean squared error over the selected pixels and all bands. (N,) float32."""
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        return _mse(pred, target, _prepare_mask(mask, pred)).sqrt()


def mae(pred, target, mask=None):
    """Per-image mean absolute error over the selected pixels and all bands. (N,) float32."""
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        return _mean_over_selected((pred - target).abs(), _prepare_mask(mask, pred))


def sam_map(pred, target):
    """Spectral angle in degrees between pred and target at every pixel: (N, 1, H, W) float32."""
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        u = pred / pred.norm(dim=1, keepdim=True).clamp(min=_UNIT_EPS)
        v = target / target.norm(dim=1, keepdim=True).clamp(min=_UNIT_EPS)
        angle = 2.0 * torch.atan2((u - v).norm(dim=1, keepdim=True), (u + v).norm(dim=1, keepdim=True))
        return torch.rad2deg(angle)


def sam(pred, target, mask=None):
    """Per-image spectral angle mapper: mean angle in degrees over the selected pixels. (N,) float32."""
    angles = sam_map(pred, target)
    return _mean_over_selected(angles, _prepare_mask(mask, angles))


def gaussian_window(window_size=SSIM_WINDOW_SIZE, sigma=SSIM_SIGMA, glfcr_window=False):
    """Normalised 2-D Gaussian window (window_size, window_size), float32.

    Centred at window_size // 2 (standard SSIM), or at window_size / 2 when glfcr_window is True,
    which is what GLF-CR's metrics.py computes (half a pixel off centre for odd sizes).
    """
    centre = window_size / 2 if glfcr_window else window_size // 2
    x = torch.arange(window_size, dtype=torch.float64)
    g = torch.exp(-((x - centre) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim_map(pred, target, glfcr_window=False, padding="zeros"):
    """SSIM map per band: (N, C, H, W) with padding="zeros" (GLF-CR protocol: zero padding of half
    the window), or (N, C, H-10, W-10) with padding="valid" (no padding: only the windows that lie
    inside the image, which is what torchmetrics and scikit-image average)."""
    if padding not in ("zeros", "valid"):
        raise ValueError(f"padding must be 'zeros' or 'valid', got {padding!r}")
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        channels = pred.shape[1]
        window = gaussian_window(glfcr_window=glfcr_window).to(pred.device)
        window = window.expand(channels, 1, SSIM_WINDOW_SIZE, SSIM_WINDOW_SIZE).contiguous()
        pad = SSIM_WINDOW_SIZE // 2 if padding == "zeros" else 0

        def blur(x):
            return F.conv2d(x, window, padding=pad, groups=channels)

        mu1, mu2 = blur(pred), blur(target)
        mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
        sigma1_sq = blur(pred * pred) - mu1_sq
        sigma2_sq = blur(target * target) - mu2_sq
        sigma12 = blur(pred * target) - mu1_mu2
        return ((2 * mu1_mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
            (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2)
        )


def ssim(pred, target, mask=None, glfcr_window=False):
    """Per-image SSIM (GLF-CR protocol, see module docstring): mean of the zero-padded SSIM map over
    all bands and the selected pixels (all pixels without a mask). (N,) float32."""
    full_map = ssim_map(pred, target, glfcr_window=glfcr_window, padding="zeros")
    return _mean_over_selected(full_map, _prepare_mask(mask, full_map))


def compute_metrics(pred, target, mask=None):
    """All five metrics per image: {"PSNR", "SSIM", "SAM", "MAE", "RMSE"} -> (N,) float32 tensors."""
    with _no_autocast(pred):
        pred, target = _check_pair(pred, target)
        mask = _prepare_mask(mask, pred)  # validated once, reused by every metric
        mse = _mse(pred, target, mask)
        return {
            "PSNR": (-10.0 * torch.log10(mse)).clamp(max=PSNR_CAP),
            "SSIM": _mean_over_selected(ssim_map(pred, target), mask),
            "SAM": _mean_over_selected(sam_map(pred, target), mask),
            "MAE": _mean_over_selected((pred - target).abs(), mask),
            "RMSE": mse.sqrt(),
        }


def masked_metrics(pred, target, cloud_mask, threshold=None):
    """Metrics over the cloudy and over the clear pixels: {"cloudy": {...}, "clear": {...}}, each a
    compute_metrics dict of (N,) tensors. cloud_mask (N,1,H,W) is bool / 0-1 with True = cloudy; a soft
    cloud score needs `threshold` (cloudy = cloud_mask >= threshold, DSen2-CR's binarisation, which the
    dataloader's `cloud_binary` uses too). An image with no cloudy (or no clear) pixel gets NaN in that half."""
    if not torch.is_tensor(cloud_mask):
        raise TypeError(f"cloud_mask must be a torch tensor, got {type(cloud_mask).__name__}")
    cloudy = cloud_mask >= threshold if threshold is not None else cloud_mask
    cloudy = _prepare_mask(cloudy, pred)
    return {"cloudy": compute_metrics(pred, target, cloudy), "clear": compute_metrics(pred, target, 1.0 - cloudy)}


# ---------------------------------------------------------------------------- a confidence map against a cloud mask
# The model's confidence map (0 clear .. 1 cloudy) is scored as a cloud detector: ROC AUC (how well it ranks
# cloudy above clear pixels, threshold-free) and IoU of confidence >= 0.5 with the mask.
AUC_BINS = 1000  # pooled AUC over many images from histograms: exact up to ties within 1/1000


def _average_ranks(values):
    """1-based ranks of a 1-D tensor, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = torch.argsort(values)
    _, counts = torch.unique_consecutive(values[order], return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    group_rank = ends - (counts.double() - 1) / 2  # mean of the ranks end-count+1 .. end
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def roc_auc(score, label):
    """Per-image ROC AUC of a soft score against a binary label, both (N,1,H,W): the probability that a random
    labelled pixel scores higher than a random unlabelled one (ties count half). NaN for an image with only
    one class (no AUC exists). (N,) float32."""
    with _no_autocast(score):
        out = []
        for s, y in zip(score.float().flatten(1), label.bool().flatten(1)):
            n_pos, n_neg = int(y.sum()), int((~y).sum())
            if n_pos == 0 or n_neg == 0:
                out.append(float("nan"))
                continue
            ranks = _average_ranks(s)
            out.append(float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
        return torch.tensor(out, dtype=torch.float32)


def iou(predicted, label):
    """Per-image intersection over union of two binary (N,1,H,W) masks; NaN where both are empty. (N,) float32."""
    p, y = predicted.bool().flatten(1), label.bool().flatten(1)
    inter, union = (p & y).sum(1).float(), (p | y).sum(1).float()
    return inter / union  # 0/0 -> NaN on purpose: nothing to overlap


def auc_histograms(score, label, bins=AUC_BINS):
    """(positives, negatives) counts of a [0,1] score in `bins` equal bins: add them up over a data set, then
    auc_from_histograms gives the pooled AUC without keeping every pixel."""
    idx = (score.float().clamp(0, 1) * bins).long().clamp(max=bins - 1).flatten()
    y = label.bool().flatten()
    return (torch.bincount(idx[y], minlength=bins).double().cpu(),
            torch.bincount(idx[~y], minlength=bins).double().cpu())


def auc_from_histograms(positives, negatives):
    """ROC AUC from binned score counts (ties within a bin count half); NaN if a class is empty."""
    n_pos, n_neg = float(positives.sum()), float(negatives.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = torch.cumsum(negatives, 0) - negatives  # negatives in lower bins
    return float(((positives * (below + negatives / 2)).sum()) / (n_pos * n_neg))


# ---------------------------------------------------------------------------- a predicted uncertainty against the error
# Samples (pixels or images) carry a predicted variance (or standard deviation) and an error; these functions say
# how well the first ranks and matches the second. Plain 1-D numpy arrays in, floats and lists out.
UCE_PERCENT = 5  # UnCRtainTS's bin width: 100 // 5 = 20 bins
SPARSIFICATION_STEPS = tuple(k / 100 for k in range(0, 100, 5))  # removed fractions 0, 0.05, ..., 0.95
SPARSIFICATION_REPORTED = (0.05, 0.10, 0.25, 0.50)  # the fractions summary tables quote


def uce_auce(variance, errors, percent=UCE_PERCENT):
    """Uncertainty calibration error (UCE) and its unweighted mean (AUCE) as UnCRtainTS computes them
    (PatrickTUM/UnCRtainTS, model/train_reconstruct.py, compute_uce_auce with l2=True, the form it reports):
    100 // percent bins of equal width in predicted variance between its minimum and maximum (np.digitize on the
    upper edges of linspace(min, max, n_bins), so the last bin holds the samples at the maximum only); per bin the
    root mean variance RMV = sqrt(mean(variance)) and the root mean square of `errors`; UCE = sum over bins of
    (fraction of samples in the bin) x |RMS error - RMV|, AUCE = the mean of |RMS error - RMV| over non-empty bins.
    Pass per-sample RMSEs as `errors` and a bin's RMS error is the bin's RMSE.

    One difference, on purpose: when every variance is the same, UnCRtainTS's torch.histogram of the bin indices puts
    all the weight into bin 10 while the samples sit in bin 19, so its UCE is 0 for any constant uncertainty; here
    the weight stays with the samples and UCE = |RMSE - sqrt(variance)|. Otherwise the two agree (the test
    reproduces UnCRtainTS's formula). Returns {"uce", "auce", "bin_rmv", "bin_rmse", "bin_weight"} (lists per bin,
    NaN for an empty one)."""
    variance, errors = np.asarray(variance, np.float64).ravel(), np.asarray(errors, np.float64).ravel()
    if variance.shape != errors.shape or variance.size == 0:
        raise ValueError(f"uce_auce needs as many variances as errors, at least one: got {variance.size} and "
                         f"{errors.size}")
    n_bins = 100 // percent
    index = np.digitize(variance, bins=np.linspace(variance.min(), variance.max(), num=n_bins)[1:])
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty bin is NaN, as in UnCRtainTS
        bin_rmv = np.sqrt(np.bincount(index, variance, n_bins) / counts)
        bin_rmse = np.sqrt(np.bincount(index, errors ** 2, n_bins) / counts)
    gap, weight = np.abs(bin_rmse - bin_rmv), counts / variance.size
    return {"uce": float(np.nansum(weight * gap)), "auce": float(np.nanmean(gap)), "bin_rmv": bin_rmv.tolist(),
            "bin_rmse": bin_rmse.tolist(), "bin_weight": weight.tolist()}


def constant_uncertainty(variance):
    """The constant-uncertainty baseline of a predicted variance: every sample gets the mean variance, so its root mean
    variance is the predicted one overall (a head whose errors follow its variances scores about 0 UCE against it; the
    square of the mean std would be smaller by Jensen's inequality and score the calibrated head's std spread)."""
    variance = np.asarray(variance, np.float64)
    return np.full_like(variance, variance.mean())


def uce_auce_uncrtaints(image_variance, image_error, percent=UCE_PERCENT):
    """UCE and AUCE exactly as UnCRtainTS's released code computes the figures of its tables (PatrickTUM/UnCRtainTS,
    model/train_reconstruct.py, compute_uce_auce with l2=True, on the per-image values of model/src/learning/
    metrics.py img_metrics): one sample per image, `image_variance` its mean predicted variance (over bands and
    pixels) and `image_error` its mean SIGNED error (target - prediction over bands and pixels, so errors of opposite
    sign cancel); float32 torch as there; 100 // percent bins of equal width between the smallest and largest
    variance; per bin sqrt(mean variance) against the root mean square of the signed errors; bin weights from
    torch.histogram of the bin indices over their own range, so a constant variance puts its weight into an empty
    bin and scores UCE 0. Use it to put a figure beside UnCRtainTS's table; `uce_auce` with per-image RMSEs is the
    project's (docs/uncertainty.md says which to use when). Returns {"uce", "auce"}."""
    var, errors = torch.tensor(np.asarray(image_variance, np.float64).ravel(), dtype=torch.float32), torch.tensor(
        np.asarray(image_error, np.float64).ravel(), dtype=torch.float32)
    if var.shape != errors.shape or var.numel() == 0:
        raise ValueError(f"uce_auce_uncrtaints needs one mean error per mean variance, at least one: got "
                         f"{var.numel()} and {errors.numel()}")
    n_bins = 100 // percent
    # np.linspace and np.digitize of the float32 values, as their torch arguments are converted there
    edges = np.linspace(var.min().numpy(), var.max().numpy(), num=n_bins)[1:]
    var_idx = torch.Tensor(np.digitize(var.numpy(), bins=edges))
    bk_var, bk_err = torch.empty(n_bins), torch.empty(n_bins)
    for bin_idx in range(n_bins):  # an empty bin is NaN (the mean of nothing), skipped by the nan-sums below
        bk_var[bin_idx] = torch.sqrt(torch.mean(var[var_idx == bin_idx].sqrt() ** 2))
        bk_err[bin_idx] = torch.sqrt(torch.mean(errors[var_idx == bin_idx] ** 2))
    calib_err = torch.abs(bk_err - bk_var)
    bk_weight = torch.histogram(var_idx, n_bins)[0] / var.numel()
    return {"uce": float(torch.nansum(bk_weight * calib_err)), "auce": float(torch.nanmean(calib_err))}


def spearman(uncertainty, abs_error):
    """Spearman's rank correlation between a predicted uncertainty and the absolute error over samples
    (scipy.stats.spearmanr); NaN for fewer than two samples or a constant input."""
    from scipy.stats import spearmanr  # scipy only where this is asked for

    uncertainty, abs_error = np.asarray(uncertainty).ravel(), np.asarray(abs_error).ravel()
    if uncertainty.size < 2 or np.ptp(uncertainty) == 0 or np.ptp(abs_error) == 0:
        return float("nan")
    return float(spearmanr(uncertainty, abs_error).statistic)


def _tie_means(values, key):
    """`values` with each group of equal `key` replaced by the group's mean: the expectation over every order of the
    ties."""
    _, group, counts = np.unique(key, return_inverse=True, return_counts=True)
    return (np.bincount(group, values) / counts)[group]


def _rmse_after_removing(squared_error, order, fractions):
    """RMSE of the samples left after removing the first round(f x n) of `order`, for each fraction f."""
    kept_first = np.cumsum(squared_error[order][::-1])  # sums over the last k samples of the order, k = 1..n
    n = squared_error.size
    keep = np.array([n - round(f * n) for f in fractions])
    return np.sqrt(kept_first[keep - 1] / keep)


def sparsification(uncertainty, squared_error, fractions=SPARSIFICATION_STEPS):
    """The sparsification curve: the RMSE left after removing the fractions of samples with the highest predicted
    uncertainty, beside the oracle's (removing the largest errors first, the best any uncertainty can do), and the
    area between the two curves, each divided by the RMSE of all samples, over the removed fractions (0 = the
    oracle's ranking; trapezoidal rule). squared_error: one value per sample (a pixel's mean over bands). Samples of
    equal uncertainty are removed in no particular order: their squared errors are averaged, which gives the
    expectation over every order of the ties (a constant uncertainty removes average samples: a flat curve), never
    the order the samples came in. Returns {"removed", "rmse", "oracle_rmse", "area_between"}."""
    uncertainty = np.asarray(uncertainty, np.float64).ravel()
    squared_error = np.asarray(squared_error, np.float64).ravel()
    fractions = np.asarray(fractions, np.float64)
    if uncertainty.shape != squared_error.shape or uncertainty.size == 0 or fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError("sparsification needs one uncertainty per squared error, at least one, and fractions in "
                         "[0, 1)")
    model = _rmse_after_removing(_tie_means(squared_error, uncertainty), np.argsort(-uncertainty, kind="stable"),
                                 fractions)
    oracle = _rmse_after_removing(squared_error, np.argsort(-squared_error, kind="stable"), fractions)
    full = np.sqrt(squared_error.mean())
    gap = (model - oracle) / full if full > 0 else np.zeros_like(model)
    area = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(fractions))) if fractions.size > 1 else 0.0
    return {"removed": fractions.tolist(), "rmse": model.tolist(), "oracle_rmse": oracle.tolist(),
            "area_between": area}


def _batch_mean(values):
    """Mean over the batch as a Python float, skipping images whose mask selected nothing (NaN)."""
    return float(torch.nanmean(values).item())


# GLF-CR names: same arguments and meaning as GLF-CR's metrics.py, batch mean as a Python float.
def PSNR(img1, img2, mask=None):
    """Mean per-image PSNR (dB, capped at 100) of the batch; mask (N,1,H,W) selects pixels to score."""
    return _batch_mean(psnr(img1, img2, mask))


def SSIM(img1, img2):
    """Mean per-image SSIM of the batch, GLF-CR protocol with the centred Gaussian window.

    Returned as a 0-d CPU tensor, as GLF-CR's SSIM does, so notebooks calling `SSIM(a, b).item()` keep working
    (float(), formatting and arithmetic work on it too).
    """
    return torch.tensor(_batch_mean(ssim(img1, img2)))


def SAM(img1, img2, mask=None):
    """Mean per-image spectral angle (degrees) of the batch."""
    return _batch_mean(sam(img1, img2, mask))


def MAE(img1, img2, mask=None):
    """Mean per-image mean absolute error of the batch."""
    return _batch_mean(mae(img1, img2, mask))


def RMSE(img1, img2, mask=None):
    """Mean per-image RMSE of the batch."""
    return _batch_mean(rmse(img1, img2, mask))


__all__ = [
    "PSNR_CAP", "METRIC_NAMES", "psnr", "ssim", "sam", "mae", "rmse", "ssim_map", "sam_map",
    "gaussian_window", "compute_metrics", "masked_metrics", "PSNR", "SSIM", "SAM", "MAE", "RMSE",
    "roc_auc", "iou", "auc_histograms", "auc_from_histograms", "uce_auce", "constant_uncertainty",
    "uce_auce_uncrtaints", "spearman", "sparsification",
]
