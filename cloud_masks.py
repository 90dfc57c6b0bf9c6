"""Cloud mask folders: detector masks computed once (`python dataloader.py masks`), their masks.json, and reading
them back; the per-date cloud coverage of time series, computed once into a cache (`python dataloader.py coverage`)."""
import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import rasterio
import torch

from bands import S2_BANDS, normalize_s2
from clouds import BINARY_DETECTORS, CLOUD_DETECTORS, CLOUD_THRESHOLD, cloud_score, detector_settings
from files import DataError, outermost_new_folder, write_text_atomic
from rasters import (
    GDAL_READ_OPTIONS,
    check_bands,
    check_listed_files,
    open_raster,
    read_raster,
    read_window,
    write_geotiff,
)

# A precomputed mask stores exactly the score the detector gives on the fly, so thresholding it gives the same binary
# mask at any --cloud_threshold: the 0/1 mask of a binary detector as uint8, a soft score as float32 (both deflate).
# (Masks made before stored a soft score as uint8 score x 255, whose rounding moved the threshold: refused below.)
MASK_ENCODINGS = {"binary": "uint8 binary mask (0 clear, 1 cloudy)", "soft": "float32 cloud score"}
LEGACY_MASK_ENCODING = "uint8 soft score x255"
MASK_DETECTORS = tuple(d for d in CLOUD_DETECTORS if d != "none")
MASKS_INFO = "masks.json"  # in a finished mask folder: which detector made its masks
MASKS_PARTIAL = "masks.partial.json"  # in an unfinished one: the detector of the masks made so far


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
        check_bands(src, len(S2_BANDS))
        cloudy, crs, transform = normalize_s2(read_window(src, None)), src.crs, src.transform
    score = cloud_score(cloudy, detector)[None]
    if detector in BINARY_DETECTORS:
        return write_geotiff(out_path, score.astype(np.uint8), crs, transform,
                              descriptions=(f"{detector} cloud mask (1 cloudy)",), compress="deflate")
    return write_geotiff(out_path, score.astype(np.float32), crs, transform,
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


def _refuse_other_detector(out_dir, detector):
    """DataError when out_dir holds finished or unfinished masks of another detector: a folder holds one detector's."""
    info, partial = out_dir / MASKS_INFO, out_dir / MASKS_PARTIAL
    if info.is_file() and read_masks_info(out_dir)["detector"] != detector:
        raise DataError(f"{out_dir} holds {read_masks_info(out_dir)['detector']} masks; use another --out for "
                        f"{detector}")
    if partial.is_file() and json.loads(partial.read_text())["detector"] != detector:
        other = json.loads(partial.read_text())["detector"]
        raise DataError(f"{out_dir} holds unfinished {other} masks; finish them with --detector {other}, or use "
                        f"another --out for {detector}")


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
    _refuse_other_detector(out_dir, detector)
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
# Per-date cloud coverage of time series (SEN12MS-CR-TS), computed once into one JSON file that names its detector

COVERAGE_DETECTOR = "s2cloudless"  # the published protocol's (UnCRtainTS SEN12MSCRTS, cloud_masks="s2cloudless_mask")
COVERAGE_SAVE_EVERY = 256  # dates between the cache's atomic rewrites, so an interrupted run resumes from there


def date_coverage(s2_path, detector=COVERAGE_DETECTOR, threshold=CLOUD_THRESHOLD):
    """Cloudy fraction of a whole Sentinel-2 raster, as the published loader's get_cloud_map and np.mean make it:
    the detector's binary mask (a soft score thresholded at `threshold`), and a blank raster (DN clipped to
    [0, 10000] with mean and standard deviation below 1e-5) counts as fully cloudy, as theirs does."""
    with rasterio.Env(**GDAL_READ_OPTIONS), open_raster(s2_path) as src:
        check_bands(src, len(S2_BANDS))
        dn = np.clip(read_window(src, None).astype(np.float32), 0, 10000)
    if dn.mean() < 1e-5 and dn.std() < 1e-5:
        return 1.0
    score = cloud_score(normalize_s2(dn), detector)
    mask = score if detector in BINARY_DETECTORS else score >= threshold
    return float(np.mean(mask.astype(np.float32)))


def _coverage_worker(job):
    try:
        return job[0], date_coverage(*job[1:]), None
    except DataError as e:
        return job[0], None, str(e)


def read_coverage_cache(cache_path):
    """(meta, {S2 path relative to the root: coverage}) of a coverage cache; DataError for a file that is not one."""
    try:
        data = json.loads(Path(cache_path).read_text())
        return {k: v for k, v in data.items() if k != "coverage"}, dict(data["coverage"])
    except FileNotFoundError:
        raise DataError(f"coverage cache not found: {cache_path}; make it with python dataloader.py coverage") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{cache_path}: not a coverage cache ({e}); make it with python dataloader.py coverage") \
            from None


def _coverage_meta(detector, threshold):
    return {"detector": detector, "settings": detector_settings(detector, threshold),
            "coverage_of": "mean of the binary cloud mask of the whole S2 raster (blank raster: 1.0)"}


def coverage_for(series, cache_path):
    """{S2 relative path: coverage} of every date of `series` from a cache, and the cache's detector; DataError naming
    the first date the cache lacks."""
    meta, coverage = read_coverage_cache(cache_path)
    missing = [p for s in series for p in s.s2 if p not in coverage]
    if missing:
        raise DataError(f"{cache_path}: no coverage of {missing[0]} ({len(missing)} dates missing); run python "
                        f"dataloader.py coverage again with --out {cache_path} (it adds what is missing)")
    return coverage, meta["detector"]


def make_coverage_cache(series, root, cache_path, detector=COVERAGE_DETECTOR, threshold=CLOUD_THRESHOLD,
                        workers=None, progress=True):
    """Compute the coverage of every date of `series` once into cache_path (JSON, written atomically every
    COVERAGE_SAVE_EVERY dates and at the end), adding to an existing cache of the same detector and settings and
    refusing one of another. Returns (coverage dict, made, already there)."""
    import multiprocessing

    from tqdm.auto import tqdm

    if detector not in MASK_DETECTORS:
        raise ValueError(f"detector must be one of {MASK_DETECTORS}, got {detector!r}")
    meta, coverage = _coverage_meta(detector, threshold), {}
    if Path(cache_path).is_file():
        old, coverage = read_coverage_cache(cache_path)
        if old.get("settings") != meta["settings"]:
            raise DataError(f"{cache_path} holds coverage by {old.get('settings')}; use another --out for "
                            f"{meta['settings']}")
    jobs = sorted({p for s in series for p in s.s2} - set(coverage))
    jobs = [(rel, Path(root) / rel, detector, threshold) for rel in jobs]

    def save():
        write_text_atomic(cache_path, json.dumps({**meta, "coverage": dict(sorted(coverage.items()))}, indent=1))

    failed, workers = [], max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with contextlib.ExitStack() as stack:  # one worker: in this process (no pool to start)
        pool = None if workers == 1 else stack.enter_context(
            multiprocessing.get_context("spawn").Pool(workers, initializer=_init_mask_worker))
        done = map(_coverage_worker, jobs) if pool is None else pool.imap_unordered(_coverage_worker, jobs, 4)
        for n, (rel, value, problem) in enumerate(tqdm(done, total=len(jobs), desc=f"{detector} coverage",
                                                       disable=not progress or not jobs, dynamic_ncols=True), 1):
            if problem:
                failed.append(problem)
            else:
                coverage[rel] = value
            if n % COVERAGE_SAVE_EVERY == 0:
                save()
    save()
    if failed:
        raise DataError(f"{failed[0]} ({len(failed)} of {len(jobs)} dates not done; the others are kept in "
                        f"{cache_path}: fix the file and run the same command again)")
    return coverage, len(jobs), sum(len(s.s2) for s in series) - len(jobs)
