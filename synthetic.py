"""Synthetic SEN12MS-CR-like patches: land covers with 13-band spectra and VV/VH backscatter, speckle, clouds.

`generate_patches(n, size, seed)` yields one dict of arrays per patch; `synthetic_sets.make_synthetic_dataset`
writes them as GeoTIFFs in the official layout (the demo data and the test fixtures). numpy, scipy and
satellite-cloud-generator only; no file I/O.

Each scene is a procedural map of five land covers with distinct spectra and matching backscatter plus gamma
speckle; a within-class texture is shared by optical and radar, so the SAR carries what the clouds hide.
Patches of a scene overlap by half, like the real data; every 7th S1 patch has a NaN block. The cloudy image
is a second date (a small per-band gain) with clouds cycling through clear, haze, partial (with shadows) and
overcast. Same seed, same arrays; the caller's numpy and torch RNGs are untouched.
"""
import math

import numpy as np
import torch
from scipy import ndimage

# L1C top-of-atmosphere reflectance (B1..B12) and S1 backscatter (VV, VH dB) of the land covers.
# real_1..real_5 are measured: the k-means centroids (land_covers_from_sample, k=5) of the cloud-free pixels of the
# real SEN12MS-CR patch ROIs2017_winter_112_p797 and the mean backscatter of each cluster, ordered by NIR (B8). So
# the synthetic clear pixels carry real TOA band relations: the aerosol path radiance that keeps B1 near 0.14, the
# water-vapour dip of B9, the near-zero cirrus band B10. That winter patch holds fields and vegetation only, so
# water and urban keep approximate L1C values (not measured here).
LAND_COVERS = {
    "real_1": ([.142, .110, .083, .070, .085, .114, .128, .122, .142, .043, .001, .116, .072], (-7.1, -14.2)),
    "real_2": ([.144, .115, .093, .083, .109, .159, .182, .176, .206, .057, .001, .164, .097], (-8.5, -15.5)),
    "real_3": ([.144, .116, .100, .086, .126, .208, .243, .240, .275, .068, .001, .196, .109], (-10.2, -17.1)),
    "real_4": ([.144, .116, .104, .086, .137, .252, .300, .298, .339, .079, .001, .221, .117], (-11.4, -18.2)),
    "real_5": ([.143, .114, .104, .078, .138, .304, .371, .366, .417, .095, .001, .239, .118], (-13.1, -19.7)),
    "water":  ([.120, .090, .070, .050, .040, .030, .030, .020, .020, .010, .002, .010, .005], (-21.0, -27.0)),
    "urban":  ([.150, .130, .130, .140, .150, .170, .180, .190, .200, .080, .004, .220, .190], (-3.0, -9.5)),
}
# Reflectance of a thick cloud per band (bright and flat in VNIR, lower in SWIR, some cirrus signal in B10).
CLOUD_SPECTRUM = np.array([.55, .52, .50, .50, .50, .50, .50, .50, .50, .30, .08, .40, .30], dtype=np.float32)
CLOUD_REGIMES = ("clear", "haze", "partial", "partial", "overcast")  # cycled so even a few patches vary
CRS = "EPSG:32631"  # UTM 31N, the zone of the real sample
PIXEL_M = 10.0


