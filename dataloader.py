"""SEN12MS-CR data: list files, windowed GeoTIFF reading and writing, the Dataset, scanning a download.

    python dataloader.py synth OUT --n 48 --size 128 --seed 0     # demo data in the official layout
    python dataloader.py scan ROOT --out data.csv                  # list a downloaded copy, split by scene
    python dataloader.py scan ROOT --out data.csv --split official # the published SEN12MS-CR scene split
    python dataloader.py scan ROOT --out data.csv --split official-substring  # the published loaders' rule
    python dataloader.py check data.csv --input_data_folder ROOT --strict  # scenes/footprints shared by splits
    python dataloader.py masks --data_list_filepath data.csv --input_data_folder ROOT --out masks   # once

The dataset returns the dict keys of the GLF-CR code (cloudy_data, cloudfree_data, SAR_data, cloud_mask,
file_name) so notebooks written against GLF-CR keep working; GLF-CR's entry points
`get_train_val_test_filelists` and `AlignedDataset` are kept beside the friendlier `SEN12MSCRDataset`.
The band table and encodings live in bands.py, the cloud detectors in clouds.py, the synthetic scene
generator in synthetic.py, the atomic writers and DataError in files.py: import them from there. This module
never imports the model.
"""
import argparse
import contextlib
import csv
import json
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from torch.utils.data import Dataset

import splits
import synthetic
from bands import S1_BANDS, S2_BANDS, denormalize_s2, normalize_s1, normalize_s2
from clouds import BINARY_DETECTORS, CLOUD_DETECTORS, cloud_score, detector_margin, detector_settings
from files import DataError, atomic_output, outermost_new_folder, write_text_atomic
from splits import OFFICIAL_TEST_SCENES, OFFICIAL_VAL_SCENES, SPLIT_IDS, SPLIT_NAMES

KAGGLE_HEADER = ("split", "s1_folder", "s2_folder", "s2_cloudy_folder", "s2_filename", "s1_filename",
                 "s2_cloudy_filename")


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


# The list formats read, for the one error that names what a file is when it is none of them.
LIST_FORMATS = ("GLF-CR 5 columns (split, s1_folder, s2_folder, s2_cloudy_folder, file name) or Kaggle 7 columns "
                "(split, s1_folder, s2_folder, s2_cloudy_folder, s2_filename, s1_filename, s2_cloudy_filename); "
                "comma, tab or semicolon separated, header row and pandas index column optional")
