"""Cloud and cloud-shadow detection on Sentinel-2 reflectance (numpy and scipy; no file I/O).

- rule_cloud_score: the rule set published with DSen2-CR (Meraner et al. 2020), reused by GLF-CR and
  UnCRtainTS, with the original thresholds, vectorised; rule_cloud_mask, shadow_mask, cloud_shadow_mask.
- s2cloudless_mask: the s2cloudless binary mask as UnCRtainTS makes it for SEN12MS-CR (`get_cloud_masks` of
  S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)); s2cloudless_score: the
  raw LightGBM cloud probability that mask starts from (offline, all 13 bands).
- cloud_score(s2, detector): a score by detector name ("s2cloudless": the binary mask as 0/1; "s2cloudless_prob":
  the probability; "none": zeros); detector_settings: what a detector's binary mask is, for result files.
Inputs are (C,H,W) reflectance already divided by 10000 (bands.normalize_s2) of either product of bands.S2_PRODUCTS,
told apart by their band count: L1C (13 bands) or L2A (12, no B10; the rule detector and the shadow mask only,
s2cloudless is refused: check_detector_product).
"""
import numpy as np
from scipy import ndimage

from bands import S2_PRODUCT_TEXT, s2_band_index, s2_product_of_count

CLOUD_DETECTORS = ("rule", "s2cloudless", "s2cloudless_prob", "none")
BINARY_DETECTORS = ("s2cloudless",)  # their score is already the binary mask (0/1): --cloud_threshold does not matter
# UnCRtainTS's SEN12MS-CR loader (data/dataLoader.py, cloud_masks='s2cloudless_mask', its default).
# DSen2-CR's binarisation of the rule score (cloudy where score >= 0.2), kept by GLF-CR and UnCRtainTS: the default
# --cloud_threshold of every dataset, flag and mask in this project, defined here only.
CLOUD_THRESHOLD = 0.2
S2CLOUDLESS_SETTINGS = {"threshold": 0.4, "all_bands": True, "average_over": 4, "dilation_size": 2}
# A mask pixel depends on probabilities up to average_over + dilation_size px away (disc average, then dilation):
# computed on a crop grown by this margin, the crop's mask equals the whole raster's.
S2CLOUDLESS_MARGIN = S2CLOUDLESS_SETTINGS["average_over"] + S2CLOUDLESS_SETTINGS["dilation_size"]


def product_of(s2):
    """The product (bands.S2_PRODUCTS) of a (C,H,W) image, from its band count; ValueError for another count."""
    product = s2_product_of_count(np.shape(s2)[0])
    if product is None:
        raise ValueError(f"expected a Sentinel-2 image of 13 (L1C) or 12 (L2A) bands, got shape {np.shape(s2)}")
    return product


def check_detector_product(detector, product):
    """ValueError where a detector cannot run on a product: s2cloudless's LightGBM model takes the 13 L1C bands (B10
    included) as top-of-atmosphere reflectance, which an L2A file holds neither of."""
    if product != "L1C" and detector in ("s2cloudless", "s2cloudless_prob"):
        raise ValueError(f"cloud detector {detector} needs Sentinel-2 L1C ({S2_PRODUCT_TEXT['L1C']}): its model is "
                         f"trained on top-of-atmosphere reflectance with B10; on {product} use the rule detector "
                         f"(--cloud_detector rule) or none")


# Thresholds below are those of the published `get_cloud_mask` / `get_shadow_mask` (DSen2-CR).
def _rescaled(x, low, high):
    # Not clipped, like the original: negative scores survive until the final clip after smoothing.
    return (x - low) * (1.0 / (high - low))


def _normalized_difference(a, b):
    s = a + b
    s[s == 0] = 0.001  # the original's guard against division by zero
    return (a - b) / s


def rule_cloud_score(s2):
    """(C,H,W) reflectance in [0,1], L1C or L2A -> (H,W) float32 soft cloud score in [1e-5, 1]."""
    s2 = np.asarray(s2, dtype=np.float32)
    index = s2_band_index(product_of(s2))
    b = {name: s2[i] for name, i in index.items() if name in ("B1", "B2", "B3", "B4", "B10", "B11")}
    # Clouds are bright in blue and aerosol/cirrus bands and in all visible bands ...
    score = np.minimum(_rescaled(b["B2"], 0.1, 0.5), 1.0)
    np.minimum(score, _rescaled(b["B1"], 0.1, 0.3), out=score)
    # L2A has no B10 (cirrus, 1375 nm, in a water-vapour absorption band): over land and under thick cloud it reads
    # near 0 (0.001 in synthetic.py's spectra), so B1 alone is the term's value there; only thin cirrus, which
    # Sen2Cor has corrected out of L2A, scores lower than on L1C.
    np.minimum(score, _rescaled(b["B1"] + b["B10"] if "B10" in b else b["B1"], 0.15, 0.2), out=score)
    np.minimum(score, _rescaled(b["B4"] + b["B3"] + b["B2"], 0.2, 0.8), out=score)
    # ... but they are not snow (high NDSI).
    np.minimum(score, _rescaled(_normalized_difference(b["B3"], b["B11"]), 0.8, 0.6), out=score)
    score = ndimage.grey_closing(score, size=(5, 5))
    # The original convolves with a 7x7 box in 'same' mode: zero padding, i.e. mode="constant".
    score = ndimage.uniform_filter(score, size=7, mode="constant", cval=0.0)
    return np.clip(score, 1e-5, 1.0).astype(np.float32)


