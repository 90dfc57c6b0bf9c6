"""Raster I/O: opening, reading and writing GeoTIFFs with errors that name the file, header checks of a triplet,
and the true cloud maps of synthetic data."""
import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.windows import Window

from bands import S1_BANDS, S2_BANDS, denormalize_s2
from files import DataError, atomic_output

# GDAL settings for our reads. GTIFF_VIRTUAL_MEM_IO memory-maps uncompressed GeoTIFFs (SEN12MS-CR's files are
# uncompressed, pixel-interleaved, one-row strips), so a window read copies the bytes instead of filling the
# block cache strip by strip: about 2x faster per sample here; compressed files fall back to normal reads.
# EMPTY_DIR stops GDAL listing the folder for side-car files on every open (a scene folder holds hundreds).
GDAL_READ_OPTIONS = {"GTIFF_VIRTUAL_MEM_IO": "YES", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def open_raster(path):
    """rasterio.open with errors that name the file (DataError). A raster without georeferencing (derived
    SEN12MS-CR copies often lose it) opens without rasterio's NotGeoreferencedWarning: it is a supported case."""
    path = str(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a GeoTIFF file (check the list's folder and file columns)")
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioError as e:
        seen = _not_a_raster(path)
        raise DataError(f"cannot open {path} as a raster: {seen or gdal_cause(e)}"
                        + (" (download the file again)" if seen else "")) from None


def _not_a_raster(path):
    """What a file that GDAL cannot open is, where its bytes say it plainly (empty, a web page), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return e.strerror or str(e)
    if not head:
        return "the file is empty (0 bytes)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        return "the file is a web page or JSON text, not a GeoTIFF"
    return None


def gdal_cause(error):
    """The message of a rasterio error, with GDAL's own reason: rasterio often says only "Read failed. See previous
    exception for details." and keeps the reason (e.g. "TIFFReadEncodedStrip() failed") in the chained exception."""
    messages, e = [], error
    while e is not None and len(messages) < 4:
        text = str(e).strip()
        if text and "See previous exception" not in text and text not in messages:
            messages.append(text)
        e = e.__cause__ or e.__context__
    return "; ".join(messages) or type(error).__name__


def check_bands(src, bands):
    if src.count != bands:
        raise DataError(f"{src.name}: expected {bands} bands, found {src.count}")


def read_raster(path, bands, window=None):
    """Read `window` (rasterio Window or (row_off, col_off, height, width); None = all) of a raster that must
    have `bands` bands, as float32 (C,H,W). Errors name the file."""
    with rasterio.Env(**GDAL_READ_OPTIONS), open_raster(path) as src:
        check_bands(src, bands)
        return read_window(src, window).astype(np.float32, copy=False)


def read_window(src, window):
    """Read a window ((row_off, col_off, height, width), a rasterio Window, or None = all) of an open raster."""
    if window is not None and not isinstance(window, Window):
        r, c, h, w = (int(v) for v in window)
        window = Window(c, r, w, h)
    try:
        return src.read(window=window)
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot read {src.name}: {gdal_cause(e)} (the file is damaged or incomplete, e.g. a "
                        f"download that stopped early: fetch it again)") from None


def _same_transform(a, b):
    """Equal pixel grids up to 1% of a pixel (headers written by different tools differ in the last digits)."""
    tolerance = 0.01 * min(abs(a.a), abs(a.e))
    return max(abs(p - q) for p, q in zip(tuple(a)[:6], tuple(b)[:6])) <= tolerance


def grid_problems(a, b):
    """How the pixel grids of two open rasters differ: size always; CRS and transform where both files carry one
    (a raster without georeferencing has no CRS and the identity transform, so it is checked by size alone)."""
    problems = []
    if a.shape != b.shape:
        problems.append(f"size {a.height}x{a.width} differs from {b.height}x{b.width}")
    if a.crs and b.crs and a.crs != b.crs:
        problems.append(f"CRS {a.crs} vs {b.crs}")
    ta, tb = a.transform, b.transform
    if not ta.is_identity and not tb.is_identity and not _same_transform(ta, tb):
        problems.append(f"transform: origin ({ta.c:.1f}, {ta.f:.1f}) vs ({tb.c:.1f}, {tb.f:.1f}), "
                        f"pixel ({ta.a:g}, {ta.e:g}) vs ({tb.a:g}, {tb.e:g})")
    return problems


def check_triplet(s1, s2_cloudfree, s2_cloudy):
    """Header checks of one triplet's open rasters (cheap, no pixels read): band counts, and S1 and cloud-free S2
    on the cloudy S2's grid (size, CRS, transform). Errors name both files of a mismatched pair."""
    for src, bands in ((s1, len(S1_BANDS)), (s2_cloudfree, len(S2_BANDS)), (s2_cloudy, len(S2_BANDS))):
        check_bands(src, bands)
    for src in (s1, s2_cloudfree):
        problems = grid_problems(src, s2_cloudy)
        if problems:
            raise DataError(f"{src.name} and {s2_cloudy.name} are not on the same grid: {'; '.join(problems)} "
                            f"(the three files of a triplet must cover the same pixels: check this row of the "
                            f"data list, or resample the file onto the cloudy Sentinel-2 grid)")


def check_listed_files(triplets, root, source="data list", cloudy_only=False, progress=False):
    """Before any work: open the header of every listed file (no pixels) and check each triplet (check_triplet; the
    cloudy image's band count alone with cloudy_only). One DataError naming the first problem and how many triplets
    of `source` have one, so a run never stops on a bad file after hours."""
    from tqdm.auto import tqdm

    root = data_root(root)
    problems = []
    with rasterio.Env(**GDAL_READ_OPTIONS):
        for t in tqdm(triplets, desc="checking files", disable=not progress, dynamic_ncols=True):
            try:
                with contextlib.ExitStack() as stack:
                    paths = (t.s2_cloudy,) if cloudy_only else (t.s1, t.s2_cloudfree, t.s2_cloudy)
                    srcs = [stack.enter_context(open_raster(root / rel)) for rel in paths]
                    if cloudy_only:
                        check_bands(srcs[0], len(S2_BANDS))
                    else:
                        check_triplet(*srcs)
            except DataError as e:
                problems.append(str(e))
    if problems:
        raise DataError(problems[0] + (f" ({len(problems)} of the {len(triplets)} triplets of {source} have a "
                                       f"problem; this is the first)" if len(problems) > 1 else ""))


# Sentinel-2 reflectance already divided by 10000 peaks near 1 (bright clouds ~1.5); x10000 data peaks in the
# thousands, so a float band whose maximum is at most this is the [0, 1] encoding.
S2_FLOAT_REFLECTANCE_MAX = 2.0


def check_s2_encoding(data, path):
    """Refuse Sentinel-2 pixels already scaled to float reflectance in [0, 1]: normalize_s2 would divide them by
    10000 again and the network would see (and predict) a black image."""
    if data.dtype.kind != "f" or data.size == 0:
        return
    peak = float(np.fmax.reduce(data, axis=None))  # NaN-tolerant maximum
    if 0 < peak <= S2_FLOAT_REFLECTANCE_MAX:
        raise DataError(f"{path}: Sentinel-2 values are {data.dtype} with maximum {peak:.3g}, i.e. reflectance in "
                        f"[0, 1]; expected reflectance x10000 (uint16, as SEN12MS-CR ships it). Convert with: "
                        f"gdal_translate -ot UInt16 -scale 0 1 0 10000 {path} {Path(path).stem}_x10000.tif")


def raster_georef(path, window=None):
    """(crs, transform) of a raster, or of a (row_off, col_off, height, width) window of it."""
    with open_raster(path) as src:
        if window is None:
            return src.crs, src.transform
        r, c, h, w = (int(v) for v in window)
        return src.crs, rasterio.windows.transform(Window(c, r, w, h), src.transform)


def write_geotiff(path, data, crs, transform, descriptions=None, **creation_options):
    with atomic_output(path, ".tif") as tmp, warnings.catch_warnings():
        # An input without georeferencing gives an output without it (crs None, identity transform), as it should.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                           dtype=data.dtype, crs=crs, transform=transform, **creation_options) as dst:
            dst.write(data)
            for band, text in enumerate(descriptions or (), start=1):
                dst.set_band_description(band, text)
    return Path(path)


def truth_path(cloudy_rel):
    """Where a cloudy image's true cloud map lives (synthetic data only): beside it, every `s2_cloudy` of its
    relative path replaced by `cloud_truth` (ROIs2017_winter_cloud_truth/cloud_truth_100/..._cloud_truth_100_p1.tif).
    Two float32 bands: cloud opacity and shadow darkening, each in [0, 1]. None for a path without `s2_cloudy`."""
    return str(cloudy_rel).replace("s2_cloudy", "cloud_truth") if "s2_cloudy" in str(cloudy_rel) else None


def ts_truth_path(s2_rel):
    """Where a time series date's true cloud map lives (synthetic series only): ROIs1970/200/S2/3/s2_..._patch_1.tif
    -> ROIs1970/200/cloud_truth/3/cloud_truth_..._patch_1.tif (TRUTH_BANDS). None for a path not in that layout."""
    parts = list(Path(s2_rel).parts)
    if len(parts) < 3 or parts[-3] != "S2" or not parts[-1].startswith("s2_"):
        return None
    parts[-3], parts[-1] = "cloud_truth", "cloud_truth_" + parts[-1][len("s2_"):]
    return str(Path(*parts))


TRUTH_BANDS = ("cloud_opacity", "shadow_darkening")
TRUTH_THRESHOLD = 0.05  # opacity or darkening above this counts as "needs correction" (cloud or shadow)


def truth_mask(cloud_truth):
    """(N,2,H,W) or (2,H,W) cloud truth -> bool (N,1,H,W) / (1,H,W): cloud or shadow above TRUTH_THRESHOLD."""
    return (cloud_truth > TRUTH_THRESHOLD).any(dim=-3, keepdim=True)


def write_float_geotiff(path, image, crs, transform, description=None):
    """Write a (C,H,W) or (H,W) float map (e.g. a confidence map) as float32 GeoTIFF, atomically; description: one
    text for every band, or a sequence of one per band."""
    data = np.asarray(image.detach().float().cpu() if torch.is_tensor(image) else image, dtype=np.float32)
    data = data[None] if data.ndim == 2 else data
    descriptions = [description] * len(data) if isinstance(description, str) else description
    return write_geotiff(path, data, crs, transform, descriptions=descriptions, compress="deflate")


def write_s2_geotiff(path, reflectance01, crs, transform):
    """Write a (13,H,W) [0,1] image as a uint16 x10000 GeoTIFF (the SEN12MS-CR S2 encoding), atomically."""
    data = denormalize_s2(reflectance01)
    if data.ndim != 3:
        raise ValueError(f"expected (C,H,W) reflectance, got shape {data.shape}")
    return write_geotiff(path, data, crs, transform)


def data_root(root, flag="--input_data_folder"):
    """The data root as a Path; DataError naming the flag when it is not a folder (rather than one "file not found"
    per listed file)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: " + ("is a file, not a folder" if root.exists() else "no such folder"))
    return root


def truth_available(root, triplets):
    """True when every triplet has a true cloud map, False when none has; a partial set is an error."""
    have = [truth_path(t.s2_cloudy) is not None and (Path(root) / truth_path(t.s2_cloudy)).is_file()
            for t in triplets]
    if any(have) and not all(have):
        missing = triplets[have.index(False)]
        raise DataError(f"{Path(root) / (truth_path(missing.s2_cloudy) or missing.s2_cloudy)}: no true cloud map, "
                        f"while other triplets of the list "
                        f"have a true cloud map; make the set again or remove the cloud_truth folders")
    return all(have)
