"""SEN12MS-CR data: list files, windowed GeoTIFF reading and writing, the Dataset, scanning a download.

    python dataloader.py synth OUT --n 48 --size 128 --seed 0     # demo data in the official layout
    python dataloader.py synth OUT --s2_product L2A                # the same as Level-2A files (12 bands, offset)
    python dataloader.py scan ROOT --out data.csv                  # list a downloaded copy, split by scene
    python dataloader.py scan ROOT --out data.csv --split official # the published SEN12MS-CR scene split
    python dataloader.py scan ROOT --out data.csv --split official-substring  # the published loaders' rule
    python dataloader.py check data.csv --input_data_folder ROOT --strict  # scenes/footprints shared by splits
    python dataloader.py masks --data_list_filepath data.csv --input_data_folder ROOT --out masks   # once
    python dataloader.py synth OUT --n 12 --time_series 6          # SEN12MS-CR-TS-like series (TS layout)
    python dataloader.py scan TS_ROOT --out ts.csv --split official # a SEN12MS-CR-TS tree -> a time-series list
    python dataloader.py coverage --data_list_filepath ts.csv --input_data_folder TS_ROOT --out coverage.json

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
from torch.utils.data import Dataset

import splits
import synthetic_sets
from bands import DEFAULT_S2_PRODUCT, S2_PRODUCTS, denormalize_s2, normalize_s1, normalize_s2, s2_bands
from cloud_masks import (
    COVERAGE_DETECTOR,
    MASK_DETECTORS,
    check_mask_dir,
    coverage_for,
    date_coverage,
    make_cloud_masks,
    make_coverage_cache,
    read_mask,
)
from clouds import CLOUD_DETECTORS, CLOUD_THRESHOLD, check_detector_product, cloud_score, detector_margin
from datalist import Triplet, read_data_list, read_ts_list, row_to_triplet, write_data_list, write_ts_list
from date_sampling import DEFAULT_SAMPLER, MAX_COVERAGE, MIN_COVERAGE, SAMPLERS, published_leaks, sample_dates
from files import DataError
from rasters import (
    GDAL_READ_OPTIONS,
    TRUTH_BANDS,
    check_s2_encoding,
    check_triplet,
    open_raster,
    read_raster,
    read_window,
    s2_offset,
    truth_available,
    truth_path,
    ts_truth_path,
)
from scanning import (
    LAYOUTS_READ,
    TS_LAYOUT,
    check_leaks,
    format_scenes,
    scan_folder,
    scan_ts_folder,
    scene_of,
    split_by_scene,
    split_official,
    split_official_substring,
    split_ts_by_roi,
    split_ts_official,
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
    s2_product: "L1C" (SEN12MS-CR's 13 bands) or "L2A" (12, no B10), bands.S2_PRODUCTS; a file of the other product
    is refused in one line naming both. s2_offset: the radiometric offset in DN (-1000 for processing baseline 04.00
    and later) of files whose metadata carries none (rasters.s2_offset); a file's own offset wins.
    read_sar=False: no S1 file is opened and samples hold no SAR_data (evaluation without radar).
    Random choices use torch's generator, which a DataLoader seeds differently in every worker.
    """

    def __init__(self, triplets, root, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=CLOUD_THRESHOLD, random_crop=None, cloud_mask_dir=None, crop_flag="--crop_size",
                 s2_encoding="float", s2_product=DEFAULT_S2_PRODUCT, s2_offset=0, read_sar=True):
        if s2_encoding not in ("float", "uint16"):
            raise ValueError(f"s2_encoding must be 'float' or 'uint16', got {s2_encoding!r}")
        self.s2_encoding, self.read_sar = s2_encoding, read_sar
        s2_bands(s2_product)  # ValueError for an unknown product
        check_detector_product(cloud_detector, s2_product)
        self.s2_product, self.s2_offset = s2_product, int(s2_offset)
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

    def _cloud_score(self, t, window, cloudy, grown, offset):
        """(1,h,w) cloud score of the crop: precomputed, or the detector's, which then equals the whole raster's
        score cropped (run on the grown crop, whose DN take the cloudy file's offset, and cut back)."""
        if self.cloud_mask_dir is not None:
            return read_mask(self.cloud_mask_dir / t.s2_cloudy, window)[None]
        if grown is None:
            return cloud_score(cloudy, self.cloud_detector)[None]
        (raw, (dr, dc)), (h, w) = grown, cloudy.shape[-2:]
        return cloud_score(normalize_s2(raw, offset), self.cloud_detector)[None, dr:dr + h, dc:dc + w]

    def __getitem__(self, index):
        t = self.triplets[index]
        paths = [self.root / p if p else None for p in (t.s1 if self.read_sar else None, t.s2_cloudfree, t.s2_cloudy)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(**GDAL_READ_OPTIONS))
            srcs = [None if p is None else stack.enter_context(open_raster(p)) for p in paths]
            check_triplet(*srcs, s2_product=self.s2_product)
            ref = srcs[2]
            window = self._window(ref.height, ref.width, ref.name)
            sar, cloudfree, cloudy = (None if s is None else read_window(s, window) for s in srcs)
            grown = self._grown_crop(ref, window)
            cloudfree_offset, cloudy_offset = (s2_offset(s, self.s2_offset) for s in srcs[1:])
        check_s2_encoding(cloudfree, paths[1])
        check_s2_encoding(cloudy, paths[2])
        cloudfree, cloudy = normalize_s2(cloudfree, cloudfree_offset), normalize_s2(cloudy, cloudy_offset)
        # read_sar=False: an empty (0,H,W) stand-in rides along the flips and rotations and is left out at the end
        sar = np.zeros((0, *cloudy.shape[1:]), np.float32) if sar is None else normalize_s1(sar)
        score = self._cloud_score(t, window, cloudy, grown, cloudy_offset)
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


