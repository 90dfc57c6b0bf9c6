"""SEN12MS-CR data: list files, windowed GeoTIFF reading, normalisation, cloud masks, synthetic data.

    python dataloader.py synth OUT --n 48 --size 128 --seed 0     # demo data in the official layout
    python dataloader.py scan ROOT --out data.csv                  # list a downloaded copy, split by scene

The dataset returns the dict keys of the GLF-CR code (cloudy_data, cloudfree_data, SAR_data, cloud_mask,
file_name) so notebooks written against GLF-CR keep working; GLF-CR's entry points
`get_train_val_test_filelists` and `AlignedDataset` are kept beside the friendlier `SEN12MSCRDataset`.
This module never imports the model.
"""
import argparse
import contextlib
import csv
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from scipy import ndimage
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------------------------
# The one band table of the project. Sentinel-2 L1C band order of SEN12MS-CR files (B8A after B8, B10 kept).
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_BAND_INDEX = {name: i for i, name in enumerate(S2_BANDS)}
RGB_BANDS = (S2_BAND_INDEX["B4"], S2_BAND_INDEX["B3"], S2_BAND_INDEX["B2"])  # (3, 2, 1): R, G, B
S1_BANDS = ("VV", "VH")

# DSen2-CR / GLF-CR normalisation, kept identical so scores compare with the published tables.
S1_CLIP_DB = {"VV": (-25.0, 0.0), "VH": (-32.5, 0.0)}
S2_SCALE = 10000.0

CLOUD_DETECTORS = ("rule", "s2cloudless", "none")
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_IDS.items()}
KAGGLE_HEADER = ("split", "s1_folder", "s2_folder", "s2_cloudy_folder", "s2_filename", "s1_filename",
                 "s2_cloudy_filename")

_S1_LOW = np.array([S1_CLIP_DB[b][0] for b in S1_BANDS], dtype=np.float32)[:, None, None]
_S1_HIGH = np.array([S1_CLIP_DB[b][1] for b in S1_BANDS], dtype=np.float32)[:, None, None]


# One fixed display stretch for every quicklook (TensorBoard, test_CR PNGs), so panels compare across images:
# land reflectance rarely exceeds 0.3, so 0..0.3 maps linearly to 0..1 and brighter clouds saturate white.
RGB_STRETCH_MAX = 0.3


def s2_to_rgb(x):
    """(N,13,H,W) or (13,H,W) tensor in [0,1] -> RGB (bands B4,B3,B2) in [0,1] with the fixed stretch."""
    return (x[..., list(RGB_BANDS), :, :].float() / RGB_STRETCH_MAX).clamp(0, 1)


def sar_to_rgb(x):
    """(N,2,H,W) or (2,H,W) normalised SAR -> false colour (VV, VH, their mean) in [0,1]."""
    vv, vh = x[..., 0:1, :, :].float(), x[..., 1:2, :, :].float()
    return torch.cat([vv, vh, (vv + vh) / 2], dim=-3).clamp(0, 1)


class DataError(ValueError):
    """Bad input data: the message names the file (and line, for list files)."""


# ---------------------------------------------------------------------------------------------------------------
# Normalisation

def _fill_nan_with_band_mean(x):
    """In place: NaN -> mean of the finite pixels of the same band; an all-NaN band becomes 0."""
    nan = np.isnan(x)
    if nan.any():
        counts = (~nan).sum(axis=(1, 2))
        sums = np.where(nan, 0, x).sum(axis=(1, 2), dtype=np.float64)
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0).astype(x.dtype)
        x[nan] = np.broadcast_to(means[:, None, None], x.shape)[nan]
    return x


def normalize_s1(arr):
    """(2,H,W) S1 backscatter in dB -> float32 [0,1]: VV clipped to [-25,0], VH to [-32.5,0]."""
    x = np.asarray(arr, dtype=np.float32)
    x = (np.clip(x, _S1_LOW, _S1_HIGH) - _S1_LOW) / (_S1_HIGH - _S1_LOW)  # np.clip keeps NaN as NaN
    return _fill_nan_with_band_mean(x)


