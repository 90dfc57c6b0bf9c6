"""`benchmark.py data` and `benchmark.py clouds`: samples/s of the Dataset against a GLF-CR-style reference
loader, and each cloud detector's cost and agreement with the true cloud map."""
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
import scipy.ndimage
import scipy.signal
import torch
from torch.utils.data import DataLoader

import bands
import clouds
import datalist
import dataloader
import metrics
import rasters
import synthetic_sets

# ------------------------------------------------------------------------------------- data loading, cloud detection

def _data_source(args):
    """(root, triplets): --csv/--root if given, else a synthetic tree of 256-px patches (real dtypes, layout)."""
    if args.csv:
        return args.root or str(Path(args.csv).parent), datalist.read_data_list(args.csv)
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    csv_path = synthetic_sets.make_synthetic_dataset(tmp, n=args.n, size=args.size, seed=0)
    return tmp, datalist.read_data_list(csv_path)


def _reference_cloud_score(img10000):
    """DSen2-CR's get_cloud_mask as published and called by GLF-CR: float64 ops on the full image, a 7x7 box by
    scipy.signal.convolve2d."""
    d = img10000 / 10000.0
    rescale = lambda x, lo, hi: (x - lo) / (hi - lo)
    score = np.ones(d.shape[1:]).astype("float32")
    score = np.minimum(score, rescale(d[1], 0.1, 0.5))
    score = np.minimum(score, rescale(d[0], 0.1, 0.3))
    score = np.minimum(score, rescale(d[0] + d[10], 0.15, 0.2))
    score = np.minimum(score, rescale(d[3] + d[2] + d[1], 0.2, 0.8))
    sub, tot = d[2] - d[11], d[2] + d[11]
    tot[tot == 0] = 0.001
    score = np.minimum(score, rescale(sub / tot, 0.8, 0.6))
    score = scipy.ndimage.grey_closing(score, size=(5, 5))
    score = scipy.signal.convolve2d(score, np.ones((7, 7)) / 49.0, mode="same")
    return np.clip(score, 0.00001, 1.0)


class _ReferenceGLFCRLoader:
    """What the original GLF-CR AlignedDataset does per sample: rasterio reads of the whole files, NaN filled
    with the image mean, normalisation in a per-channel Python loop, the cloud mask on the whole cloudy image,
    then a random crop."""

    def __init__(self, triplets, root, crop_size, use_mask):
        self.triplets, self.root, self.crop, self.use_mask = triplets, root, crop_size, use_mask
        self.clip_min = [[-25.0, -32.5], [0] * 13, [0] * 13]
        self.clip_max = [[0, 0], [10000] * 13, [10000] * 13]

    def __len__(self):
        return len(self.triplets)

    @staticmethod
    def _read(path):
        src = rasterio.open(path, "r", driver="GTiff")
        image = src.read()
        src.close()
        image[np.isnan(image)] = np.nanmean(image)
        return image

    def _normalise(self, image, kind):
        if kind == 1:
            for c in range(len(image)):
                image[c] = np.clip(image[c], self.clip_min[0][c], self.clip_max[0][c])
                image[c] -= self.clip_min[0][c]
                image[c] = image[c] / (self.clip_max[0][c] - self.clip_min[0][c])
        else:
            for c in range(len(image)):
                image[c] = np.clip(image[c], self.clip_min[kind - 1][c], self.clip_max[kind - 1][c])
            image /= 10000
        return image

    def __getitem__(self, index):
        t = self.triplets[index]
        s1 = self._read(os.path.join(self.root, t.s1)).astype("float32")
        s2 = self._read(os.path.join(self.root, t.s2_cloudfree)).astype("float32")
        cloudy = self._read(os.path.join(self.root, t.s2_cloudy)).astype("float32")
        mask = _reference_cloud_score(cloudy) if self.use_mask else np.zeros(cloudy.shape[1:], np.float32)
        s1, s2, cloudy = self._normalise(s1, 1), self._normalise(s2, 2), self._normalise(cloudy, 3)
        h, w = cloudy.shape[1:]
        y, x = np.random.randint(0, h - self.crop + 1), np.random.randint(0, w - self.crop + 1)
        crop = lambda a: torch.from_numpy(np.ascontiguousarray(a[..., y:y + self.crop, x:x + self.crop]))
        return {"cloudy_data": crop(cloudy), "cloudfree_data": crop(s2), "SAR_data": crop(s1),
                "cloud_mask": crop(mask[None].astype(np.float32))}