def rule_cloud_mask(s2, threshold=CLOUD_THRESHOLD):
    """(H,W) bool: soft score >= threshold (the original binarisation)."""
    return rule_cloud_score(s2) >= threshold


def shadow_mask(s2):
    """(H,W) bool cloud-shadow mask: dark in NIR+SWIR (CSI) and in blue, relative to the patch statistics,
    then a 5x5 median filter (the original's medfilt2d, zero padded)."""
    s2 = np.asarray(s2, dtype=np.float32)
    index = s2_band_index(product_of(s2))
    blue = s2[index["B2"]]
    csi = (s2[index["B8"]] + s2[index["B11"]]) / 2.0
    t3 = csi.min() + 0.75 * (csi.mean() - csi.min())
    t4 = blue.min() + (5.0 / 6.0) * (blue.mean() - blue.min())
    dark = ((csi < t3) & (blue < t4)).astype(np.float32)
    # Median of a binary 5x5 neighbourhood = majority vote (>= 13 of 25); a box sum is far cheaper.
    votes = ndimage.uniform_filter(dark, size=5, mode="constant", cval=0.0) * 25.0
    return votes > 12.5


def cloud_shadow_mask(s2, threshold=CLOUD_THRESHOLD):
    """(H,W) int8: 1 cloud, -1 shadow, 0 clear (clouds win over shadows), like get_cloud_cloudshadow_mask."""
    out = np.where(shadow_mask(s2), -1, 0).astype(np.int8)
    out[rule_cloud_mask(s2, threshold)] = 1
    return out


_S2CLOUDLESS = None


def s2cloudless_detector():
    """The one S2PixelCloudDetector with S2CLOUDLESS_SETTINGS (its LightGBM model loads on first use)."""
    global _S2CLOUDLESS
    if _S2CLOUDLESS is None:
        from s2cloudless import S2PixelCloudDetector
        _S2CLOUDLESS = S2PixelCloudDetector(**S2CLOUDLESS_SETTINGS)
    return _S2CLOUDLESS


def _s2cloudless_input(s2):
    """(13,H,W) reflectance in [0,1] -> (1,H,W,13) as the published loader feeds s2cloudless: float32 DN / 10000.
    LightGBM compares features with thresholds, and bands.normalize_s2's DN * float32(1e-4) differs from DN / 10000
    by one ulp in about a third of the pixels; SEN12MS-CR's DN are integers, which rint recovers exactly."""
    check_detector_product("s2cloudless", product_of(s2))
    dn = np.rint(np.asarray(s2, dtype=np.float32) * np.float32(10000))
    return np.moveaxis(dn / np.float32(10000), 0, -1)[None]


def s2cloudless_score(s2):
    """(13,H,W) reflectance in [0,1] -> (H,W) float32 cloud probability of s2cloudless (LightGBM, offline).
    s2cloudless wants (N,H,W,13) L1C reflectance /10000 in the band order of S2_BANDS, which is ours."""
    return s2cloudless_detector().get_cloud_probability_maps(_s2cloudless_input(s2))[0].astype(np.float32)


def s2cloudless_mask(s2):
    """(13,H,W) reflectance in [0,1] -> (H,W) float32 0/1: S2PixelCloudDetector(**S2CLOUDLESS_SETTINGS)
    .get_cloud_masks, i.e. the probability averaged over a disc of 4 px, > 0.4, dilated by a disc of 2 px."""
    detector = s2cloudless_detector()
    return detector.get_mask_from_prob(s2cloudless_score(s2)[None])[0].astype(np.float32)


def detector_margin(detector):
    """Pixels of context a detector's score at a pixel depends on beyond it, where the dataset grows the crop to
    match the whole raster's mask; 0 for per-pixel scores and for the rule detector, which is kept as published
    (computed on the crop it is given)."""
    return S2CLOUDLESS_MARGIN if detector == "s2cloudless" else 0


def detector_settings(detector, threshold):
    """JSON-ready description of the binary cloud mask a detector gives at `threshold` (result files carry it, so two
    runs can be compared from their files alone)."""
    if detector == "s2cloudless":
        from importlib.metadata import version
        return {"detector": detector, "binary": "S2PixelCloudDetector.get_cloud_masks", **S2CLOUDLESS_SETTINGS,
                "s2cloudless_version": version("s2cloudless"), "cloud_threshold": None}
    scores = {"rule": "DSen2-CR rule cloud score (rule_cloud_score)",
              "s2cloudless_prob": "S2PixelCloudDetector.get_cloud_probability_maps (no averaging, no dilation)",
              "none": "none (no pixel is cloudy)"}
    if detector not in scores:
        raise ValueError(f"unknown cloud detector {detector!r}; use one of {CLOUD_DETECTORS}")
    return {"detector": detector, "score": scores[detector], "binary": "score >= cloud_threshold",
            "cloud_threshold": threshold}


def cloud_score(s2, detector="rule"):
    """Cloud score (H,W) by detector name: soft for "rule" and "s2cloudless_prob", the binary mask (0/1) for
    "s2cloudless"; "none" gives zeros (no pixel flagged)."""
    if detector == "rule":
        return rule_cloud_score(s2)
    if detector == "s2cloudless":
        return s2cloudless_mask(s2)
    if detector == "s2cloudless_prob":
        return s2cloudless_score(s2)
    if detector == "none":
        return np.zeros(np.shape(s2)[1:], dtype=np.float32)
    raise ValueError(f"unknown cloud detector {detector!r}; use one of {CLOUD_DETECTORS}")