def normalize_s2(arr):
    """(13,H,W) S2 reflectance x10000 -> float32 [0,1] (clip to [0,10000], divide by 10000)."""
    x = np.asarray(arr)
    if x.dtype.kind in "ui":  # the files' uint16: clip in integers (cheap), no NaN possible
        return np.multiply(np.clip(x, 0, int(S2_SCALE)), np.float32(1.0 / S2_SCALE), dtype=np.float32)
    x = np.clip(x.astype(np.float32, copy=False), 0.0, S2_SCALE) * np.float32(1.0 / S2_SCALE)
    return _fill_nan_with_band_mean(x)


def finish_s2(prediction):
    """The project's one rule for a predicted S2 image (N,13,H,W or 13,H,W tensor): clamp to [0, 1] (no negative
    reflectance; the encoding tops out at 10000) and round to the uint16 x10000 grid of the dataset, i.e. exactly
    the values a saved GeoTIFF holds. Training validation, test_CR scores, GeoTIFFs and quicklooks all use it."""
    return torch.round(prediction.float().clamp(0.0, 1.0) * S2_SCALE) / S2_SCALE


def denormalize_s2(x):
    """[0,1] float array or tensor -> uint16 numpy reflectance x10000 (values outside [0,1] clipped)."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * S2_SCALE).astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------------
# List files

@dataclass(frozen=True)
class Triplet:
    """One co-registered sample; paths are relative to the data root, as written in the list file."""
    split: int
    s1: str
    s2_cloudfree: str
    s2_cloudy: str

    @property
    def name(self):
        """Stem of the cloudy S2 file: names the outputs written for this sample."""
        return Path(self.s2_cloudy).stem


def _row_to_triplet(row, where):
    """A 5-column GLF-CR or 7-column Kaggle row -> Triplet; `where` ("file:line") goes into errors."""
    row = [c.strip() for c in row]
    if len(row) == 5:
        split, s1_dir, s2_dir, cloudy_dir, name = row
        s1, s2, cloudy = (os.path.join(d, name) for d in (s1_dir, s2_dir, cloudy_dir))
    elif len(row) == 7:
        split, s1_dir, s2_dir, cloudy_dir, s2_name, s1_name, cloudy_name = row
        s1, s2, cloudy = os.path.join(s1_dir, s1_name), os.path.join(s2_dir, s2_name), \
            os.path.join(cloudy_dir, cloudy_name)
    else:
        raise DataError(f"{where}: expected 5 columns (GLF-CR) or 7 columns (Kaggle), got {len(row)}: {row}")
    if split not in ("1", "2", "3"):
        raise DataError(f"{where}: split must be 1 (train), 2 (val) or 3 (test), got {split!r}")
    if not all(row[1:]):
        raise DataError(f"{where}: empty folder or file name in {row}")
    return Triplet(int(split), s1, s2, cloudy)


def read_data_list(csv_path):
    """Read a GLF-CR 5-column or Kaggle 7-column list (comma or tab separated, header row optional)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"data list not found: {csv_path}")
    with open(csv_path, newline="") as f:
        text = f.read()
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = "\t" if "\t" in first and "," not in first else ","  # some GLF-CR forks write TSV
    triplets, first_row = [], True
    for lineno, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1):
        if not row or not "".join(row).strip():
            continue
        if first_row:
            first_row = False
            # Only the first non-blank line may be a header: words, no split id, no file name.
            if not row[0].strip().isdigit() and not any(c.strip().lower().endswith(".tif") for c in row):
                continue
        triplets.append(_row_to_triplet(row, f"{csv_path}:{lineno}"))
    if not triplets:
        raise DataError(f"{csv_path}: no data rows")
    return triplets


def select_split(triplets, split, source="data list"):
    """Rows of one split ("train"/"val"/"test" or 1/2/3); an empty split is an error naming `source`."""
    split_id = SPLIT_IDS.get(split, split)
    if split_id not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; use train, val, test or 1, 2, 3")
    rows = [t for t in triplets if t.split == split_id]
    if not rows:
        raise DataError(f"{source}: no rows with split {split_id} ({SPLIT_NAMES[split_id]})")
    return rows