class SEN12MSCRTSDataset(SEN12MSCRDataset):
    """SEN12MS-CR-TS time series (datalist.TimeSeries): `input_t` cloudy dates, each with its radar, and the target
    date's Sentinel-2. The dates come from each date's cloud coverage by a sampler of date_sampling.SAMPLERS
    ("leak_free", the default, never gives the target as an input; "published" is UnCRtainTS's fixed sampler as
    written) with min_cov/max_cov. Coverage is read from `coverage_cache` (made once by `python dataloader.py
    coverage`, which names its detector) or, without one, computed per item with `coverage_detector` from every date
    of the series (the published loader's on-the-fly mode: slow on real data).
    crop_size, load_size, augment, random_crop, cloud_detector, cloud_threshold, crop_flag and s2_encoding mean what
    they mean in SEN12MSCRDataset; the crop and the flips are the same for every date. Every date's files are checked
    from their headers (bands, the grid of the first input date) and pixels (check_s2_encoding); errors name files.
    Items: cloudy_data (T,13,H,W), SAR_data (T,2,H,W), cloud_mask and cloud_binary (T,1,H,W), cloudfree_data
    (13,H,W), cloud_truth (T,2,H,W) where every date has a true cloud map (synthetic series, rasters.ts_truth_path),
    input_coverage (T,), file_name (the target's), cloudy_path (the first input's), window, input_dates, target_date.
    """

    def __init__(self, series, root, input_t=3, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=CLOUD_THRESHOLD, random_crop=None, sampler=DEFAULT_SAMPLER, min_cov=MIN_COVERAGE,
                 max_cov=MAX_COVERAGE, coverage_cache=None, coverage_detector=COVERAGE_DETECTOR,
                 crop_flag="--crop_size", s2_encoding="float", s2_product=DEFAULT_S2_PRODUCT, s2_offset=0):
        self.series = list(series)
        if not self.series:
            raise DataError(f"no samples: the list of time series for data root {root} is empty")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {tuple(SAMPLERS)}")
        self.input_t, self.sampler, self.min_cov, self.max_cov = int(input_t), sampler, min_cov, max_cov
        short = [s for s in self.series if len(s.s2) <= self.input_t]
        if self.input_t < 1 or short:
            raise DataError(f"--input_t {input_t}: needs at least {self.input_t + 1} dates per series (inputs and a "
                            f"target); {short[0].roi} patch {short[0].patch} has {len(short[0].s2)}" if short else
                            f"--input_t must be at least 1, got {input_t}")
        # the first date of each series stands in as a triplet, so the parent checks the options and warns once
        super().__init__([Triplet(s.split, s.s1[0], s.s2[0], s.s2[0]) for s in self.series], root,
                         crop_size=crop_size, load_size=load_size, augment=augment, cloud_detector=cloud_detector,
                         cloud_threshold=cloud_threshold, random_crop=random_crop, crop_flag=crop_flag,
                         s2_encoding=s2_encoding, s2_product=s2_product, s2_offset=s2_offset)
        self.coverage_detector, self.coverage = coverage_detector, {}
        if coverage_cache is not None:
            self.coverage, self.coverage_detector = coverage_for(self.series, coverage_cache)
        self.with_truth = self._truth_available()

    def __len__(self):
        return len(self.series)

    def _truth_available(self):
        """True when every date of every series has a true cloud map, False when the first date has none."""
        truths = [ts_truth_path(rel) for s in self.series for rel in s.s2]
        if truths[0] is None or not (self.root / truths[0]).is_file():
            return False
        missing = next((t for t in truths if t is None or not (self.root / t).is_file()), False)
        if missing is not False:
            raise DataError(f"{self.root / str(missing)}: no true cloud map, while other dates have one; make the "
                            f"set again or remove the cloud_truth folders")
        return True

    def date_choice(self, index):
        """The date_sampling.DateChoice of series `index`, and the coverage of its dates."""
        s = self.series[index]
        for rel in s.s2:
            if rel not in self.coverage:
                self.coverage[rel] = date_coverage(self.root / rel, self.coverage_detector, self.cloud_threshold)
        coverage = [self.coverage[rel] for rel in s.s2]
        return sample_dates(coverage, self.input_t, self.sampler, self.min_cov, self.max_cov), coverage

    def _read_dates(self, s, choice):
        """Windows of the input dates' S1 and S2 and of the target's S2, the grown crops the detector needs, the
        window and the paths."""
        s1_paths = [self.root / s.s1[t] for t in choice.inputs]
        s2_paths = [self.root / s.s2[t] for t in choice.inputs]
        target_path = self.root / s.s2[choice.target]
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(**GDAL_READ_OPTIONS))
            target = stack.enter_context(open_raster(target_path))
            s1s = [stack.enter_context(open_raster(p)) for p in s1_paths]
            s2s = [stack.enter_context(open_raster(p)) for p in s2_paths]
            for s1, s2 in zip(s1s, s2s):  # each date's S1 and the target on that date's grid: one grid for all
                check_triplet(s1, target, s2, s2_product=self.s2_product)
            window = self._window(s2s[0].height, s2s[0].width, s2s[0].name)
            sar = [read_window(src, window) for src in s1s]
            cloudy = [read_window(src, window) for src in s2s]
            cloudfree = read_window(target, window)
            grown = [self._grown_crop(src, window) for src in s2s]
            offsets = [s2_offset(src, self.s2_offset) for src in (*s2s, target)]
        return sar, cloudy, cloudfree, grown, window, s2_paths, target_path, offsets

    def __getitem__(self, index):
        s = self.series[index]
        choice, coverage = self.date_choice(index)
        sar, cloudy, cloudfree, grown, window, s2_paths, target_path, offsets = self._read_dates(s, choice)
        for data, path in (*zip(cloudy, s2_paths), (cloudfree, target_path)):
            check_s2_encoding(data, path)
        sar = np.stack([normalize_s1(a) for a in sar])
        cloudy = np.stack([normalize_s2(a, o) for a, o in zip(cloudy, offsets)])
        cloudfree = normalize_s2(cloudfree, offsets[-1])
        score = np.stack([self._cloud_score(None, window, c, g, o) for c, g, o in zip(cloudy, grown, offsets)])
        if self.s2_encoding == "uint16":
            cloudy, cloudfree = denormalize_s2(cloudy), denormalize_s2(cloudfree)
        arrays = [cloudy, cloudfree, sar, score]
        if self.with_truth:
            arrays.append(np.stack([read_raster(self.root / ts_truth_path(s.s2[t]), len(TRUTH_BANDS), window)
                                    for t in choice.inputs]))
        if self.augment:
            k, flip = int(torch.randint(4, ()).item()), bool(torch.randint(2, ()).item())
            arrays = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
            if flip:
                arrays = [a[..., ::-1] for a in arrays]
        cloudy, cloudfree, sar, score, *truth = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        return {
            **({"cloud_truth": truth[0]} if truth else {}),
            "cloudy_data": cloudy,
            "cloudfree_data": cloudfree,
            "SAR_data": sar,
            "cloud_mask": score,
            "cloud_binary": (score >= self.cloud_threshold).float(),
            "input_coverage": torch.tensor([coverage[t] for t in choice.inputs], dtype=torch.float32),
            "file_name": os.path.basename(target_path),
            "cloudy_path": str(s2_paths[0].resolve()),
            "window": torch.tensor(window, dtype=torch.long),
            "input_dates": ",".join(s.dates[t] for t in choice.inputs),
            "target_date": s.dates[choice.target],
        }