def _add_data_args(parser):
    parser.add_argument("--csv", default=None, help="data list to read (default: a synthetic tree made in /tmp)")
    parser.add_argument("--root", default=None, help="data root of --csv (default: the CSV's folder)")
    parser.add_argument("--n", type=int, default=32, help="synthetic patches to make when no --csv (default 32)")
    parser.add_argument("--size", type=int, default=256, help="synthetic patch side (default 256, as real data)")
    parser.add_argument("--crop", type=int, default=128, help="crop size returned per sample (default 128)")
    parser.add_argument("--samples", type=int, default=64, help="__getitem__ calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median round is reported")
    parser.add_argument("--workers", default="", help="comma list of DataLoader num_workers to also time, "
                                                      "e.g. 0,1,2 (empty: skip)")
    parser.add_argument("--batch", type=int, default=8, help="DataLoader batch size for --workers")


def bench_data(args):
    """Samples/s of the dataset __getitem__ loop vs a GLF-CR-style reference loader (with/without cloud mask)."""
    torch.set_num_threads(1)
    root, triplets = _data_source(args)
    variants = {
        "reference, no mask": _ReferenceGLFCRLoader(triplets, root, args.crop, use_mask=False),
        "reference, rule mask": _ReferenceGLFCRLoader(triplets, root, args.crop, use_mask=True),
        "dataloader, no mask": dataloader.SEN12MSCRDataset(triplets, root, crop_size=args.crop, augment=True,
                                                           cloud_detector="none"),
        "dataloader, rule mask": dataloader.SEN12MSCRDataset(triplets, root, crop_size=args.crop, augment=True,
                                                             cloud_detector="rule"),
    }
    times = {name: [] for name in variants}
    for ds in variants.values():
        ds[0]  # warm-up (imports, GDAL driver registration)
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for name, ds in variants.items():
            t0 = time.perf_counter()
            for i in range(args.samples):
                ds[i % len(ds)]
            times[name].append(time.perf_counter() - t0)
    rate = {name: args.samples / statistics.median(t) for name, t in times.items()}
    print(f"{len(triplets)} triplets under {root}; crop {args.crop}; one process, 1 torch thread; "
          f"median of {args.rounds} rounds of {args.samples} samples")
    print(f"{'loader':<24}{'samples/s':>12}")
    for name, r in rate.items():
        print(f"{name:<24}{r:>12.1f}")
    figures = {"triplets": len(triplets), "crop": args.crop, "samples_per_s": rate,
               "speedup_no_mask": rate["dataloader, no mask"] / rate["reference, no mask"],
               "speedup_rule_mask": rate["dataloader, rule mask"] / rate["reference, rule mask"]}
    print(f"speed-up: {figures['speedup_no_mask']:.2f}x without mask, {figures['speedup_rule_mask']:.2f}x with mask")
    if args.workers:
        figures["workers"] = _time_workers(args, variants["dataloader, rule mask"])
    return figures


def _time_workers(args, ds):
    """Steady samples/s and first-batch seconds of a DataLoader over `ds` for each --workers count."""
    workers = {}
    for w in (int(v) for v in args.workers.split(",")):
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=w)
        total = args.samples * 4
        n, t0, t_first, n_first = 0, time.perf_counter(), None, 0
        while n < total:
            for batch in loader:
                n += len(batch["file_name"])
                if t_first is None:  # worker start-up ends with the first batch
                    t_first, n_first = time.perf_counter(), n
                if n >= total:
                    break
        t_end = time.perf_counter()
        steady = (n - n_first) / (t_end - t_first)
        workers[w] = {"steady_samples_per_s": steady, "first_batch_s": t_first - t0}
        print(f"DataLoader num_workers={w}, batch {args.batch}: {steady:.1f} samples/s after the first batch "
              f"(first batch after {t_first - t0:.2f} s)")
    return workers


