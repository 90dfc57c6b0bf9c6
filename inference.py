"""Running a trained model as the product delivers it: forward_all gives a batch's finished prediction, confidence
and variances; predict_scene removes the clouds of a whole Sentinel-2 scene of any size (tiling, feathered blending of
overlapping tiles, GeoTIFF writing on the input's grid).

    out = forward_all(model, cloudy, sar, runtime.autocast(device, amp_dtype))
    predict_scene(model, "S2.tif", "S1.tif", "cloudfree.tif", tile=256, overlap=32, uncertainty_path=None)
"""
import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window
from tqdm.auto import tqdm

import bands
import files
import rasters
import runtime


def uncertainty_band_descriptions(count):
    """The band descriptions of an uncertainty GeoTIFF of `count` bands (13: L1C, 12: L2A)."""
    return tuple(f"{band} predicted standard deviation (reflectance, 0-1)"
                 for band in bands.s2_bands(bands.s2_product_of_count(count)))


UNCERTAINTY_BAND_DESCRIPTIONS = uncertainty_band_descriptions(len(bands.S2_BANDS))  # L1C's, as before


@torch.no_grad()
def forward_all(model, cloudy, sar, ctx):
    """Everything a forward pass gives, float32: {"prediction" (finished), "confidence" (or None), "date_confidence"
    (N,T,1,H,W: a time series network's map of each input date, or None), the variances
    (N,13,H,W) "aleatoric" (the uncertainty head's), "epistemic" (an ensemble's spread) and "variance" (their sum,
    the predictive variance), each None where the model has no such part}. ctx: the run's autocast context."""
    with ctx:
        prediction, aux = model(cloudy, sar, return_aux=True)
    log_variance, epistemic, confidence = aux.log_variance, aux.epistemic_variance, aux.confidence
    date_confidence = None if aux.date_confidence is None else aux.date_confidence.float()
    aleatoric = None if log_variance is None else log_variance.float().exp()
    epistemic = None if epistemic is None else epistemic.float()
    parts = [v for v in (aleatoric, epistemic) if v is not None]
    return {"prediction": bands.finish_s2(prediction),
            "confidence": None if confidence is None else confidence.float(), "date_confidence": date_confidence,
            "aleatoric": aleatoric, "epistemic": epistemic, "variance": sum(parts) if parts else None}


def forward(model, cloudy, sar, ctx):
    """(finished prediction, confidence or None) in float32; ctx is the run's autocast context (runtime.autocast)."""
    out = forward_all(model, cloudy, sar, ctx)
    return out["prediction"], out["confidence"]


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
        raw = rasters.read_window(sar_src, (y, 0, min(strip, sar_src.height - y), sar_src.width))
        valid = ~np.isnan(raw)
        normed = bands.normalize_s1(raw)  # only NaN pixels are changed by the fill: valid ones are exact
        sums += np.where(valid, normed, 0).sum(axis=(1, 2), dtype=np.float64)
        counts += valid.sum(axis=(1, 2))
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)  # all-NaN band -> 0, as dataloader
    return bands.s1_db_of(means)


def check_scene_pair(cloudy_src, sar_src, s2_product=bands.DEFAULT_S2_PRODUCT, remedy=None):
    """The cloudy S2 must have s2_product's bands (rasters.check_s2_bands; remedy: what to change where it is the
    other product); S1 and S2 must share size, and CRS and transform where both files carry one
    (rasters.grid_problems, the rule of the dataset's triplets); the error names both files. sar_src None: no radar,
    the S2 file alone."""
    rasters.check_s2_bands(cloudy_src, s2_product, remedy)
    if sar_src is None:
        return
    if sar_src.count != len(bands.S1_BANDS):
        raise files.DataError(f"{sar_src.name}: expected {len(bands.S1_BANDS)} Sentinel-1 bands "
                                   f"(VV, VH), found {sar_src.count}")
    problems = rasters.grid_problems(sar_src, cloudy_src)
    if problems:
        raise files.DataError(f"{sar_src.name} and {cloudy_src.name} are not on the same grid: "
                                   + "; ".join(problems) + " (resample the SAR onto the Sentinel-2 grid first)")


def check_scene_stack(cloudy_srcs, sar_srcs, s2_product=bands.DEFAULT_S2_PRODUCT, remedy=None):
    """check_scene_pair for every date (sar_srcs None: no radar), as many SAR as cloudy images, and every date on the
    first one's grid."""
    if sar_srcs is not None and len(cloudy_srcs) != len(sar_srcs):
        raise files.DataError(f"{len(cloudy_srcs)} cloudy and {len(sar_srcs)} SAR images: give one SAR image per "
                              f"date, in the same order")
    for i, cloudy_src in enumerate(cloudy_srcs):
        check_scene_pair(cloudy_src, None if sar_srcs is None else sar_srcs[i], s2_product, remedy)
        problems = rasters.grid_problems(cloudy_src, cloudy_srcs[0])
        if problems:
            raise files.DataError(f"{cloudy_src.name} and {cloudy_srcs[0].name} (the first date) are not on the same "
                                  f"grid: " + "; ".join(problems))


def _read_s2(src, window):
    raw = rasters.read_window(src, window)
    rasters.check_s2_encoding(raw, src.name)  # float [0, 1] reflectance would give a black scene
    return raw


def _fill(raw_db, fill_db):
    nan = np.isnan(raw_db)
    if nan.any():
        raw_db[nan] = np.broadcast_to(fill_db[:, None, None], raw_db.shape)[nan]
    return raw_db