def get_train_val_test_filelists(csv_path):
    """GLF-CR entry point: (train, val, test) lists of Triplet. Empty lists are returned as they are; building
    a dataset from an empty list raises (use `select_split` for the error right away)."""
    triplets = read_data_list(csv_path)
    return tuple([t for t in triplets if t.split == s] for s in (1, 2, 3))


@contextlib.contextmanager
def atomic_output(path, suffix=".tmp"):
    """Yield a temp file path beside `path`; rename it over `path` when the block succeeds, delete it when it
    fails. A reader (or a run killed half-way) never sees a half-written file. Used for every output the
    project writes: lists, GeoTIFFs, checkpoints, CSV/JSON results, PNGs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace stays on one file system and is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give the output the permissions a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text):
    """Write a text file atomically (see atomic_output)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_data_list(path, triplets):
    """Write the Kaggle 7-column format with a header, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(KAGGLE_HEADER)
        for t in triplets:
            w.writerow([t.split, os.path.dirname(t.s1), os.path.dirname(t.s2_cloudfree),
                        os.path.dirname(t.s2_cloudy), os.path.basename(t.s2_cloudfree),
                        os.path.basename(t.s1), os.path.basename(t.s2_cloudy)])
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# GeoTIFF I/O

# GDAL settings for our reads. GTIFF_VIRTUAL_MEM_IO memory-maps uncompressed GeoTIFFs (SEN12MS-CR's files are
# uncompressed, pixel-interleaved, one-row strips), so a window read copies the bytes instead of filling the
# block cache strip by strip: about 2x faster per sample here; compressed files fall back to normal reads.
# EMPTY_DIR stops GDAL listing the folder for side-car files on every open (a scene folder holds hundreds).
GDAL_READ_OPTIONS = {"GTIFF_VIRTUAL_MEM_IO": "YES", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def open_raster(path):
    """rasterio.open with errors that name the file (DataError)."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot open {path} as a raster: {e}") from None


def _check_bands(src, bands):
    if src.count != bands:
        raise DataError(f"{src.name}: expected {bands} bands, found {src.count}")


def read_raster(path, bands, window=None):
    """Read `window` (rasterio Window or (row_off, col_off, height, width); None = all) of a raster that must
    have `bands` bands, as float32 (C,H,W). Errors name the file."""
    with rasterio.Env(**GDAL_READ_OPTIONS), open_raster(path) as src:
        _check_bands(src, bands)
        return read_window(src, window).astype(np.float32, copy=False)


def read_window(src, window):
    """Read a window ((row_off, col_off, height, width), a rasterio Window, or None = all) of an open raster."""
    if window is not None and not isinstance(window, Window):
        r, c, h, w = (int(v) for v in window)
        window = Window(c, r, w, h)
    try:
        return src.read(window=window)
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot read {src.name}: {e}") from None


def raster_georef(path, window=None):
    """(crs, transform) of a raster, or of a (row_off, col_off, height, width) window of it."""
    with open_raster(path) as src:
        if window is None:
            return src.crs, src.transform
        r, c, h, w = (int(v) for v in window)
        return src.crs, rasterio.windows.transform(Window(c, r, w, h), src.transform)


def _write_geotiff(path, data, crs, transform):
    with atomic_output(path, ".tif") as tmp:
        with rasterio.open(tmp, "w", driver="GTiff", height=data.shape[1], width=data.shape[2],
                           count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform) as dst:
            dst.write(data)
    return Path(path)


def write_s2_geotiff(path, reflectance01, crs, transform):
    """Write a (13,H,W) [0,1] image as a uint16 x10000 GeoTIFF (the SEN12MS-CR S2 encoding), atomically."""
    data = denormalize_s2(reflectance01)
    if data.ndim != 3:
        raise ValueError(f"expected (C,H,W) reflectance, got shape {data.shape}")
    return _write_geotiff(path, data, crs, transform)


# ---------------------------------------------------------------------------------------------------------------
# Cloud and shadow detection (DSen2-CR rule set: Meraner et al. 2020, reused by GLF-CR and UnCRtainTS).
# Thresholds are those of the published `get_cloud_mask` / `get_shadow_mask`; inputs here are already /10000.

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