def _add_clouds_args(parser):
    parser.add_argument("--csv", default=None, help="data list whose cloudy images are used (default: synthetic)")
    parser.add_argument("--root", default=None, help="data root of --csv (default: the CSV's folder)")
    parser.add_argument("--n", type=int, default=8, help="synthetic patches to make when no --csv (default 8)")
    parser.add_argument("--size", type=int, default=256, help="patch side (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")


def _detector_agreement(scores, truths, threshold):
    """Pooled ROC AUC and IoU at the detector's threshold of soft scores against binary truth masks."""
    score = torch.from_numpy(np.stack(scores))[:, None]
    label = torch.from_numpy(np.stack(truths))[:, None]
    pos, neg = metrics.auc_histograms(score, label)
    hits = score >= threshold
    return {"auc": metrics.auc_from_histograms(pos, neg),
            "iou": float((hits & label).sum() / max(int((hits | label).sum()), 1))}


def bench_clouds(args):
    """Each detector's ms per patch and, on synthetic data, its agreement with the true cloud map."""
    root, triplets = _data_source(args)
    images = [rasters.read_raster(f"{root}/{t.s2_cloudy}", 13) for t in triplets]
    normed = [bands.normalize_s2(im) for im in images]
    variants = {  # name -> (scores of every patch, threshold that makes the binary mask)
        "rule, original code": (lambda: [_reference_cloud_score(im) for im in images], clouds.CLOUD_THRESHOLD),
        "rule (clouds.rule_cloud_score)": (lambda: [clouds.rule_cloud_score(im) for im in normed],
                                           clouds.CLOUD_THRESHOLD),
        "rule + shadows (cloud_shadow_mask)": (lambda: [np.abs(clouds.cloud_shadow_mask(im)).astype(np.float32)
                                                        for im in normed], 0.5),
        "s2cloudless": (lambda: [clouds.s2cloudless_score(im) for im in normed], 0.4),
    }
    outputs = {name: fn() for name, (fn, _) in variants.items()}  # warm-up; loads the s2cloudless model
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(images) * 1000)
    ms = {name: statistics.median(t) for name, t in times.items()}
    truth_paths = [Path(root) / (rasters.truth_path(t.s2_cloudy) or "-") for t in triplets]
    agreement = {}
    if all(p.is_file() for p in truth_paths):
        truths = [rasters.read_raster(p, 2) for p in truth_paths]
        cloud = [t[0] > rasters.TRUTH_THRESHOLD for t in truths]
        cloud_or_shadow = [(t > rasters.TRUTH_THRESHOLD).any(0) for t in truths]
        for name, (_, threshold) in variants.items():
            agreement[name] = {"clouds": _detector_agreement(outputs[name], cloud, threshold),
                               "clouds_and_shadows": _detector_agreement(outputs[name], cloud_or_shadow, threshold)}
    h, w = images[0].shape[1:]
    print(f"{len(images)} cloudy patches of {h}x{w}; median of {args.rounds} rounds")
    print(f"{'detector':<36}{'ms/patch':>10}" + ("  AUC / IoU vs true clouds  AUC / IoU vs clouds+shadows"
                                                   if agreement else ""))
    for name, v in ms.items():
        line = f"{name:<36}{v:>10.2f}"
        if agreement:
            a, b = agreement[name]["clouds"], agreement[name]["clouds_and_shadows"]
            line += f"  {a['auc']:>9.3f} / {a['iou']:.3f}  {b['auc']:>17.3f} / {b['iou']:.3f}"
        print(line)
    return {"patch": [h, w], "ms_per_patch": ms, "agreement_with_truth": agreement}


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"data": (_add_data_args, bench_data), "clouds": (_add_clouds_args, bench_clouds)}
