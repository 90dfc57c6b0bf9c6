"""Cloud and cloud-shadow detection on Sentinel-2 reflectance (numpy and scipy; no file I/O).

- rule_cloud_score: the rule set published with DSen2-CR (Meraner et al. 2020), reused by GLF-CR and
  UnCRtainTS, with the original thresholds, vectorised; rule_cloud_mask, shadow_mask, cloud_shadow_mask.
- s2cloudless_score: the s2cloudless LightGBM cloud probability (offline, all 13 bands).
- cloud_score(s2, detector): either by name, or zeros for "none".
Inputs are (13,H,W) reflectance already divided by 10000 (bands.normalize_s2).
"""
import numpy as np
from scipy import ndimage

from bands import S2_BAND_INDEX

CLOUD_DETECTORS = ("rule", "s2cloudless", "none")


# Thresholds below are those of the published `get_cloud_mask` / `get_shadow_mask` (DSen2-CR).
def _rescaled(x, low, high):
    # Not clipped, like the original: negative scores survive until the final clip after smoothing.
    return (x - low) * (1.0 / (high - low))


def _normalized_difference(a, b):
    s = a + b
    s[s == 0] = 0.001  # the original's guard against division by zero
    return (a - b) / s


def rule_cloud_score(s2):
    """(13,H,W) reflectance in [0,1] -> (H,W) float32 soft cloud score in [1e-5, 1]."""
    s2 = np.asarray(s2, dtype=np.float32)
    b = {name: s2[S2_BAND_INDEX[name]] for name in ("B1", "B2", "B3", "B4", "B10", "B11")}
    # Clouds are bright in blue and aerosol/cirrus bands and in all visible bands ...
    score = np.minimum(_rescaled(b["B2"], 0.1, 0.5), 1.0)
    np.minimum(score, _rescaled(b["B1"], 0.1, 0.3), out=score)
    np.minimum(score, _rescaled(b["B1"] + b["B10"], 0.15, 0.2), out=score)
    np.minimum(score, _rescaled(b["B4"] + b["B3"] + b["B2"], 0.2, 0.8), out=score)
    # ... but they are not snow (high NDSI).
    np.minimum(score, _rescaled(_normalized_difference(b["B3"], b["B11"]), 0.8, 0.6), out=score)
    score = ndimage.grey_closing(score, size=(5, 5))
    # The original convolves with a 7x7 box in 'same' mode: zero padding, i.e. mode="constant".
    score = ndimage.uniform_filter(score, size=7, mode="constant", cval=0.0)
    return np.clip(score, 1e-5, 1.0).astype(np.float32)


def rule_cloud_mask(s2, threshold=0.2):
    """(H,W) bool: soft score >= threshold (the original binarisation)."""
    return rule_cloud_score(s2) >= threshold


def shadow_mask(s2):
    """(H,W) bool cloud-shadow mask: dark in NIR+SWIR (CSI) and in blue, relative to the patch statistics,
    then a 5x5 median filter (the original's medfilt2d, zero padded)."""
    s2 = np.asarray(s2, dtype=np.float32)
    blue = s2[S2_BAND_INDEX["B2"]]
    csi = (s2[S2_BAND_INDEX["B8"]] + s2[S2_BAND_INDEX["B11"]]) / 2.0
    t3 = csi.min() + 0.75 * (csi.mean() - csi.min())
    t4 = blue.min() + (5.0 / 6.0) * (blue.mean() - blue.min())
    dark = ((csi < t3) & (blue < t4)).astype(np.float32)
    # Median of a binary 5x5 neighbourhood = majority vote (>= 13 of 25); a box sum is far cheaper.
    votes = ndimage.uniform_filter(dark, size=5, mode="constant", cval=0.0) * 25.0
    return votes > 12.5


def cloud_shadow_mask(s2, threshold=0.2):
    """(H,W) int8: 1 cloud, -1 shadow, 0 clear (clouds win over shadows), like get_cloud_cloudshadow_mask."""
    out = np.where(shadow_mask(s2), -1, 0).astype(np.int8)
    out[rule_cloud_mask(s2, threshold)] = 1
    return out


_S2CLOUDLESS = None


def s2cloudless_score(s2):
    """(13,H,W) reflectance in [0,1] -> (H,W) float32 cloud probability of s2cloudless (LightGBM, offline).
    s2cloudless wants (N,H,W,13) L1C reflectance /10000 in the band order of S2_BANDS, which is ours."""
    global _S2CLOUDLESS
    if _S2CLOUDLESS is None:
        from s2cloudless import S2PixelCloudDetector
        # The settings UnCRtainTS uses for SEN12MS-CR.
        _S2CLOUDLESS = S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)
    s2 = np.asarray(s2, dtype=np.float32)
    return _S2CLOUDLESS.get_cloud_probability_maps(np.moveaxis(s2, 0, -1)[None])[0].astype(np.float32)


def cloud_score(s2, detector="rule"):
    """Soft cloud score (H,W) by detector name; "none" gives zeros (no pixel flagged)."""
    if detector == "rule":
        return rule_cloud_score(s2)
    if detector == "s2cloudless":
        return s2cloudless_score(s2)
    if detector == "none":
        return np.zeros(np.shape(s2)[1:], dtype=np.float32)
    raise ValueError(f"unknown cloud detector {detector!r}; use one of {CLOUD_DETECTORS}")