# ---------------------------------------------------------------------------------------------------------------
# Dataset

class SEN12MSCRDataset(Dataset):
    """Triplets (S1, cloud-free S2, cloudy S2) read with rasterio windows.

    crop_size: side of the returned square (None = whole region). load_size: side of the centred region of the
    raster that crops are taken from (None = the whole raster; GLF-CR's load_size). random_crop (default: same
    as augment) takes the crop at a random place, otherwise in the centre; augment adds random flips and
    90-degree rotations, identical for the three images. Only the crop window is read from disk, so NaN pixels
    are filled with the mean of the band over that crop.
    cloud_detector: "rule" (DSen2-CR rules), "s2cloudless" or "none" (cloud_mask all zeros, so a cloud-weighted
    loss reduces to an unweighted one). `cloud_binary` is cloud_mask >= cloud_threshold.
    Random choices use torch's generator, which a DataLoader seeds differently in every worker.
    """

    def __init__(self, triplets, root, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=0.2, random_crop=None):
        self.triplets = list(triplets)
        if not self.triplets:
            raise DataError(f"no samples: the list of triplets for data root {root} is empty")
        if cloud_detector not in CLOUD_DETECTORS:
            raise ValueError(f"unknown cloud detector {cloud_detector!r}; use one of {CLOUD_DETECTORS}")
        for name, v in (("crop_size", crop_size), ("load_size", load_size)):
            if v is not None and int(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if crop_size and load_size and crop_size > load_size:
            raise ValueError(f"crop_size {crop_size} is larger than load_size {load_size}")
        self.root = Path(root)
        self.crop_size = int(crop_size) if crop_size else None
        self.load_size = int(load_size) if load_size else None
        self.augment = bool(augment)
        self.random_crop = self.augment if random_crop is None else bool(random_crop)
        self.cloud_detector = cloud_detector
        self.cloud_threshold = float(cloud_threshold)

    def __len__(self):
        return len(self.triplets)

    def _window(self, height, width, path):
        """(row_off, col_off, h, w) of this sample's crop."""
        region_h, region_w = height, width
        if self.load_size:
            region_h, region_w = min(self.load_size, height), min(self.load_size, width)
        top0, left0 = (height - region_h) // 2, (width - region_w) // 2
        ch, cw = region_h, region_w
        if self.crop_size:
            if self.crop_size > region_h or self.crop_size > region_w:
                raise DataError(f"{path}: raster {height}x{width} is smaller than crop_size {self.crop_size}")
            ch = cw = self.crop_size
        if self.random_crop:
            dy = int(torch.randint(region_h - ch + 1, ()).item())
            dx = int(torch.randint(region_w - cw + 1, ()).item())
        else:
            dy, dx = (region_h - ch) // 2, (region_w - cw) // 2
        return top0 + dy, left0 + dx, ch, cw

    def __getitem__(self, index):
        t = self.triplets[index]
        paths = [self.root / p for p in (t.s1, t.s2_cloudfree, t.s2_cloudy)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(**GDAL_READ_OPTIONS))
            srcs = []
            for p, bands in zip(paths, (len(S1_BANDS), len(S2_BANDS), len(S2_BANDS))):
                srcs.append(stack.enter_context(open_raster(p)))
                _check_bands(srcs[-1], bands)
            ref = srcs[2]
            for src in srcs[:2]:
                if src.shape != ref.shape:
                    raise DataError(f"{src.name}: size {src.shape} differs from {ref.shape} of {ref.name}")
            window = self._window(ref.height, ref.width, ref.name)
            sar, cloudfree, cloudy = (read_window(s, window) for s in srcs)
        sar, cloudfree, cloudy = normalize_s1(sar), normalize_s2(cloudfree), normalize_s2(cloudy)
        score = cloud_score(cloudy, self.cloud_detector)[None]
        arrays = [cloudy, cloudfree, sar, score]
        if self.augment:
            k = int(torch.randint(4, ()).item())
            flip = bool(torch.randint(2, ()).item())
            arrays = [np.rot90(a, k, axes=(1, 2)) for a in arrays]
            if flip:
                arrays = [a[:, :, ::-1] for a in arrays]
        cloudy, cloudfree, sar, score = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        return {
            "cloudy_data": cloudy,
            "cloudfree_data": cloudfree,
            "SAR_data": sar,
            "cloud_mask": score,
            "cloud_binary": (score >= self.cloud_threshold).float(),
            "file_name": os.path.basename(t.s2_cloudy),
            "cloudy_path": str(paths[2].resolve()),
            "window": torch.tensor(window, dtype=torch.long),
        }


class AlignedDataset(SEN12MSCRDataset):
    """GLF-CR entry point. `opts` attributes (missing ones take the default): input_data_folder ("."),
    load_size (None), crop_size (None), is_test (False: random crop; True: centre crop), is_use_cloudmask
    (True: rule detector; False: none), cloud_threshold (0.2), augment (False: GLF-CR used no flips).
    `filelist` items are Triplets or raw 5/7-column rows as GLF-CR's CSV reader returned them."""

    def __init__(self, opts, filelist):
        triplets = [t if isinstance(t, Triplet) else _row_to_triplet(list(t), f"filelist row {i}")
                    for i, t in enumerate(filelist)]
        super().__init__(
            triplets, getattr(opts, "input_data_folder", "."),
            crop_size=getattr(opts, "crop_size", None), load_size=getattr(opts, "load_size", None),
            augment=getattr(opts, "augment", False),
            cloud_detector="rule" if getattr(opts, "is_use_cloudmask", True) else "none",
            cloud_threshold=getattr(opts, "cloud_threshold", 0.2),
            random_crop=not getattr(opts, "is_test", False))


# ---------------------------------------------------------------------------------------------------------------
# Scanning a downloaded copy (official layout, any nesting depth)

_FILE_RE = re.compile(r"^(ROIs\d+_[a-z]+)_(s1|s2|s2_cloudy)_(\d+)_p(\d+)\.tif$", re.IGNORECASE)


def scan_layout(root):
    """Find triplets under `root` (official names, any folder depth). Returns (triplets with split 0,
    list of unpartnered relative paths). Triplets are matched by (region-season, scene, patch)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            m = _FILE_RE.match(fn)
            if not m:
                continue
            key = (m.group(1), int(m.group(3)), int(m.group(4)))
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            found.setdefault(key, {}).setdefault(m.group(2).lower(), rel)  # first copy wins (sorted walk)
    triplets, unpartnered = [], []
    for key in sorted(found):
        mods = found[key]
        if set(mods) == {"s1", "s2", "s2_cloudy"}:
            triplets.append(Triplet(0, mods["s1"], mods["s2"], mods["s2_cloudy"]))
        else:
            unpartnered.extend(sorted(mods.values()))
    return triplets, unpartnered


def scene_of(triplet):
    """(region-season, scene number) of a triplet named in the official way, else its cloudy file's folder."""
    m = _FILE_RE.match(os.path.basename(triplet.s2_cloudy))
    return (m.group(1), int(m.group(3))) if m else (os.path.dirname(triplet.s2_cloudy), 0)


def split_by_scene(triplets, val_frac=0.1, test_frac=0.1, seed=0):
    """Assign split 1/2/3 per scene (never per patch: neighbouring patches of a scene overlap). The scene order
    is shuffled with `seed`; val and test each get at least one scene when their fraction is > 0 and there
    are at least three scenes."""
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    scenes = sorted({scene_of(t) for t in triplets})
    random.Random(seed).shuffle(scenes)
    n = len(scenes)
    n_test, n_val = round(test_frac * n), round(val_frac * n)
    if n >= 3:
        n_test, n_val = max(n_test, 1 if test_frac > 0 else 0), max(n_val, 1 if val_frac > 0 else 0)
    split_of = {s: 3 for s in scenes[:n_test]}
    split_of.update({s: 2 for s in scenes[n_test:n_test + n_val]})
    return [Triplet(split_of.get(scene_of(t), 1), t.s1, t.s2_cloudfree, t.s2_cloudy) for t in triplets]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic SEN12MS-CR

# Approximate L1C top-of-atmosphere reflectance (B1..B12) and S1 backscatter (VV, VH dB) of five land covers.
LAND_COVERS = {
    "water":      ([.120, .090, .070, .050, .040, .030, .030, .020, .020, .010, .002, .010, .005], (-21.0, -27.0)),
    "forest":     ([.110, .080, .070, .040, .080, .200, .250, .270, .290, .090, .003, .130, .060], (-7.5, -13.0)),
    "cropland":   ([.120, .090, .100, .070, .130, .280, .330, .350, .370, .120, .004, .200, .110], (-10.5, -17.0)),
    "bare_soil":  ([.140, .120, .140, .170, .200, .230, .250, .260, .280, .100, .005, .320, .250], (-13.0, -20.5)),
    "urban":      ([.150, .130, .130, .140, .150, .170, .180, .190, .200, .080, .004, .220, .190], (-3.0, -9.5)),
}
# Reflectance of a thick cloud per band (bright and flat in VNIR, lower in SWIR, some cirrus signal in B10).
CLOUD_SPECTRUM = np.array([.55, .52, .50, .50, .50, .50, .50, .50, .50, .30, .08, .40, .30], dtype=np.float32)
CLOUD_REGIMES = ("clear", "haze", "partial", "partial", "overcast")  # cycled so even a few patches vary


def _smooth_noise(rng, shape, sigma):
    return ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")


def _land_cover_scene(rng, height, width):
    """Class map (argmax of smooth random fields) plus per-class reflectance and backscatter images."""
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


def _speckle_db(rng, shape, looks=4.4):
    """Multiplicative speckle of a multi-looked GRD image, in dB (gamma with mean 1)."""
    return (10.0 * np.log10(rng.gamma(looks, 1.0 / looks, size=shape))).astype(np.float32)


def _simulate_clouds(clear, regime, seed):
    """(13,H,W) clear reflectance -> (cloudy, cloud opacity (H,W)). Shapes come from satellite-cloud-generator
    (Perlin noise, seeded through a forked torch RNG so the caller's RNG is untouched); shadows are the cloud
    shape shifted along a sun direction, so they sit next to the clouds casting them."""
    import satellite_cloud_generator as scg

    _, h, w = clear.shape
    if regime == "clear":
        return clear.copy(), np.zeros((h, w), np.float32)
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
    ground = clear.copy()
    if regime == "partial":
        dy, dx = (int(v) for v in local.integers(h // 12, h // 6 + 1, size=2) * local.choice([-1, 1], size=2))
        shade = np.zeros_like(alpha)
        shade[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            alpha[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        ground *= 1.0 - float(local.uniform(0.4, 0.7)) * shade[None]
    cloudy = ground * (1.0 - alpha[None]) + CLOUD_SPECTRUM[:, None, None] * alpha[None]
    return cloudy.astype(np.float32), alpha


def make_synthetic_dataset(out_dir, n, size=256, seed=0, n_scenes=None, roi="ROIs2017_winter",
                           val_frac=0.15, test_frac=0.15):
    """Write `n` synthetic triplets of `size` px in the official SEN12MS-CR layout under out_dir, plus
    out_dir/data.csv (7 columns, split by scene). Returns the CSV path. Deterministic for a seed.

    Patches of one scene are overlapping windows of one procedural land-cover map (like real SEN12MS-CR,
    where neighbouring patches overlap), georeferenced in UTM 31N at 10 m. S1: float32 dB (VV, VH) with
    speckle and a NaN block in every 7th patch; S2: uint16 reflectance x10000, 13 bands. Cloud regimes cycle
    through clear, haze (thin, full cover), partial (with shadows) and overcast."""
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out_dir = Path(out_dir)
    n_scenes = n_scenes or max(3, math.ceil(n / 4))
    n_scenes = min(n_scenes, n)
    rng = np.random.default_rng(seed)
    per_scene = [n // n_scenes + (1 if i < n % n_scenes else 0) for i in range(n_scenes)]
    stride = size // 2
    triplets, k = [], 0
    for s_idx, count in enumerate(per_scene):
        scene = 100 + s_idx
        cols = math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
        H, W = size + stride * (rows - 1), size + stride * (cols - 1)
        reflectance, backscatter = _land_cover_scene(rng, H, W)
        # A second acquisition date for the cloudy image: slight per-band radiometric change.
        date_gain = (1.0 + rng.normal(0.0, 0.02, size=(13, 1, 1))).astype(np.float32)
        x0, y0 = 500000.0 + 20000.0 * s_idx, 5600000.0 - 10000.0 * s_idx
        for p in range(count):
            r, c = divmod(p, cols)
            sl = (slice(None), slice(r * stride, r * stride + size), slice(c * stride, c * stride + size))
            clear = reflectance[sl]
            sar = backscatter[sl] + _speckle_db(rng, (2, size, size))
            if k % 7 == 6:
                sar[:, : size // 8, : size // 8] = np.nan  # real S1 patches have NaN holes
            regime = CLOUD_REGIMES[k % len(CLOUD_REGIMES)]
            cloudy, _ = _simulate_clouds(clear * date_gain, regime, seed=int(rng.integers(2 ** 31)))
            patch = 1 + p
            transform = from_origin(x0 + c * stride * 10.0, y0 - r * stride * 10.0, 10.0, 10.0)
            rel = {}
            for mod, data in (("s1", sar.astype(np.float32)), ("s2", denormalize_s2(clear)),
                              ("s2_cloudy", denormalize_s2(cloudy))):
                rel[mod] = os.path.join(f"{roi}_{mod}", f"{mod}_{scene}", f"{roi}_{mod}_{scene}_p{patch}.tif")
                _write_geotiff(out_dir / rel[mod], data, "EPSG:32631", transform)
            triplets.append(Triplet(0, rel["s1"], rel["s2"], rel["s2_cloudy"]))
            k += 1
    triplets = split_by_scene(triplets, val_frac=val_frac, test_frac=test_frac, seed=seed)
    return write_data_list(out_dir / "data.csv", triplets)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def _cmd_synth(args):
    csv_path = make_synthetic_dataset(args.out, args.n, size=args.size, seed=args.seed, n_scenes=args.scenes,
                                      val_frac=args.val_frac, test_frac=args.test_frac)
    counts = {name: sum(t.split == i for t in read_data_list(csv_path)) for name, i in SPLIT_IDS.items()}
    print(f"wrote {args.n} synthetic triplets of {args.size} px under {args.out}; list: {csv_path} {counts}")
    return 0


def _cmd_scan(args):
    triplets, unpartnered = scan_layout(args.root)
    for rel in unpartnered:
        print(f"no partner: {rel}", file=sys.stderr)
    if not triplets:
        raise DataError(f"{args.root}: no complete SEN12MS-CR triplets found")
    triplets = split_by_scene(triplets, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    out = write_data_list(args.out, triplets)
    counts = {name: sum(t.split == i for t in triplets) for name, i in SPLIT_IDS.items()}
    print(f"{len(triplets)} triplets in {len({scene_of(t) for t in triplets})} scenes {counts}; "
          f"{len(unpartnered)} files without partner; wrote {out}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic SEN12MS-CR tree (official layout) and its data.csv")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--n", type=int, default=48, help="number of triplets (default 48)")
    p.add_argument("--size", type=int, default=128, help="patch side in pixels (default 128; real data: 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    p.add_argument("--scenes", type=int, default=None, help="number of scenes (default max(3, ceil(n/4)))")
    p.add_argument("--val_frac", type=float, default=0.15, help="fraction of scenes for validation")
    p.add_argument("--test_frac", type=float, default=0.15, help="fraction of scenes for test")
    p.set_defaults(func=_cmd_synth)
    p = sub.add_parser("scan", help="list the triplets of a downloaded copy and split them by scene")
    p.add_argument("root", help="data root (official layout at any depth, Kaggle's nesting included)")
    p.add_argument("--out", required=True, help="CSV to write (7-column Kaggle format, paths relative to ROOT)")
    p.add_argument("--val_frac", type=float, default=0.1, help="fraction of scenes for validation (default 0.1)")
    p.add_argument("--test_frac", type=float, default=0.1, help="fraction of scenes for test (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene shuffle (same seed, same split)")
    p.set_defaults(func=_cmd_scan)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
