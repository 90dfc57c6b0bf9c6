"""SEN12MS-CR data: list files, windowed GeoTIFF reading and writing, the Dataset, scanning a download.

    python dataloader.py synth OUT --n 48 --size 128 --seed 0     # demo data in the official layout
    python dataloader.py scan ROOT --out data.csv                  # list a downloaded copy, split by scene

The dataset returns the dict keys of the GLF-CR code (cloudy_data, cloudfree_data, SAR_data, cloud_mask,
file_name) so notebooks written against GLF-CR keep working; GLF-CR's entry points
`get_train_val_test_filelists` and `AlignedDataset` are kept beside the friendlier `SEN12MSCRDataset`.
The band table and encodings live in bands.py, the cloud detectors in clouds.py, the synthetic scene
generator in synthetic.py; their public names are re-exported here. This module never imports the model.
"""
import argparse
import contextlib
import csv
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
from torch.utils.data import Dataset

import synthetic
from bands import (RGB_BANDS, RGB_STRETCH_MAX, S1_BANDS, S1_CLIP_DB, S2_BAND_INDEX, S2_BANDS, S2_SCALE,  # noqa: F401
                   denormalize_s2, finish_s2, normalize_s1, normalize_s2, s1_db_of, s2_to_rgb, sar_to_rgb)
from clouds import (CLOUD_DETECTORS, cloud_score, cloud_shadow_mask, rule_cloud_mask, rule_cloud_score,  # noqa: F401
                    s2cloudless_score, shadow_mask)

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_IDS.items()}
KAGGLE_HEADER = ("split", "s1_folder", "s2_folder", "s2_cloudy_folder", "s2_filename", "s1_filename",
                 "s2_cloudy_filename")


class DataError(ValueError):
    """Bad input data: the message names the file (and line, for list files)."""


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
    s2_encoding: "float" (default) returns S2 as float32 in [0, 1]; "uint16" returns it as the files' clipped
    uint16 x10000 (half the bytes to copy to a GPU; divide by S2_SCALE there). The cloud mask is the same either way.
    Random choices use torch's generator, which a DataLoader seeds differently in every worker.
    """

    def __init__(self, triplets, root, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=0.2, random_crop=None, s2_encoding="float"):
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
        if self.s2_encoding == "uint16":
            cloudy, cloudfree = denormalize_s2(cloudy), denormalize_s2(cloudfree)
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
# Synthetic SEN12MS-CR in the official layout (the scenes themselves come from synthetic.py)

def make_synthetic_dataset(out_dir, n, size=256, seed=0, n_scenes=None, roi="ROIs2017_winter",
                           val_frac=0.15, test_frac=0.15):
    """Write `n` synthetic triplets of `size` px in the official SEN12MS-CR layout under out_dir, plus
    out_dir/data.csv (7 columns, split by scene). Returns the CSV path. Deterministic for a seed.
    Georeferenced in UTM 31N at 10 m; S1 float32 dB (VV, VH); S2 uint16 reflectance x10000, 13 bands."""
    out_dir = Path(out_dir)
    triplets = []
    for p in synthetic.generate_patches(n, size=size, seed=seed, n_scenes=n_scenes):
        scene, patch = p["scene"], p["patch"]
        transform = from_origin(*p["origin"], synthetic.PIXEL_M, synthetic.PIXEL_M)
        rel = {}
        for mod, data in (("s1", p["s1"]), ("s2", denormalize_s2(p["s2"])), ("s2_cloudy", denormalize_s2(p["cloudy"]))):
            rel[mod] = os.path.join(f"{roi}_{mod}", f"{mod}_{scene}", f"{roi}_{mod}_{scene}_p{patch}.tif")
            _write_geotiff(out_dir / rel[mod], data, synthetic.CRS, transform)
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