SPLIT_WORDS = {"train": 1, "val": 2, "validation": 2, "test": 3}  # some lists spell the split out
# What a file that is not a text list is, from its first bytes: a data list passed where something else was meant.
_NOT_TEXT = ((b"PK\x03\x04", "a ZIP archive or Excel workbook (save it as CSV)"), (b"\x1f\x8b", "a gzip archive"),
             (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x80", "a Python pickle"),
             (b"\x93NUMPY", "a NumPy array"), (b"\x89HDF", "an HDF5 file"), (b"%PDF", "a PDF document"))


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
    split = str(SPLIT_WORDS.get(split.lower(), split))
    if split not in ("1", "2", "3"):
        raise DataError(f"{where}: split must be 1 (train), 2 (val) or 3 (test), got {split!r}")
    if not all(row[1:]):
        raise DataError(f"{where}: empty folder or file name in {row}")
    return Triplet(int(split), s1, s2, cloudy)


def _list_text(csv_path):
    """The text of a list file (a UTF-8 byte-order mark dropped, any line ending); DataError naming what the file is
    when it is not a text list at all."""
    if csv_path.is_dir():
        raise DataError(f"data list {csv_path} is a folder; pass the CSV file (to list a folder of GeoTIFFs: python "
                        f"dataloader.py scan {csv_path} --out data.csv)")
    if not csv_path.is_file():
        raise DataError(f"data list not found: {csv_path}")
    raw = csv_path.read_bytes()
    seen = next((what for magic, what in _NOT_TEXT if raw.startswith(magic)), None)
    if seen is None and b"\x00" in raw[:4096]:
        seen = "a binary file"
    try:
        text = None if seen else raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:  # Excel on Windows saves "CSV" in the locale's code page
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            seen = "a binary file"
    head = (text or "").lstrip().lower()
    if head.startswith(("<!doctype html", "<html", "<?xml")):
        seen = "an HTML or XML page (a download that returned a web page?)"
    elif head.startswith(("{", "[")):
        seen = "a JSON file"
    if seen:
        raise DataError(f"data list {csv_path} is {seen}, not a list; read: {LIST_FORMATS}")
    return text


def _list_delimiter(first_line):
    """The separator of a list from its first line: comma, else tab, else semicolon (Excel in many locales)."""
    return next((d for d in (",", "\t", ";") if d in first_line), ",")


def read_data_list(csv_path):
    """Read a GLF-CR 5-column or Kaggle 7-column list (comma, tab or semicolon separated; header row, pandas' index
    column, a byte-order mark and CRLF line ends allowed; split 1/2/3 or train/val/test). A file in another format is
    one DataError saying what it looks like and which formats are read."""
    csv_path = Path(csv_path)
    lines = _list_text(csv_path).splitlines()
    first = next((line for line in lines if line.strip()), "")
    rows = [(lineno, row) for lineno, row in enumerate(csv.reader(lines, delimiter=_list_delimiter(first)), start=1)
            if row and "".join(row).strip()]
    index_column = False
    # Only the first non-blank line may be a header: words, no split id, no file name.
    if rows and not _is_split(rows[0][1][0]) and not any(c.strip().lower().endswith((".tif", ".tiff"))
                                                         for c in rows[0][1]):
        header = [c.strip() for c in rows.pop(0)[1]]
        # pandas' to_csv without index=False writes an unnamed first column of row numbers
        index_column = len(header) in (6, 8) and header[0] in ("", "Unnamed: 0", "index")
    if rows and all(len(row) == 1 for _, row in rows):
        lineno, row = rows[0]
        raise DataError(f"{csv_path}:{lineno}: one name per line ({row[0].strip()!r}), like a split file of patch "
                        f"or scene names: a data list needs each triplet's split and three files; write one with "
                        f"python dataloader.py scan ROOT --out data.csv. Read: {LIST_FORMATS}")
    triplets = []
    for lineno, row in rows:
        where = f"{csv_path}:{lineno}"
        if len(row) not in (5, 7) and not index_column:
            raise DataError(f"{where}: expected 5 columns (GLF-CR) or 7 columns (Kaggle), got {len(row)}: "
                            f"{[c.strip() for c in row]}; read: {LIST_FORMATS}")
        triplets.append(_row_to_triplet(row[1:] if index_column else row, where))
    if not triplets:
        raise DataError(f"{csv_path}: no data rows")
    return triplets


def _is_split(cell):
    cell = cell.strip().lower()
    return cell.isdigit() or cell in SPLIT_WORDS


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
        _check_bands(src, bands)
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
                        _check_bands(srcs[0], len(S2_BANDS))
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


def _write_geotiff(path, data, crs, transform, descriptions=None, **creation_options):
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
    return _write_geotiff(path, data, crs, transform, descriptions=descriptions, compress="deflate")


def write_s2_geotiff(path, reflectance01, crs, transform):
    """Write a (13,H,W) [0,1] image as a uint16 x10000 GeoTIFF (the SEN12MS-CR S2 encoding), atomically."""
    data = denormalize_s2(reflectance01)
    if data.ndim != 3:
        raise ValueError(f"expected (C,H,W) reflectance, got shape {data.shape}")
    return _write_geotiff(path, data, crs, transform)


# ---------------------------------------------------------------------------------------------------------------
# Cloud masks: true maps of synthetic data, and detector masks computed once (`python dataloader.py masks`)

# A precomputed mask stores exactly the score the detector gives on the fly, so thresholding it gives the same binary
# mask at any --cloud_threshold: the 0/1 mask of a binary detector as uint8, a soft score as float32 (both deflate).
# (Masks made before stored a soft score as uint8 score x 255, whose rounding moved the threshold: refused below.)
MASK_ENCODINGS = {"binary": "uint8 binary mask (0 clear, 1 cloudy)", "soft": "float32 cloud score"}
LEGACY_MASK_ENCODING = "uint8 soft score x255"
MASK_DETECTORS = tuple(d for d in CLOUD_DETECTORS if d != "none")
MASKS_INFO = "masks.json"  # in a finished mask folder: which detector made its masks
MASKS_PARTIAL = "masks.partial.json"  # in an unfinished one: the detector of the masks made so far


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


def read_mask(path, window=None):
    """A precomputed cloud score (H,W) float32: the binary mask (0/1) or the soft score, as the detector gave it."""
    return read_raster(path, 1, window)[0]


def read_masks_info(mask_dir):
    """The masks.json of a mask folder (detector, settings, encoding); DataError for a folder without one or one made
    with the old uint8 x255 encoding."""
    info = Path(mask_dir) / MASKS_INFO
    if not info.is_file() and (Path(mask_dir) / MASKS_PARTIAL).is_file():
        detector = json.loads((Path(mask_dir) / MASKS_PARTIAL).read_text())["detector"]
        raise DataError(f"{mask_dir}: unfinished {detector} masks (no {MASKS_INFO}); finish them with `python "
                        f"dataloader.py masks ... --detector {detector} --out {mask_dir}` (it resumes)")
    if not info.is_file():
        raise DataError(f"{mask_dir}: no {MASKS_INFO}; make the masks with `python dataloader.py masks ... --out "
                        f"{mask_dir}`")
    meta = json.loads(info.read_text())
    if meta.get("encoding") == LEGACY_MASK_ENCODING:
        old = "s2cloudless_prob" if meta["detector"] == "s2cloudless" else meta["detector"]
        raise DataError(f"{info}: these masks store the score as {LEGACY_MASK_ENCODING}, whose rounding moves the "
                        f"threshold (and their s2cloudless is the raw probability, now --detector s2cloudless_prob); "
                        f"make them again in a new folder: python dataloader.py masks ... --detector {old} --out NEW")
    return meta


def check_mask_dir(mask_dir, triplets):
    """The detector that made the masks in mask_dir; DataError if the folder is not a finished mask folder."""
    detector = read_masks_info(mask_dir)["detector"]
    missing = [t.s2_cloudy for t in triplets if not (Path(mask_dir) / t.s2_cloudy).is_file()]
    if missing:
        raise DataError(f"{Path(mask_dir) / missing[0]}: no precomputed mask ({len(missing)} of {len(triplets)} "
                        f"missing); run `python dataloader.py masks` again with --out {mask_dir} (it resumes)")
    return detector


def describe_cloud_mask(detector, threshold, mask_dir=None):
    """What the binary cloud mask of a run is (clouds.detector_settings), and where it was read from: for
    summary.json, so two runs can be compared from their files alone."""
    if mask_dir is None:
        return {**detector_settings(detector, threshold), "computed": "on the fly"}
    meta = read_masks_info(mask_dir)
    return {**detector_settings(meta["detector"], threshold), "computed": f"precomputed in {mask_dir}",
            "encoding": meta["encoding"]}


def write_cloud_mask(cloudy_path, out_path, detector):
    """The detector's score of a whole cloudy raster, stored exactly (MASK_ENCODINGS) with the raster's
    georeferencing."""
    with rasterio.Env(**GDAL_READ_OPTIONS), open_raster(cloudy_path) as src:
        _check_bands(src, len(S2_BANDS))
        cloudy, crs, transform = normalize_s2(read_window(src, None)), src.crs, src.transform
    score = cloud_score(cloudy, detector)[None]
    if detector in BINARY_DETECTORS:
        return _write_geotiff(out_path, score.astype(np.uint8), crs, transform,
                              descriptions=(f"{detector} cloud mask (1 cloudy)",), compress="deflate")
    return _write_geotiff(out_path, score.astype(np.float32), crs, transform,
                          descriptions=(f"{detector} cloud score",), compress="deflate", predictor=3)


def _mask_worker(job):
    """One mask; a bad input comes back as its message (the other masks go on), anything else is a bug."""
    try:
        write_cloud_mask(*job)
    except DataError as e:
        return job[1], str(e)
    return job[1], None


def _init_mask_worker():
    # One thread per process: the pool already uses every core (s2cloudless' LightGBM would start one per core).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def make_cloud_masks(triplets, root, out_dir, detector, workers=None, progress=True):
    """Compute each triplet's cloud mask once into out_dir (mirroring the cloudy images' relative paths), on all
    cores, skipping masks already there (resumable; each file written atomically). Every cloudy header is checked
    first; masks.json, which tells readers the folder is finished and which detector made it, is written (atomically)
    only when every mask is there. Meanwhile MASKS_PARTIAL names the detector of the masks made so far, so a resumed
    run cannot mix detectors; a run that made no mask leaves nothing behind. A bad input is one DataError after the
    other masks are made. Returns (made, skipped)."""
    import multiprocessing

    from tqdm.auto import tqdm

    if detector not in MASK_DETECTORS:
        raise ValueError(f"detector must be one of {MASK_DETECTORS}, got {detector!r}")
    out_dir = Path(out_dir)
    info, partial = out_dir / MASKS_INFO, out_dir / MASKS_PARTIAL
    if info.is_file() and read_masks_info(out_dir)["detector"] != detector:
        raise DataError(f"{out_dir} holds {read_masks_info(out_dir)['detector']} masks; use another --out for "
                        f"{detector}")
    if partial.is_file() and json.loads(partial.read_text())["detector"] != detector:
        other = json.loads(partial.read_text())["detector"]
        raise DataError(f"{out_dir} holds unfinished {other} masks; finish them with --detector {other}, or use "
                        f"another --out for {detector}")
    check_listed_files(triplets, root, "the data list", cloudy_only=True)
    kind = "binary" if detector in BINARY_DETECTORS else "soft"
    meta = json.dumps({"detector": detector, "settings": detector_settings(detector, None),
                       "encoding": MASK_ENCODINGS[kind]}, indent=2)
    jobs = [(Path(root) / t.s2_cloudy, out_dir / t.s2_cloudy, detector) for t in triplets
            if not (out_dir / t.s2_cloudy).is_file()]
    made_dir, had_partial, made, failed = outermost_new_folder(out_dir), partial.is_file(), 0, []
    try:
        if jobs:
            write_text_atomic(partial, meta)
            workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
            # spawn: fresh workers, no OpenMP state forked from this process
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_mask_worker) as pool:
                done = pool.imap_unordered(_mask_worker, jobs, chunksize=4)
                for _path, problem in tqdm(done, total=len(jobs), desc=f"{detector} masks", disable=not progress,
                                           dynamic_ncols=True):
                    made += problem is None
                    if problem:
                        failed.append(problem)
        if failed:
            raise DataError(f"{failed[0]} ({len(failed)} of {len(jobs)} masks not made"
                            + (f"; the {made} made are kept: fix the file and run the same command again, it "
                               f"resumes)" if made else ")"))
    except BaseException:
        if not made and not had_partial:  # nothing to resume: leave the folder as it was
            partial.unlink(missing_ok=True)
            if made_dir is not None:
                shutil.rmtree(made_dir, ignore_errors=True)
        raise
    write_text_atomic(info, meta)
    partial.unlink(missing_ok=True)
    return made, len(triplets) - len(jobs)