@contextlib.contextmanager
def _scene_output(path, cloudy_src, dtype="uint16", descriptions=None):
    """An open output GeoTIFF of predict_scene: the input's size, CRS and transform, its bands (one per description),
    tiled, deflate."""
    height, width = cloudy_src.height, cloudy_src.width
    profile = dict(driver="GTiff", height=height, width=width, count=len(descriptions), dtype=dtype,
                   crs=cloudy_src.crs, transform=cloudy_src.transform, compress="deflate", tiled=True,
                   blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER")
    # GDAL's block cache (default 5% of RAM) would grow with the scene; two rows of 256 px output blocks
    # (13 bands) plus 32 MB for the input reads is all predict_scene ever revisits.
    block_row = math.ceil(width / 256) * 256 * 256 * len(descriptions) * np.dtype(dtype).itemsize
    cache_mb = 32 + 2 * block_row // 2 ** 20
    with rasterio.Env(GDAL_CACHEMAX=cache_mb), warnings.catch_warnings():
        # An input without georeferencing gives an output without it, as it should.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            for band, text in enumerate(descriptions, start=1):
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


def _scene_tiles(model, cloudy_srcs, sar_srcs, y, xs, size, sar_fills, device, ctx, offsets, series):
    """forward_all of the tiles at scene row y and columns xs, size (th, tw), as numpy arrays on the host: the dates'
    tiles (N,T,C,th,tw) in date order for a series, (N,C,th,tw) for one date. sar_srcs None: no radar; offsets: each
    cloudy file's radiometric offset (rasters.s2_offset)."""
    window = lambda x: (y, x, *size)
    cloudy = np.stack([np.stack([bands.normalize_s2(_read_s2(src, window(x)), offset) for x in xs])
                       for src, offset in zip(cloudy_srcs, offsets)], axis=1)
    sar = None if sar_srcs is None else np.stack([np.stack(
        [bands.normalize_s1(_fill(rasters.read_window(src, window(x)), fill)) for x in xs])
        for src, fill in zip(sar_srcs, sar_fills)], axis=1)
    if not series:
        cloudy, sar = cloudy[:, 0], None if sar is None else sar[:, 0]
    out = forward_all(model, torch.from_numpy(cloudy).to(device),
                      None if sar is None else torch.from_numpy(sar).to(device), ctx)
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
                  amp_dtype=None, progress=True, uncertainty_path=None, s2_product=bands.DEFAULT_S2_PRODUCT,
                  s2_offset=0):
    """Cloud-free prediction of a whole scene, written as a uint16 x10000 GeoTIFF with the input's grid and
    s2_product's bands (named in the band descriptions; reflectance x10000 without offset, whatever the input's);
    with uncertainty_path, the predicted standard deviation of each band beside it (float32, same grid). The cloudy
    file's radiometric offset is its metadata's, else s2_offset (rasters.s2_offset).

    Tiles of `tile` px overlapping by `overlap` px are blended with separable feathered weights (the uncertainty as
    a variance, with the same weights). Memory is one strip of tiles per output: the weighted sum and weights of
    the rows the current tile row covers (13 x tile x width float32); rows no later tile touches are finished,
    written with a windowed write, and dropped. Input tiles are read with rasterio windows and normalised tile by
    tile; an S1 NaN gets the band mean of the whole scene (scene_sar_fill_db), as a whole-image pass would give it.
    sar_path None: the scene without radar (the model is told it is absent; no Sentinel-1 file is read). A time
    series network (input_t > 1) takes lists of input_t cloudy and SAR paths, in date order, every date on the first
    cloudy date's grid; the output takes that grid."""
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    device, out_path = torch.device(device), Path(out_path)
    ctx = runtime.autocast(device, amp_dtype)
    model.eval()
    series = isinstance(cloudy_path, (list, tuple))
    with contextlib.ExitStack() as stack:
        cloudy_srcs = [stack.enter_context(rasters.open_raster(p)) for p in (cloudy_path if series else [cloudy_path])]
        sar_srcs = None if sar_path is None else [stack.enter_context(rasters.open_raster(p))
                                                  for p in (sar_path if series else [sar_path])]
        check_scene_stack(cloudy_srcs, sar_srcs, s2_product)
        offsets = [rasters.s2_offset(src, s2_offset) for src in cloudy_srcs]
        cloudy_path = cloudy_srcs[0].name
        height, width = cloudy_srcs[0].height, cloudy_srcs[0].width
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        size = (min(tile, height), min(tile, width))
        sar_fill = None if sar_srcs is None else [scene_sar_fill_db(s) for s in sar_srcs]
        weight = np.outer(feather(size[0], overlap), feather(size[1], overlap))
        names = bands.s2_bands(s2_product)
        products = {"prediction": (out_path, "uint16", names),
                    "variance": (uncertainty_path, "float32", uncertainty_band_descriptions(len(names)))}
        outputs = {name: stack.enter_context(_scene_output(stack.enter_context(files.atomic_output(path, ".tif")),
                                                           cloudy_srcs[0], dtype, text))
                   for name, (path, dtype, text) in products.items() if path is not None}
        strips = {name: BlendedStrip(len(names), size[0], width) for name in outputs}
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", disable=not progress, dynamic_ncols=True)
        for y in ys:
            _write_rows(outputs, strips, y, cloudy_path)
            for b in range(0, len(xs), batch_sz):
                chunk = xs[b:b + batch_sz]
                out = _scene_tiles(model, cloudy_srcs, sar_srcs, y, chunk, size, sar_fill, device, ctx, offsets,
                                   series)
                if "variance" in strips and out["variance"] is None:
                    raise ValueError("an uncertainty output was asked for, but the model predicts no uncertainty")
                for i, x in enumerate(chunk):
                    for name, strip in strips.items():
                        strip.add(y, x, out[name][i], weight)
                bar.update(len(chunk))
        bar.close()
        _write_rows(outputs, strips, height, cloudy_path)
    return out_path