def get_ts_train_val_test(csv_path):
    """(train, val, test) lists of TimeSeries from a time-series list (datalist.read_ts_list); an empty split is an
    empty list, as get_train_val_test_filelists returns it."""
    series = read_ts_list(csv_path)
    return tuple([s for s in series if s.split == split] for split in (1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------
# CLI

def _cmd_synth(args):
    if args.time_series:
        csv_path = synthetic_sets.make_synthetic_ts_dataset(args.out, args.n, size=args.size, seed=args.seed,
                                             n_dates=args.time_series, n_rois=args.scenes, val_frac=args.val_frac,
                                             test_frac=args.test_frac)
        counts = {name: sum(s.split == i for s in read_ts_list(csv_path)) for name, i in SPLIT_IDS.items()}
        print(f"wrote {args.n} synthetic time series of {args.time_series} dates, {args.size} px, under {args.out}; "
              f"list: {csv_path} {counts}")
        return 0
    csv_path = synthetic_sets.make_synthetic_dataset(args.out, args.n, size=args.size, seed=args.seed,
                                                     n_scenes=args.scenes, val_frac=args.val_frac,
                                                     test_frac=args.test_frac, s2_product=args.s2_product)
    counts = {name: sum(t.split == i for t in read_data_list(csv_path)) for name, i in SPLIT_IDS.items()}
    print(f"wrote {args.n} synthetic {args.s2_product} triplets of {args.size} px under {args.out}; list: {csv_path} "
          f"{counts}")
    return 0


SCAN_LINES_SHOWN = 20  # "not a SEN12MS-CR file name" lines printed before a count of the rest


def _print_unrecognised(unrecognised, dataset):
    """The first SCAN_LINES_SHOWN .tif files scan could not place, and a count of the rest, on stderr."""
    for rel in unrecognised[:SCAN_LINES_SHOWN]:
        print(f"not a {dataset} file name: {rel}", file=sys.stderr)
    if len(unrecognised) > SCAN_LINES_SHOWN:
        print(f"... and {len(unrecognised) - SCAN_LINES_SHOWN} more files not named the {dataset} way",
              file=sys.stderr)


def _cmd_scan(args):
    triplets, unpartnered, unrecognised = scan_folder(args.root)
    if not triplets and unrecognised:
        series, incomplete, unrecognised_ts = scan_ts_folder(args.root)
        if series or incomplete:
            return _scan_time_series(args, series, incomplete, unrecognised_ts)
    for rel in unpartnered:
        print(f"no partner: {rel}", file=sys.stderr)
    _print_unrecognised(unrecognised, "SEN12MS-CR")
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


def _scan_time_series(args, series, incomplete, unrecognised):
    """`scan` of a SEN12MS-CR-TS tree: a time-series list (datalist.TS_FORMAT), split by ROI."""
    for line in incomplete:
        print(line, file=sys.stderr)
    _print_unrecognised(unrecognised, "SEN12MS-CR-TS")
    if not series:
        raise DataError(f"{args.root}: no complete SEN12MS-CR-TS series ({len(incomplete)} incomplete); scan reads "
                        f"{TS_LAYOUT}")
    if args.split == "random":
        series = split_ts_by_roi(series, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    else:  # the published TS loader matches ROIs exactly, so both official rules are one here
        print(f"split {args.split}: the published SEN12MS-CR-TS lists ({len(splits.OFFICIAL_TS_TEST_ROIS)} test, "
              f"{len(splits.OFFICIAL_TS_VAL_ROIS)} val ROIs), matched exactly as the published loader does",
              file=sys.stderr)
        series, missing = split_ts_official(series)
        for name, rois in missing.items():
            if rois:
                print(f"note: official {name} ROIs not found under {args.root}: {', '.join(rois)}", file=sys.stderr)
    out = write_ts_list(args.out, series)
    counts = {name: sum(s.split == i for s in series) for name, i in SPLIT_IDS.items()}
    print(f"{len(series)} time series of {min(len(s.s2) for s in series)}-{max(len(s.s2) for s in series)} dates in "
          f"{len({s.roi for s in series})} ROIs {counts}, {args.split} split; {len(incomplete)} incomplete series "
          f"left out; wrote {out}")
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
    made, skipped = make_cloud_masks(triplets, args.input_data_folder, args.out, args.detector, workers=args.workers,
                                     s2_product=args.s2_product)
    print(f"{args.detector} masks of {len(triplets)} triplets in {args.out} ({made} made, {skipped} already there); "
          f"use them with --cloud_mask_dir {args.out}")
    return 0


def _cmd_coverage(args):
    series = read_ts_list(args.data_list_filepath)
    _, made, skipped = make_coverage_cache(series, args.input_data_folder, args.out, args.detector,
                                           workers=args.workers)
    print(f"{args.detector} coverage of {made + skipped} dates of {len(series)} series in {args.out} ({made} made, "
          f"{skipped} already there); use it with coverage_cache={args.out}")
    coverage = coverage_for(series, args.out)[0]
    for name, split in SPLIT_IDS.items():
        rows = [[coverage[p] for p in s.s2] for s in series if s.split == split]
        if rows:
            count, total = published_leaks(rows, args.input_t)
            print(f"{name}: the published fixed sampler (--input_t {args.input_t}, min_cov {MIN_COVERAGE}, max_cov "
                  f"{MAX_COVERAGE}) gives the target as an input in {count} of {total} series ({count / total:.1%})")
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
    p.add_argument("--s2_product", default=DEFAULT_S2_PRODUCT, choices=list(S2_PRODUCTS),
                   help="L1C: SEN12MS-CR's 13 bands, no offset; L2A: the 12 bands without B10, DN = 10000 x "
                        "reflectance + 1000 with the offset recorded in the tag BOA_ADD_OFFSET=-1000, as processing "
                        "baseline 04.00 products carry it")
    p.add_argument("--time_series", type=int, default=0, metavar="N_DATES",
                   help="write --n SEN12MS-CR-TS time series of N_DATES dates each (TS layout; --scenes is then the "
                        "number of ROIs) instead of SEN12MS-CR triplets; 0: triplets")
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
    p.add_argument("--s2_product", default=DEFAULT_S2_PRODUCT, choices=list(S2_PRODUCTS),
                   help="Sentinel-2 product of the cloudy images (L2A: 12 bands, rule detector only); each file's "
                        "radiometric offset is read from its metadata")
    p.set_defaults(func=_cmd_masks)
    p = sub.add_parser("coverage", help="compute every date's cloud coverage of a time-series list once, for the "
                       "date samplers", formatter_class=HelpFormatter)
    p.add_argument("--data_list_filepath", required=True, help="time-series list (every split is done)")
    p.add_argument("--input_data_folder", required=True, help="root the list's paths are relative to")
    p.add_argument("--detector", default=COVERAGE_DETECTOR, choices=list(MASK_DETECTORS),
                   help="cloud detector of the coverage (s2cloudless: the published protocol's mask)")
    p.add_argument("--out", required=True, help="coverage cache (JSON) to write or complete")
    p.add_argument("--input_t", type=int, default=3,
                   help="input dates for the report of how often the published sampler gives the target as input")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every CPU core)")
    p.set_defaults(func=_cmd_coverage)
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