def land_covers_from_sample(cloudfree, sar_db, k=5, iterations=50, seed=0):
    """k-means (k-means++ start, Lloyd iterations, numpy's seeded Generator) of a real patch's cloud-free spectra.

    cloudfree (13,H,W) reflectance in [0,1], sar_db (2,H,W) dB -> [(spectrum (13,), backscatter (2,), share)] per
    cluster, ordered by NIR (B8) reflectance: how LAND_COVERS' real_* rows were made."""
    x = cloudfree.reshape(cloudfree.shape[0], -1).T.astype(np.float64)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++: far points are likelier next centres
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    centres = np.array(centres)
    for _ in range(iterations):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.array([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
    sar = sar_db.reshape(sar_db.shape[0], -1)
    out = [(centres[c], np.nanmean(sar[:, labels == c], axis=1), float((labels == c).mean())) for c in range(k)]
    return sorted(out, key=lambda row: row[0][7])


def _smooth_noise(rng, shape, sigma):
    return ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")


def land_cover_scene(rng, height, width):
    """Class map (argmax of smooth random fields) -> per-class reflectance (13,H,W) and backscatter (2,H,W) dB."""
    sigma = max(height, width) / 24.0
    fields = np.stack([_smooth_noise(rng, (height, width), sigma) for _ in LAND_COVERS])
    classes = fields.argmax(0)
    spectra = np.array([v[0] for v in LAND_COVERS.values()], dtype=np.float32)      # (5,13)
    sar_db = np.array([v[1] for v in LAND_COVERS.values()], dtype=np.float32)       # (5,2)
    # Within-class texture shared by optical and radar (e.g. biomass), so SAR tells what clouds hide.
    texture = _smooth_noise(rng, (height, width), sigma / 6.0)
    texture /= texture.std() + 1e-6
    reflectance = spectra[classes].transpose(2, 0, 1) * (1.0 + 0.08 * texture)[None]
    reflectance = ndimage.gaussian_filter(reflectance, (0, 0.7, 0.7))  # soft class borders, like 10 m pixels
    backscatter = sar_db[classes].transpose(2, 0, 1) + 1.5 * texture[None]
    return reflectance.astype(np.float32), backscatter.astype(np.float32)


def speckle_db(rng, shape, looks=4.4):
    """Multiplicative speckle of a multi-looked GRD image, in dB (gamma with mean 1)."""
    return (10.0 * np.log10(rng.gamma(looks, 1.0 / looks, size=shape))).astype(np.float32)


def simulate_clouds(clear, regime, seed):
    """(13,H,W) clear reflectance -> (cloudy, cloud opacity (H,W), shadow darkening (H,W)), both maps in [0,1].
    Shapes come from satellite-cloud-generator (Perlin noise, seeded through a forked torch RNG so the caller's
    RNG is untouched); shadows are the cloud shape shifted along a sun direction, so they sit next to the clouds
    casting them. cloudy = clear * (1 - shadow) * (1 - opacity) + CLOUD_SPECTRUM * opacity."""
    import satellite_cloud_generator as scg  # slow to import (matplotlib): only when data is made

    _, h, w = clear.shape
    if regime == "clear":
        return clear.copy(), np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    local = np.random.default_rng(seed)
    params = {
        "haze": dict(min_lvl=(0.05, 0.15), max_lvl=(0.2, 0.45), clear_threshold=0.0, locality_degree=1),
        "partial": dict(min_lvl=0.0, max_lvl=(0.85, 1.0), clear_threshold=float(local.uniform(0.05, 0.6)),
                        locality_degree=int(local.integers(1, 3))),
        "overcast": dict(min_lvl=(0.7, 0.85), max_lvl=(0.95, 1.0), clear_threshold=0.0, locality_degree=1),
    }[regime]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, alpha = scg.add_cloud(torch.zeros(1, 1, h, w), channel_offset=0, channel_magnitude_shift=0.0,
                                 blur_scaling=0.0, cloud_color=False, return_cloud=True, **params)
    alpha = alpha[0, 0].numpy().astype(np.float32)
    shadow = np.zeros_like(alpha)
    if regime == "partial":
        dy, dx = (int(v) for v in local.integers(h // 12, h // 6 + 1, size=2) * local.choice([-1, 1], size=2))
        shadow[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            alpha[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        shadow *= float(local.uniform(0.4, 0.7))
    cloudy = clear * (1.0 - shadow[None]) * (1.0 - alpha[None]) + CLOUD_SPECTRUM[:, None, None] * alpha[None]
    return cloudy.astype(np.float32), alpha, shadow


def generate_patches(n, size=256, seed=0, n_scenes=None):
    """Yield `n` patches as dicts: scene (number), patch (1-based within the scene), origin (x, y) of the
    top-left corner in CRS metres, s1 (2,H,W) float32 dB, s2 (13,H,W) and cloudy (13,H,W) float32 reflectance
    in [0,1]-ish (not yet clipped), the true cloud opacity and shadow darkening (H,W) in [0,1], regime.
    Patches of a scene are overlapping windows of one map."""
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    n_scenes = min(n_scenes or max(3, math.ceil(n / 4)), n)
    rng = np.random.default_rng(seed)
    per_scene = [n // n_scenes + (1 if i < n % n_scenes else 0) for i in range(n_scenes)]
    stride = size // 2
    k = 0
    for s_idx, count in enumerate(per_scene):
        cols = math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
        reflectance, backscatter = land_cover_scene(rng, size + stride * (rows - 1), size + stride * (cols - 1))
        # A second acquisition date for the cloudy image: slight per-band radiometric change.
        date_gain = (1.0 + rng.normal(0.0, 0.02, size=(13, 1, 1))).astype(np.float32)
        x0, y0 = 500000.0 + 20000.0 * s_idx, 5600000.0 - 10000.0 * s_idx
        for p in range(count):
            r, c = divmod(p, cols)
            window = (slice(None), slice(r * stride, r * stride + size), slice(c * stride, c * stride + size))
            clear = reflectance[window]
            sar = backscatter[window] + speckle_db(rng, (2, size, size))
            if k % 7 == 6:
                sar[:, : size // 8, : size // 8] = np.nan  # real S1 patches have NaN holes
            regime = CLOUD_REGIMES[k % len(CLOUD_REGIMES)]
            cloudy, opacity, shadow = simulate_clouds(clear * date_gain, regime, seed=int(rng.integers(2 ** 31)))
            yield {"scene": 100 + s_idx, "patch": 1 + p, "regime": regime, "s1": sar.astype(np.float32),
                   "s2": clear, "cloudy": cloudy, "opacity": opacity, "shadow": shadow,
                   "origin": (x0 + c * stride * PIXEL_M, y0 - r * stride * PIXEL_M)}
            k += 1


# Time series (SEN12MS-CR-TS-like): the cloud regimes of the dates other than the clear one (thin, partly, thick).
TS_CLOUD_REGIMES = ("haze", "partial", "partial", "overcast")
TS_FIRST_DATE, TS_REVISIT_DAYS = (2018, 1, 2), 12  # dates 12 days apart (+0..2), like one series of the real data


def generate_time_series(n, n_dates=4, size=256, seed=0, n_rois=None):
    """Yield `n` time series as dicts: roi (number), patch (1-based within the ROI), origin, dates (S2 dates
    "YYYY-MM-DD"), s1_dates, s1 (T,2,H,W) dB, s2 (T,13,H,W) reflectance, opacity and shadow (T,H,W) true cloud maps,
    regimes, clear (the index of the one clear date). One ground per ROI (patches are overlapping windows of one map,
    as in generate_patches); every date has its own small per-band gain (a radiometric change), its own clouds and
    its own speckle; exactly one date is clear, at a random place in the series, so the least cloudy date is it."""
    import datetime

    if n < 1 or size < 16 or n_dates < 2:
        raise ValueError(f"need n >= 1, size >= 16 and n_dates >= 2, got n={n}, size={size}, n_dates={n_dates}")
    n_rois = min(n_rois or max(3, math.ceil(n / 4)), n)
    rng = np.random.default_rng(seed)
    per_roi = [n // n_rois + (1 if i < n % n_rois else 0) for i in range(n_rois)]
    stride, k = size // 2, 0
    for r_idx, count in enumerate(per_roi):
        cols = math.ceil(math.sqrt(count))
        reflectance, backscatter = land_cover_scene(rng, size + stride * (math.ceil(count / cols) - 1),
                                                    size + stride * (cols - 1))
        gains = (1.0 + rng.normal(0.0, 0.02, size=(n_dates, 13, 1, 1))).astype(np.float32)
        first = datetime.date(*TS_FIRST_DATE)
        days = [TS_REVISIT_DAYS * t + int(rng.integers(3)) for t in range(n_dates)]
        dates = [str(first + datetime.timedelta(days=d)) for d in days]
        s1_dates = [str(first + datetime.timedelta(days=d - int(rng.integers(3)))) for d in days]
        x0, y0 = 500000.0 + 20000.0 * r_idx, 5600000.0 - 10000.0 * r_idx
        for p in range(count):
            r, c = divmod(p, cols)
            window = (slice(None), slice(r * stride, r * stride + size), slice(c * stride, c * stride + size))
            clear_t = int(rng.integers(n_dates))
            regimes = tuple("clear" if t == clear_t else TS_CLOUD_REGIMES[int(rng.integers(len(TS_CLOUD_REGIMES)))]
                            for t in range(n_dates))
            dated = [simulate_clouds(reflectance[window] * gains[t], regimes[t], seed=int(rng.integers(2 ** 31)))
                     for t in range(n_dates)]
            sar = np.stack([backscatter[window] + speckle_db(rng, (2, size, size)) for _ in range(n_dates)])
            if k % 7 == 6:
                sar[int(rng.integers(n_dates)), :, : size // 8, : size // 8] = np.nan  # real S1 has NaN holes
            yield {"roi": r_idx, "patch": 1 + p, "origin": (x0 + c * stride * PIXEL_M, y0 - r * stride * PIXEL_M),
                   "dates": tuple(dates), "s1_dates": tuple(s1_dates), "s1": sar.astype(np.float32),
                   "s2": np.stack([d[0] for d in dated]), "opacity": np.stack([d[1] for d in dated]),
                   "shadow": np.stack([d[2] for d in dated]), "regimes": regimes, "clear": clear_t}
            k += 1