# ---------------------------------------------------------------------------------------------------------------
# Dataset

class SEN12MSCRDataset(Dataset):
    """Triplets (S1, cloud-free S2, cloudy S2) read with rasterio windows.

    crop_size: side of the returned square (None = whole region). load_size: side of the centred region of the
    raster that crops are taken from (None = the whole raster; GLF-CR's load_size); a load_size larger than the
    raster takes the whole raster (one warning per dataset), and a crop_size equal to load_size means "the whole
    region" (so validation at --load_size works on smaller patches). random_crop (default: same as augment) takes
    the crop at a random place, otherwise in the centre; augment adds random flips and 90-degree rotations,
    identical for the three images. Only the crop window is read from disk, so NaN pixels are filled with the
    mean of the band over that crop.
    cloud_detector: "rule" (DSen2-CR rules, soft score), "s2cloudless" (the literature's binary mask, 0/1: the
    whole raster's mask, cropped), "s2cloudless_prob" (its raw probability) or "none" (cloud_mask all zeros, so a
    cloud-weighted loss reduces to an unweighted one). `cloud_binary` is cloud_mask >= cloud_threshold. cloud_mask_dir:
    read cloud_mask from masks precomputed by `python dataloader.py masks` (exactly the detector's score) instead of
    running a detector per sample.
    Where every triplet has a true cloud map (synthetic data, truth_path), samples also hold `cloud_truth`
    (2,H,W: opacity, shadow darkening).
    crop_flag: the command-line flag that set crop_size, named in the error when a raster is smaller than it.
    Every sample is checked from the file headers (check_triplet: bands, size, CRS, transform) and its Sentinel-2
    encoding from its pixels (check_s2_encoding); errors name the files.
    s2_encoding: "float" (default) returns S2 as float32 in [0, 1]; "uint16" returns it as the files' clipped
    uint16 x10000 (half the bytes to copy to a GPU; divide by S2_SCALE there). The cloud mask is the same either way.
    Random choices use torch's generator, which a DataLoader seeds differently in every worker.
    """

    def __init__(self, triplets, root, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=0.2, random_crop=None, cloud_mask_dir=None, crop_flag="--crop_size",
                 s2_encoding="float"):
        if s2_encoding not in ("float", "uint16"):
            raise ValueError(f"s2_encoding must be 'float' or 'uint16', got {s2_encoding!r}")
        self.s2_encoding = s2_encoding
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
        self.crop_flag = crop_flag
        self._warn_if_load_size_exceeds_rasters()
        self.cloud_mask_dir = Path(cloud_mask_dir) if cloud_mask_dir else None
        if self.cloud_mask_dir is not None:
            self.cloud_detector = check_mask_dir(self.cloud_mask_dir, self.triplets)
        self.with_truth = truth_available(self.root, self.triplets)

    def __len__(self):
        return len(self.triplets)

    def _warn_if_load_size_exceeds_rasters(self):
        """One warning per dataset, here in the main process (a DataLoader worker would repeat it every epoch),
        from the first sample's header; _window then takes the whole raster wherever load_size exceeds it."""
        if not self.load_size:
            return
        try:
            with open_raster(self.root / self.triplets[0].s2_cloudy) as src:
                height, width = src.height, src.width
        except DataError:
            return  # __getitem__ reports the file
        if self.load_size > min(height, width):
            warnings.warn(f"--load_size {self.load_size} is larger than the {height}x{width} rasters (first: "
                          f"{self.root / self.triplets[0].s2_cloudy}); the whole raster is used instead",
                          stacklevel=3)

    def _window(self, height, width, path):
        """(row_off, col_off, h, w) of this sample's crop."""
        region_h, region_w = height, width
        if self.load_size:
            region_h, region_w = min(self.load_size, height), min(self.load_size, width)
        top0, left0 = (height - region_h) // 2, (width - region_w) // 2
        ch, cw = region_h, region_w
        if self.crop_size and self.crop_size != self.load_size:  # crop == load_size: the whole region
            if self.crop_size > region_h or self.crop_size > region_w:
                raise DataError(f"{path}: the raster is {height}x{width} px, smaller than {self.crop_flag} "
                                f"{self.crop_size}; pass {self.crop_flag} {min(region_h, region_w)} or less")
            ch = cw = self.crop_size
        if self.random_crop:
            dy = int(torch.randint(region_h - ch + 1, ()).item())
            dx = int(torch.randint(region_w - cw + 1, ()).item())
        else:
            dy, dx = (region_h - ch) // 2, (region_w - cw) // 2
        return top0 + dy, left0 + dx, ch, cw

    def _grown_crop(self, src, window):
        """Where the detector looks beyond a pixel (clouds.detector_margin), the cloudy crop grown by that margin,
        clipped to the raster (whose own border the detector then treats as on the whole raster), and the crop's
        (row, col) offset in it; None for detectors that need no context or masks read from cloud_mask_dir."""
        margin = detector_margin(self.cloud_detector) if self.cloud_mask_dir is None else 0
        if not margin:
            return None
        r, c, h, w = window
        r0, c0 = max(0, r - margin), max(0, c - margin)
        r1, c1 = min(src.height, r + h + margin), min(src.width, c + w + margin)
        return read_window(src, (r0, c0, r1 - r0, c1 - c0)), (r - r0, c - c0)

    def _cloud_score(self, t, window, cloudy, grown):
        """(1,h,w) cloud score of the crop: precomputed, or the detector's, which then equals the whole raster's
        score cropped (run on the grown crop and cut back)."""
        if self.cloud_mask_dir is not None:
            return read_mask(self.cloud_mask_dir / t.s2_cloudy, window)[None]
        if grown is None:
            return cloud_score(cloudy, self.cloud_detector)[None]
        (raw, (dr, dc)), (h, w) = grown, cloudy.shape[-2:]
        return cloud_score(normalize_s2(raw), self.cloud_detector)[None, dr:dr + h, dc:dc + w]

    def __getitem__(self, index):
        t = self.triplets[index]
        paths = [self.root / p for p in (t.s1, t.s2_cloudfree, t.s2_cloudy)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(**GDAL_READ_OPTIONS))
            srcs = [stack.enter_context(open_raster(p)) for p in paths]
            check_triplet(*srcs)
            ref = srcs[2]
            window = self._window(ref.height, ref.width, ref.name)
            sar, cloudfree, cloudy = (read_window(s, window) for s in srcs)
            grown = self._grown_crop(ref, window)
        check_s2_encoding(cloudfree, paths[1])
        check_s2_encoding(cloudy, paths[2])
        sar, cloudfree, cloudy = normalize_s1(sar), normalize_s2(cloudfree), normalize_s2(cloudy)
        score = self._cloud_score(t, window, cloudy, grown)
        if self.s2_encoding == "uint16":
            cloudy, cloudfree = denormalize_s2(cloudy), denormalize_s2(cloudfree)
        arrays = [cloudy, cloudfree, sar, score]
        if self.with_truth:
            arrays.append(read_raster(self.root / truth_path(t.s2_cloudy), len(TRUTH_BANDS), window))
        if self.augment:
            k = int(torch.randint(4, ()).item())
            flip = bool(torch.randint(2, ()).item())
            arrays = [np.rot90(a, k, axes=(1, 2)) for a in arrays]
            if flip:
                arrays = [a[:, :, ::-1] for a in arrays]
        cloudy, cloudfree, sar, score, *truth = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        return {
            **({"cloud_truth": truth[0]} if truth else {}),
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
# GLF-CR's layout: one folder per modality side by side, the same file name in each (ROIs2017_winter_112_p797.tif).
_GLFCR_NAME_RE = re.compile(r"^(ROIs\d+_[a-z]+)_(\d+)_p(\d+)\.tif$", re.IGNORECASE)
GLFCR_FOLDERS = {"s1": "s1", "s2": "s2", "s2_cloudfree": "s2", "s2_cloudy": "s2_cloudy"}
LAYOUTS_READ = ("the official layout at any depth, Kaggle's nesting included (ROIs2017_winter_s1/s1_112/"
                "ROIs2017_winter_s1_112_p797.tif with its _s2_ and _s2_cloudy_ partners), and GLF-CR's (folders s1/, "
                "s2_cloudfree/ or s2/, and s2_cloudy/ side by side holding the same file names)")


def scan_folder(root):
    """Find triplets under `root` in either layout of LAYOUTS_READ. Returns (triplets with split 0, relative paths
    of files whose partners are missing, relative paths of .tif files that fit neither layout). Official names are
    matched by (region-season, scene, patch) at any depth, GLF-CR's by folder and file name."""
    root = data_root(root, "data root")
    found, unrecognised = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = os.path.basename(dirpath).lower()
        for fn in sorted(filenames):
            if not fn.lower().endswith((".tif", ".tiff")):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            m = _FILE_RE.match(fn)
            if m:
                key, mod = ("official", m.group(1), int(m.group(3)), int(m.group(4))), m.group(2).lower()
            elif folder in GLFCR_FOLDERS and dirpath != str(root):
                key, mod = ("glfcr", os.path.dirname(os.path.dirname(rel)), fn), GLFCR_FOLDERS[folder]
            else:
                unrecognised.append(rel)
                continue
            found.setdefault(key, {}).setdefault(mod, rel)  # first copy wins (sorted walk)
    triplets, unpartnered = [], []
    for key in sorted(found):
        mods = found[key]
        if set(mods) == {"s1", "s2", "s2_cloudy"}:
            triplets.append(Triplet(0, mods["s1"], mods["s2"], mods["s2_cloudy"]))
        else:
            unpartnered.extend(sorted(mods.values()))
    return triplets, unpartnered, unrecognised


def scan_layout(root):
    """Find triplets under `root` (scan_folder). Returns (triplets with split 0, list of unpartnered relative
    paths)."""
    return scan_folder(root)[:2]


def _named_patch(path):
    """(region-season, scene, patch) from an official or a GLF-CR file name, else None."""
    name = os.path.basename(path)
    m = _FILE_RE.match(name)
    if m:
        return m.group(1), int(m.group(3)), int(m.group(4))
    m = _GLFCR_NAME_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def scene_of(triplet):
    """(region-season, scene number) of a triplet named in the official (or GLF-CR's) way, else its cloudy file's
    folder."""
    named = _named_patch(triplet.s2_cloudy)
    return named[:2] if named else (os.path.dirname(triplet.s2_cloudy), 0)


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


def official_patch(triplet):
    """((region-season, scene), patch) of a triplet named in the official way, else None."""
    named = _named_patch(triplet.s2_cloudy)
    return (named[:2], named[2]) if named else None


def split_official(triplets):
    """Assign split 1/2/3 by the published scene lists, scenes matched exactly (splits.py, rule "official").
    Returns (triplets, missing) where missing maps "test" and "val" to the official scenes of that split not among
    the triplets (a partial download), in list order."""
    present = {scene_of(t) for t in triplets}
    missing = {name: [(roi, n) for roi, scenes in table.items() for n in scenes if (roi, n) not in present]
               for name, table in (("test", OFFICIAL_TEST_SCENES), ("val", OFFICIAL_VAL_SCENES))}
    return [Triplet(splits.official_split(scene_of(t)), t.s1, t.s2_cloudfree, t.s2_cloudy) for t in triplets], missing


def split_official_substring(triplets):
    """The published loaders' substring rule (splits.substring_splits on each patch's official S1 path): one row per
    split a patch falls in, so a patch may be listed twice and a scene in no list is dropped. Returns (rows,
    doubled, dropped): doubled maps "val" and "test" to their scenes that are also in train; dropped lists the
    scenes in no split."""
    rows, doubled, dropped = [], {"val": set(), "test": set()}, set()
    for t in triplets:
        scene, patch = official_patch(t)
        in_splits = splits.substring_splits(scene, patch)
        rows += [Triplet(split, t.s1, t.s2_cloudfree, t.s2_cloudy) for split in in_splits]
        for split in in_splits[1:] if in_splits[:1] == (1,) else ():
            doubled[SPLIT_NAMES[split]].add(scene)
        if not in_splits:
            dropped.add(scene)
    return rows, {k: sorted(v) for k, v in doubled.items()}, sorted(dropped)


def format_scenes(scenes):
    """[(roi, n), ...] -> "ROIs1158_spring 106, 123; ROIs1970_fall 139" (as the scene lists are written)."""
    by_roi = {}
    for roi, n in scenes:
        by_roi.setdefault(roi, []).append(str(n))
    return "; ".join(f"{roi} {', '.join(ns)}" for roi, ns in by_roi.items())


# ---------------------------------------------------------------------------------------------------------------
# Leak check: scenes and footprints shared by splits (`python dataloader.py check`)

# Lists up to this many triplets get their footprints checked when training or evaluation starts (one header read
# each, about 1 ms on a local disk); larger ones get the scene check there and `dataloader.py check` reads them all.
AUTO_FOOTPRINT_LIMIT = 5000


@dataclass
class LeakReport:
    """What `check_leaks` found. shared: {(split a, split b): scenes in both}; overlaps: {(a, b): (number of split-b
    patches whose footprint overlaps a split-a patch, one example pair of paths)}, None when footprints were not
    read; footprints: how they were read (or why not); split_rule: splits.rule_of for officially named lists, else
    a description."""
    source: str
    counts: dict
    n_scenes: int
    shared: dict
    overlaps: object
    footprints: str
    split_rule: str
    unread: list = field(default_factory=list)  # (split, message naming the file) of triplets not read

    def not_checked(self, pairs=splits.SPLIT_PAIRS):
        """The pairs of splits whose footprint check is incomplete: a file of one of the two could not be read."""
        bad = {split for split, _ in self.unread}
        return [pair for pair in pairs if bad & set(pair)]

    def unread_text(self, splits_wanted=(1, 2, 3)):
        """'N triplet(s) of the test split not read (first: MESSAGE)', or "" when every one was read."""
        unread = [(split, message) for split, message in self.unread if split in splits_wanted]
        if not unread:
            return ""
        names = "/".join(SPLIT_NAMES[s] for s in sorted({split for split, _ in unread}))
        return f"{len(unread)} triplet(s) of the {names} split not read (first: {unread[0][1]})"

    def leaks(self, pairs=splits.SPLIT_PAIRS):
        return any(p in self.shared or (self.overlaps and p in self.overlaps) for p in pairs)

    def pair_text(self, pair):
        """What leaks between two splits, in words; "" when nothing does."""
        a, b = SPLIT_NAMES[pair[0]], SPLIT_NAMES[pair[1]]
        parts = []
        if pair in self.shared:
            scenes = self.shared[pair]
            parts.append(f"{a} and {b} share {len(scenes)} scene{'s' * (len(scenes) > 1)} ({format_scenes(scenes)})")
        if self.overlaps and pair in self.overlaps:
            n, (pa, pb) = self.overlaps[pair]
            parts.append(f"{n} {b} patch{'es' * (n > 1)} overlap {a} patches (e.g. {pb} and {pa})")
        return "; ".join(parts)

    def to_json(self):
        pairs = {f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}": {
            "shared_scenes": [f"{roi} {n}" for roi, n in self.shared.get((a, b), [])],
            "overlapping_patches": None if self.overlaps is None else self.overlaps.get((a, b), (0, None))[0]}
            for a, b in splits.SPLIT_PAIRS}
        return {"data_list": self.source, "leak": self.leaks(), "pairs": pairs, "footprints": self.footprints,
                "split_rule": self.split_rule,
                "not_checked": [f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}" for a, b in self.not_checked()],
                "unread": self.unread_text() or None}


