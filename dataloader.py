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
This module holds the Dataset, the synthetic data writer and this command line; the list files live in
datalist.py, GeoTIFF reading and writing in rasters.py, precomputed cloud mask folders in cloud_masks.py, scanning a
download and the leak check in scanning.py, the band table and encodings in bands.py, the cloud detectors in
clouds.py, the synthetic scene generator in synthetic.py, the atomic writers and DataError in files.py: import them
from there. This module never imports the model.
"""
import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from torch.utils.data import Dataset

import splits
import synthetic
from bands import denormalize_s2, normalize_s1, normalize_s2
from cloud_masks import MASK_DETECTORS, check_mask_dir, make_cloud_masks, read_mask
from clouds import CLOUD_DETECTORS, CLOUD_THRESHOLD, cloud_score, detector_margin
from datalist import Triplet, read_data_list, row_to_triplet, write_data_list
from files import DataError
from rasters import (
    GDAL_READ_OPTIONS,
    TRUTH_BANDS,
    check_s2_encoding,
    check_triplet,
    open_raster,
    read_raster,
    read_window,
    truth_available,
    truth_path,
    write_geotiff,
)
from scanning import (
    LAYOUTS_READ,
    check_leaks,
    format_scenes,
    scan_folder,
    scene_of,
    split_by_scene,
    split_official,
    split_official_substring,
)
from splits import SPLIT_IDS, SPLIT_NAMES

# ---------------------------------------------------------------------------------------------------------------
# List files in GLF-CR's shape

def get_train_val_test_filelists(csv_path):
    """GLF-CR entry point: (train, val, test) lists of Triplet. Empty lists are returned as they are; building
    a dataset from an empty list raises (use `select_split` for the error right away)."""
    triplets = read_data_list(csv_path)
    return tuple([t for t in triplets if t.split == s] for s in (1, 2, 3))


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
    read_sar=False: no S1 file is opened and samples hold no SAR_data (evaluation without radar).
    Random choices use torch's generator, which a DataLoader seeds differently in every worker.
    """

    def __init__(self, triplets, root, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=CLOUD_THRESHOLD, random_crop=None, cloud_mask_dir=None, crop_flag="--crop_size",
                 s2_encoding="float", read_sar=True):
        if s2_encoding not in ("float", "uint16"):
            raise ValueError(f"s2_encoding must be 'float' or 'uint16', got {s2_encoding!r}")
        self.s2_encoding, self.read_sar = s2_encoding, read_sar
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
        paths = [self.root / p if p else None for p in (t.s1 if self.read_sar else None, t.s2_cloudfree, t.s2_cloudy)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(**GDAL_READ_OPTIONS))
            srcs = [None if p is None else stack.enter_context(open_raster(p)) for p in paths]
            check_triplet(*srcs)
            ref = srcs[2]
            window = self._window(ref.height, ref.width, ref.name)
            sar, cloudfree, cloudy = (None if s is None else read_window(s, window) for s in srcs)
            grown = self._grown_crop(ref, window)
        check_s2_encoding(cloudfree, paths[1])
        check_s2_encoding(cloudy, paths[2])
        cloudfree, cloudy = normalize_s2(cloudfree), normalize_s2(cloudy)
        # read_sar=False: an empty (0,H,W) stand-in rides along the flips and rotations and is left out at the end
        sar = np.zeros((0, *cloudy.shape[1:]), np.float32) if sar is None else normalize_s1(sar)
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
            **({"SAR_data": sar} if self.read_sar else {}),
            "cloud_mask": score,
            "cloud_binary": (score >= self.cloud_threshold).float(),
            "file_name": os.path.basename(t.s2_cloudy),
            "cloudy_path": str(paths[2].resolve()),
            "window": torch.tensor(window, dtype=torch.long),
        }


class AlignedDataset(SEN12MSCRDataset):
    """GLF-CR entry point. `opts` attributes (missing ones take the default): input_data_folder ("."),
    load_size (None), crop_size (None), is_test (False: random crop; True: centre crop), is_use_cloudmask
    (True: rule detector; False: none), cloud_threshold (clouds.CLOUD_THRESHOLD), augment (False: GLF-CR used no
    flips).
    `filelist` items are Triplets or raw 5/7-column rows as GLF-CR's CSV reader returned them."""

    def __init__(self, opts, filelist):
        triplets = [t if isinstance(t, Triplet) else row_to_triplet(list(t), f"filelist row {i}")
                    for i, t in enumerate(filelist)]
        super().__init__(
            triplets, getattr(opts, "input_data_folder", "."),
            crop_size=getattr(opts, "crop_size", None), load_size=getattr(opts, "load_size", None),
            augment=getattr(opts, "augment", False),
            cloud_detector="rule" if getattr(opts, "is_use_cloudmask", True) else "none",
            cloud_threshold=getattr(opts, "cloud_threshold", CLOUD_THRESHOLD),
            random_crop=not getattr(opts, "is_test", False))


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
            write_geotiff(out_dir / rel[mod], data, synthetic.CRS, transform)
        write_geotiff(out_dir / truth_path(rel["s2_cloudy"]), np.stack([p["opacity"], p["shadow"]]), synthetic.CRS,
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