def data_root(root, flag="--input_data_folder"):
    """The data root as a Path; DataError naming the flag when it is not a folder (rather than one "file not found"
    per listed file)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: " + ("is a file, not a folder" if root.exists() else "no such folder"))
    return root


def read_footprints(triplets, root, progress=False):
    """(boxes, unread): boxes[i] is (crs, (left, bottom, right, top), pixel size) of triplet i's cloudy image, from
    its header only, crs None for a raster without georeferencing, None where one of the triplet's three files is
    missing or cannot be opened; unread lists (index, message naming the file) of those. Every file is opened (headers
    only), so a report says "not checked" for what it could not read. The three files of a triplet share a grid
    (check_triplet)."""
    from tqdm.auto import tqdm

    boxes, unread = [], []
    with rasterio.Env(**GDAL_READ_OPTIONS):
        for i, t in enumerate(tqdm(triplets, desc="headers", disable=not progress, dynamic_ncols=True)):
            try:
                for rel in (t.s1, t.s2_cloudfree):
                    open_raster(Path(root) / rel).close()
                with open_raster(Path(root) / t.s2_cloudy) as src:
                    georeferenced = src.crs is not None and not src.transform.is_identity
                    boxes.append((src.crs.to_string() if georeferenced else None, tuple(src.bounds),
                                  min(abs(src.transform.a), abs(src.transform.e))))
            except DataError as e:
                boxes.append(None)
                unread.append((i, str(e)))
    return boxes, unread


def check_leaks(triplets, root=None, source="data list", progress=False):
    """The leak check: scenes shared by two splits (scene_of: official names, else the cloudy file's folder) and,
    with `root`, footprints of patches of two splits that overlap (same CRS, bounds overlapping by at least half a
    pixel; headers only, no pixels). Returns a LeakReport; its `unread` names the files it could not read."""
    shared = splits.shared_scenes((t.split, scene_of(t)) for t in triplets)
    overlaps, footprints, unread = None, "not read (no data root given)", []
    if root is not None:
        data_root(root)
        boxes, problems = read_footprints(triplets, root, progress)
        unread = [(triplets[i].split, message) for i, message in problems]
        found = splits.overlapping_footprints([(t.split, *(box or (None, None, None))) for t, box in
                                               zip(triplets, boxes)])
        overlaps = {pair: (len({j for _, j in ij}), (triplets[ij[0][0]].s2_cloudy, triplets[ij[0][1]].s2_cloudy))
                    for pair, ij in found.items()}
        n_read = sum(box is not None for box in boxes)
        n_geo = sum(box is not None and box[0] is not None for box in boxes)
        footprints = f"{n_read} headers read, {n_geo} georeferenced" + (
            f", {n_read - n_geo} without georeferencing (not compared)" if n_geo < n_read else "") + (
            f", {len(boxes) - n_read} triplet(s) with a listed file missing or unreadable (not checked)"
            if n_read < len(boxes) else "")
    return LeakReport(source, {name: sum(t.split == i for t in triplets) for name, i in SPLIT_IDS.items()},
                      len({scene_of(t) for t in triplets}), shared, overlaps, footprints, _split_rule(triplets, shared),
                      unread)


def _split_rule(triplets, shared):
    named = [official_patch(t) for t in triplets]
    if all(named):
        rule = splits.rule_of((t.split, scene, patch) for t, (scene, patch) in zip(triplets, named))
        if rule:
            return rule
    return "by scene, not the published lists" if not shared else "scenes shared between splits (not by scene)"


def startup_leak_check(csv_path, root):
    """The check that training and evaluation run as they start: scenes always, footprints of lists up to
    AUTO_FOOTPRINT_LIMIT triplets (the report says when they were not read, and why)."""
    triplets = read_data_list(csv_path)
    small = len(triplets) <= AUTO_FOOTPRINT_LIMIT
    report = check_leaks(triplets, root if small else None, source=str(csv_path))
    if not small:
        report.footprints = (f"not read at start-up: {len(triplets)} triplets > {AUTO_FOOTPRINT_LIMIT}; run "
                             f"python dataloader.py check {csv_path} --input_data_folder {root}")
    return report


def leak_warning(report, pairs, root):
    """A line naming what leaks between `pairs` of splits, and one naming the pairs whose footprints could not all be
    read ("not checked"); None when nothing leaks and everything was read."""
    lines = []
    texts = [report.pair_text(pair) for pair in pairs if report.leaks([pair])]
    if texts:
        lines.append(f"warning: {report.source} leaks: {'; '.join(texts)}; scores on those splits are inflated "
                     f"(details: python dataloader.py check {report.source} --input_data_folder {root})")
    unchecked = report.not_checked(pairs)
    if unchecked:
        names = ", ".join(f"{SPLIT_NAMES[a]}-{SPLIT_NAMES[b]}" for a, b in unchecked)
        lines.append(f"warning: leak check of {report.source} incomplete, {names} footprints not checked: "
                     f"{report.unread_text(sorted({s for pair in unchecked for s in pair}))}")
    return "\n".join(lines) or None


# ---------------------------------------------------------------------------------------------------------------
# Synthetic SEN12MS-CR in the official layout (the scenes themselves come from synthetic.py)

def make_synthetic_dataset(out_dir, n, size=256, seed=0, n_scenes=None, roi="ROIs2017_winter",
                           val_frac=0.15, test_frac=0.15):
    """Write `n` synthetic triplets of `size` px in the official SEN12MS-CR layout under out_dir, plus
    out_dir/data.csv (7 columns, split by scene) and each patch's true cloud map (truth_path). Returns the CSV path.
    Deterministic for a seed. Georeferenced in UTM 31N at 10 m; S1 float32 dB (VV, VH); S2 uint16 reflectance
    x10000, 13 bands."""
    out_dir = Path(out_dir)
    triplets = []
    for p in synthetic.generate_patches(n, size=size, seed=seed, n_scenes=n_scenes):
        scene, patch = p["scene"], p["patch"]
        transform = from_origin(*p["origin"], synthetic.PIXEL_M, synthetic.PIXEL_M)
        rel = {}
        for mod, data in (("s1", p["s1"]), ("s2", denormalize_s2(p["s2"])), ("s2_cloudy", denormalize_s2(p["cloudy"]))):
            rel[mod] = os.path.join(f"{roi}_{mod}", f"{mod}_{scene}", f"{roi}_{mod}_{scene}_p{patch}.tif")
            _write_geotiff(out_dir / rel[mod], data, synthetic.CRS, transform)
        _write_geotiff(out_dir / truth_path(rel["s2_cloudy"]), np.stack([p["opacity"], p["shadow"]]), synthetic.CRS,
                       transform, descriptions=TRUTH_BANDS)
        triplets.append(Triplet(0, rel["s1"], rel["s2"], rel["s2_cloudy"]))
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


SCAN_LINES_SHOWN = 20  # "not a SEN12MS-CR file name" lines printed before a count of the rest


def _cmd_scan(args):
    triplets, unpartnered, unrecognised = scan_folder(args.root)
    for rel in unpartnered:
        print(f"no partner: {rel}", file=sys.stderr)
    for rel in unrecognised[:SCAN_LINES_SHOWN]:
        print(f"not a SEN12MS-CR file name: {rel}", file=sys.stderr)
    if len(unrecognised) > SCAN_LINES_SHOWN:
        print(f"... and {len(unrecognised) - SCAN_LINES_SHOWN} more files not named the SEN12MS-CR way",
              file=sys.stderr)
    if not triplets:
        n = len(unpartnered) + len(unrecognised)
        raise DataError(f"{args.root}: no complete SEN12MS-CR triplets found among {n} .tif file(s); scan reads "
                        f"{LAYOUTS_READ}")
    if args.split == "random":
        triplets = split_by_scene(triplets, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    else:
        _note_missing_official(args.root, triplets)
        triplets = _split_by_published_lists(args.split, triplets)
    out = write_data_list(args.out, triplets)
    counts = {name: sum(t.split == i for t in triplets) for name, i in SPLIT_IDS.items()}
    print(f"{len(triplets)} rows, {len({t.s2_cloudy for t in triplets})} triplets in "
          f"{len({scene_of(t) for t in triplets})} scenes {counts}, {args.split} split; "
          f"{len(unpartnered)} files without partner; wrote {out}")
    return 0


def _note_missing_official(root, triplets):
    for name, scenes in split_official(triplets)[1].items():
        if scenes:
            print(f"note: official {name} scenes not found under {root}: {format_scenes(scenes)}"
                  + (" (scores on this test split do not compare with published ones)" if name == "test" else ""),
                  file=sys.stderr)


def _split_by_published_lists(rule, triplets):
    """--split official or official-substring, saying on stderr what the rule does to these triplets."""
    print(f"split {rule}: {splits.SPLIT_RULES[rule]}", file=sys.stderr)
    if rule == "official":
        return split_official(triplets)[0]
    rows, doubled, dropped = split_official_substring(triplets)
    for name, scenes in doubled.items():
        if scenes:
            print(f"note: these {name} scenes are also in train: {format_scenes(scenes)}", file=sys.stderr)
    if dropped:
        print(f"note: scenes in no published list, left out: {format_scenes(dropped)}", file=sys.stderr)
    return rows


def _cmd_check(args):
    triplets = read_data_list(args.data_list)
    report = check_leaks(triplets, args.input_data_folder, source=args.data_list, progress=True)
    counts = ", ".join(f"{name} {n}" for name, n in report.counts.items())
    print(f"{args.data_list}: {len(triplets)} rows ({counts}) in {report.n_scenes} scenes; split rule: "
          f"{report.split_rule}")
    unchecked = report.not_checked()
    for pair in splits.SPLIT_PAIRS:
        name = f"{SPLIT_NAMES[pair[0]]}-{SPLIT_NAMES[pair[1]]}"
        clean = ("no shared scene, footprints NOT CHECKED (files not read)" if pair in unchecked else
                 "no shared scene, no overlapping footprint")
        print(f"{name}: {report.pair_text(pair) or clean}")
    print(f"footprints: {report.footprints}")
    if report.leaks():
        print("LEAK: patches of one place are in two splits; scores on the later split are inflated"
              + ("" if args.strict or report.unread else " (--strict makes this exit 1)"))
    if report.unread:  # a check that could not read its inputs cannot pass, with or without --strict
        print(f"NOT CHECKED: {report.unread_text()}; fetch those files again or list only what is there "
              f"(python dataloader.py scan ROOT --out data.csv)")
        return 2
    if not report.leaks():
        print("no leak found")
        return 0
    return 1 if args.strict else 0


def _cmd_masks(args):
    triplets = read_data_list(args.data_list_filepath)
    made, skipped = make_cloud_masks(triplets, args.input_data_folder, args.out, args.detector, workers=args.workers)
    print(f"{args.detector} masks of {len(triplets)} triplets in {args.out} ({made} made, {skipped} already there); "
          f"use them with --cloud_mask_dir {args.out}")
    return 0


def fraction(text):
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every flag's default (test_CR.py uses it too)."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic SEN12MS-CR tree (official layout) and its data.csv",
                       formatter_class=HelpFormatter)
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--n", type=int, default=48, help="number of triplets")
    p.add_argument("--size", type=int, default=128, help="patch side in pixels (real SEN12MS-CR: 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    p.add_argument("--scenes", type=int, default=None, help="number of scenes; None means max(3, ceil(n/4))")
    p.add_argument("--val_frac", type=fraction, default=0.15, help="fraction of scenes for validation")
    p.add_argument("--test_frac", type=fraction, default=0.15, help="fraction of scenes for test")
    p.set_defaults(func=_cmd_synth)
    p = sub.add_parser("scan", help="list the triplets of a downloaded copy and split them by scene",
                       formatter_class=HelpFormatter)
    p.add_argument("root", help="data root (official layout at any depth, Kaggle's nesting included)")
    p.add_argument("--out", required=True, help="CSV to write (7-column Kaggle format, paths relative to ROOT)")
    p.add_argument("--split", default="random", choices=["random", "official", "official-substring"],
                   help="random: scenes shuffled into val/test by --val_frac/--test_frac (for partial downloads "
                        "such as Kaggle's winter-only copy); official: the published SEN12MS-CR scene lists "
                        "(UnCRtainTS), scenes matched exactly; official-substring: the same lists read the way the "
                        "published loaders read them (a substring test on the path), which also puts 6 test and 3 "
                        "validation scenes in train: to reproduce published figures, not to report new ones. Both "
                        "official rules report official scenes they do not find")
    p.add_argument("--val_frac", type=fraction, default=0.1, help="--split random: fraction of scenes for validation")
    p.add_argument("--test_frac", type=fraction, default=0.1, help="--split random: fraction of scenes for test")
    p.add_argument("--seed", type=int, default=0,
                   help="--split random: seed of the scene shuffle (same seed, same split)")
    p.set_defaults(func=_cmd_scan)
    p = sub.add_parser("check", help="report scenes and footprints that two splits of a data list share (a leak)",
                       formatter_class=HelpFormatter)
    p.add_argument("data_list", help="data list to check (GLF-CR 5-column or Kaggle 7-column)")
    p.add_argument("--input_data_folder", required=True,
                   help="root the list's folders are relative to; every cloudy image's header is read (no pixels)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when two splits share a scene or overlapping footprints (for scripts and CI); "
                        "without it the report is printed and the exit status is 0")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("masks", help="compute every triplet's cloud mask once, for --cloud_mask_dir",
                       formatter_class=HelpFormatter)
    p.add_argument("--data_list_filepath", required=True, help="data list (every split is done)")
    p.add_argument("--input_data_folder", required=True, help="root the list's folders are relative to")
    p.add_argument("--detector", default="s2cloudless", choices=list(MASK_DETECTORS),
                   help="cloud detector (default s2cloudless: the literature's binary mask, too slow to run per "
                        "sample; s2cloudless_prob: its raw probability; rule: the DSen2-CR rules). Each mask is "
                        "stored exactly as the detector gives it on the fly")
    p.add_argument("--out", required=True, help="folder for the masks (mirrors the cloudy images' relative paths)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every CPU core)")
    p.set_defaults(func=_cmd_masks)
    return parser


def main(argv=None):
    """Run a subcommand. Bad data (DataError) prints one line `error: ...` and returns 2, without a traceback;
    flags argparse rejects exit 2 with its usage line. (The scripts above use runtime.run_cli for the same rule;
    this module and runtime do not import each other, so it keeps its own small handler.)"""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "val_frac", 0) + getattr(args, "test_frac", 0) >= 1:
        parser.error(f"--val_frac {args.val_frac} + --test_frac {args.test_frac} must be below 1")
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
