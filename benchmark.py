"""Benchmarks for this project: every figure in BENCHMARKS.md comes from a subcommand here.

    python benchmark.py SUBCOMMAND [options]      (python benchmark.py --help lists them)

Variants are always measured side by side in one run and a ratio is printed, because the machines
this runs on are shared and noisy.
"""
import argparse
import atexit
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
import scipy.ndimage
import torch
from rasterio.transform import from_origin
from torch.utils.data import DataLoader, default_collate

import bands
import clouds
import datalist
import dataloader
import files
import metrics
import net_CR_CrossAttention as net
import rasters
import runtime
import sizing
import test_CR

SUBCOMMANDS = {}  # name -> (add_arguments(parser), run(args) -> dict of figures)
HERE = Path(__file__).resolve().parent


def _lazy_import(name):
    """Module `name`, executed at its first attribute access (importlib.util.LazyLoader, the importlib docs' recipe)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Loaded at first use: scene_worker's fresh process reports the peak memory of whole-scene prediction, so it must hold
# what `test_CR.py --predict` loads and no more. These add ~290 MB to a process that never uses them (torchvision
# through losses, measured 165 MB; scipy.signal for the reference cloud score, 49 MB; torch's FLOP counter, 77 MB).
losses = _lazy_import("losses")
train = _lazy_import("train_CR_kaggle")
scipy_signal = _lazy_import("scipy.signal")
flop_counter = _lazy_import("torch.utils.flop_counter")


def in_fresh_process(function, *args, timeout=None):
    """Run benchmark.<function>(*args) in a new Python process and return its result (JSON-serialisable).

    A fresh process per variant gives each its own peak memory (VmHWM) and its own torch state (threads,
    compile caches); the function is an ordinary one in this file, called by name."""
    call = ("import json, sys, benchmark; "
            "print('RESULT ' + json.dumps(getattr(benchmark, sys.argv[1])(*json.loads(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", call, function.__name__, json.dumps(args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(HERE)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    raise RuntimeError(f"{function.__name__} failed (exit {proc.returncode}): "
                       f"{lines[-1][:300] if lines else 'no output'}")


def peak_rss_mb():
    """High-water mark of this process's resident memory (VmHWM). getrusage's ru_maxrss would also count the
    parent's resident set at fork time, which Linux carries across exec into a child's figure."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        add_arguments(p)
        p.add_argument("--json", default=None, help="also write the figures to this JSON file")
        p.set_defaults(_run=run)
    args = parser.parse_args(argv)
    figures = args._run(args)
    if args.json:
        files.write_text_atomic(args.json, json.dumps(figures, indent=2))
    return 0


# ------------------------------------------------------------------------------ the training step, as training runs it
# Every timed training step below is train_CR_kaggle.train_step on a batch already on the device: forward under the
# run's autocast, the criterion, backward, gradient clipping, the optimizer step and the batch PSNR, as training
# runs them.

def _step_run(model, criterion, device, amp, channels_last, train_model=None):
    """A train_CR_kaggle.Run holding what train_step reads, made from the parts setup() makes it from (the training
    flags' defaults, runtime.resolve_amp, train_CR_kaggle.build_optimizer, a GradScaler for fp16) but without a data
    list or a run folder: `loss` and `train` time the step on batches of their own. No learning-rate warm-up."""
    args = train.build_parser().parse_args(["--amp", amp, "--warmup_epochs", "0"])
    amp_dtype, use_scaler = runtime.resolve_amp(amp, device)
    run = train.Run(args=args, argv=[], device=device, amp_dtype=amp_dtype, ctx=runtime.autocast(device, amp_dtype),
                    channels_last=channels_last, criterion=criterion, model=model,
                    train_model=model if train_model is None else train_model)
    run.optimizer, run.scheduler = train.build_optimizer(args, model, device)
    run.clip_groups = train.clip_groups(model)
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return run


def _random_batch(n, size, device, channels_last):
    """A training batch of random reflectances (cloudy brighter than cloud-free), put on the device by the
    training's own train_CR_kaggle.to_device."""
    batch = {"cloudy_data": torch.rand(n, 13, size, size) * 0.8, "cloudfree_data": torch.rand(n, 13, size, size) * 0.3,
             "SAR_data": torch.rand(n, 2, size, size), "cloud_mask": torch.rand(n, 1, size, size)}
    return train.to_device(batch, device, channels_last)


def _synchronizer(device):
    """A function that waits for the device's queued work (CUDA); on CPU the work is done when the call returns."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------------------------- loss cost

def _add_loss_args(parser):
    parser.add_argument("--size", type=int, default=128, help="square crop size in pixels")
    parser.add_argument("--batch", type=int, default=2, help="training batch size of the timed step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16",
                        help="training --amp: autocast of the model step and AMP dtype of VGG (bf16: the training "
                             "script's CPU default; fp16 needs CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--vgg_weights", default="random",
                        help="VGG weights for the VGG terms (random costs what ImageNet costs; with a weights file the "
                             "run also prints how far the AMP VGG's terms are from float32 VGG's)")


def _loss_variants(args, amp_dtype):
    """Criteria to compare, from losses.LOSS_PRESETS: L1 only, the design's pixel terms alone (design_no_vgg), and
    the design's full set with VGG in float32, at the AMP dtype (what training uses), and at the AMP dtype in
    channels-last (training's CPU default)."""
    full = losses.loss_options("design", vgg_weights=args.vgg_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn that the VGG terms then measure nothing
        torch.manual_seed(0)
        variants = {
            "L1 only": losses.CRLoss(**losses.loss_options("l1")),
            "no VGG terms": losses.CRLoss(**losses.loss_options("design_no_vgg")),
            "full, VGG fp32": losses.CRLoss(**full),
        }
        if amp_dtype is not None:
            variants["full, VGG AMP"] = losses.CRLoss(vgg_dtype=amp_dtype, **full)
            variants["full, VGG AMP, NHWC"] = losses.CRLoss(vgg_dtype=amp_dtype, **full).to(
                memory_format=torch.channels_last)
    for name in ("full, VGG AMP", "full, VGG AMP, NHWC"):  # one set of VGG weights for all
        if name in variants:
            variants[name].vgg.load_state_dict(variants["full, VGG fp32"].vgg.state_dict())
    return variants


def bench_loss(args):
    """Time the full criterion (design's loss preset) adds to a training step vs L1 only, VGG fp32 vs AMP."""
    if args.threads:  # 0: torch's default
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = net.create_model("CrossAttention").to(device)
    channels_last = device.type == "cpu"  # the training script's CPU default: channels-last model and inputs
    if channels_last:
        model.to(memory_format=torch.channels_last)
    run = _step_run(model, None, device, args.amp, channels_last)
    variants = {name: c.to(device) for name, c in _loss_variants(args, run.amp_dtype).items()}
    batch = _random_batch(args.batch, args.size, device, channels_last)
    sync = _synchronizer(device)

    def step(criterion):
        run.criterion = criterion
        train.train_step(run, batch)

    def criterion_only(criterion):
        # the loss's own forward + backward, on a prediction that is a leaf tensor (no model in the timing)
        pred = (batch["cloudy_data"] * 0.5).requires_grad_(True)
        total, _ = criterion(pred, batch["cloudfree_data"], batch["cloudy_data"], cloud_mask=batch["cloud_mask"])
        total.backward()

    times = {name: [] for name in variants}
    loss_times = {name: [] for name in variants}
    for _name, criterion in variants.items():
        step(criterion)  # warm-up
        criterion_only(criterion)
    for _ in range(args.steps):  # interleaved, so machine noise hits all variants alike
        for name, criterion in variants.items():
            sync()
            t0 = time.perf_counter()
            step(criterion)
            sync()
            t1 = time.perf_counter()
            criterion_only(criterion)
            sync()
            times[name].append(t1 - t0)
            loss_times[name].append(time.perf_counter() - t1)
    return _report_loss(args, variants, times, loss_times, batch)


def _report_loss(args, variants, times, loss_times, batch):
    """Print the table and ratios; with two VGG precisions, also how far the AMP terms are from float32."""
    med = {name: statistics.median(t) for name, t in times.items()}
    loss_med = {name: statistics.median(t) for name, t in loss_times.items()}
    base = med["L1 only"]
    model_desc = "create_model('CrossAttention')"
    print(f"model: {model_desc}; train_CR_kaggle.train_step; {args.batch}x{args.size}x{args.size}, {args.device}, "
          f"amp {args.amp}, {args.threads} threads, median of {args.steps} steps")
    print(f"{'criterion':<22}{'step s':>10}{'x L1 step':>11}{'loss fwd+bwd s':>16}")
    for name, t in med.items():
        print(f"{name:<22}{t:>10.3f}{t / base:>11.2f}{loss_med[name]:>16.3f}")
    figures = {"model": model_desc, "size": args.size, "batch": args.batch, "threads": args.threads,
               "device": args.device,
               "amp": args.amp, "steps": args.steps, "step_s": med, "loss_only_s": loss_med,
               "ratio_to_l1": {name: t / base for name, t in med.items()}}
    if "full, VGG AMP" in variants:
        print(f"VGG under AMP: full-criterion step {med['full, VGG fp32'] / med['full, VGG AMP']:.2f}x faster, "
              f"criterion alone {loss_med['full, VGG fp32'] / loss_med['full, VGG AMP']:.2f}x")
        cloudy, cloudfree = batch["cloudy_data"], batch["cloudfree_data"]
        pred = (0.5 * cloudy + 0.5 * cloudfree).clamp(0, 1)
        with torch.no_grad():
            exact = variants["full, VGG fp32"](pred, cloudfree, cloudy)[1]
            amp = variants["full, VGG AMP"](pred, cloudfree, cloudy)[1]
        figures["amp_relative_difference"] = {k: abs(amp[k].item() / exact[k].item() - 1) for k in
                                              ("perceptual", "contrastive")}
        differences = ", ".join(f"{k} {v:.2e}" for k, v in figures["amp_relative_difference"].items())
        print(f"AMP VGG vs float32 VGG, relative difference of the terms (vgg_weights {args.vgg_weights}): "
              f"{differences}")
    return figures


SUBCOMMANDS["loss"] = (_add_loss_args, bench_loss)


# ------------------------------------------------------------------------------------- data loading, cloud detection

def _data_source(args):
    """(root, triplets): --csv/--root if given, else a synthetic tree of 256-px patches (real dtypes, layout)."""
    if args.csv:
        return args.root or str(Path(args.csv).parent), datalist.read_data_list(args.csv)
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    csv_path = dataloader.make_synthetic_dataset(tmp, n=args.n, size=args.size, seed=0)
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
    score = scipy_signal.convolve2d(score, np.ones((7, 7)) / 49.0, mode="same")
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
        ds = variants["dataloader, rule mask"]
        figures["workers"] = {}
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
            figures["workers"][w] = {"steady_samples_per_s": steady, "first_batch_s": t_first - t0}
            print(f"DataLoader num_workers={w}, batch {args.batch}: {steady:.1f} samples/s after the first batch "
                  f"(first batch after {t_first - t0:.2f} s)")
    return figures


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
        "rule, original code": (lambda: [_reference_cloud_score(im) for im in images], 0.2),
        "rule (clouds.rule_cloud_score)": (lambda: [clouds.rule_cloud_score(im) for im in normed], 0.2),
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


SUBCOMMANDS["data"] = (_add_data_args, bench_data)
SUBCOMMANDS["clouds"] = (_add_clouds_args, bench_clouds)


# ------------------------------------------------------------------------------ evaluation, whole-scene prediction

def scene_worker(ckpt, cloudy, sar, out, tile, overlap, batch, amp, threads):
    """Whole-scene prediction in a fresh process (in_fresh_process): seconds and peak memory of that alone."""
    torch.set_num_threads(threads)
    model, _ = runtime.load_model(ckpt, torch.device("cpu"))
    amp_dtype = runtime.resolve_amp(amp, torch.device("cpu"))[0]
    rss_model = peak_rss_mb()
    t0 = time.perf_counter()
    test_CR.predict_scene(model, cloudy, sar, out, tile=tile, overlap=overlap, batch_sz=batch, amp_dtype=amp_dtype,
                          progress=False)
    return {"seconds": time.perf_counter() - t0, "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb()}


def _add_eval_args(parser):
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to time (default: a randomly initialised default CrossAttention; speed "
                             "does not depend on the weights)")
    parser.add_argument("--n", type=int, default=8, help="synthetic patches evaluated for images/s (default 8)")
    parser.add_argument("--size", type=int, default=256, help="synthetic patch side (default 256, as real data)")
    parser.add_argument("--batch", type=int, default=4, help="images / tiles per forward pass (default 4)")
    parser.add_argument("--scenes", default="1024,2048", help="comma list of square scene sides to predict")
    parser.add_argument("--tile", type=int, default=256, help="whole-scene tile side (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="whole-scene tile overlap (default 32)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                        help="autocast on CPU (auto = the training script's CPU choice)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def bench_eval(args):
    """Evaluation images/s (test_CR.evaluate) and whole-scene prediction time and peak RSS on CPU."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            model = net.create_model("CrossAttention")
            ckpt = tmp / "random.pth"
            torch.save({"model": model.state_dict(), "model_name": "CrossAttention",
                        "model_config": asdict(model.config), "epoch": 0}, ckpt)
        csv_path = dataloader.make_synthetic_dataset(tmp / "data", n=args.n, size=args.size, seed=0,
                                                     val_frac=0.0, test_frac=0.0)
        # Evaluate every patch: the synthetic list puts them all in split 1 (train) with these fractions.
        summary = test_CR.evaluate(test_CR.build_parser().parse_args([
            "--checkpoint", str(ckpt), "--data_list_filepath", str(csv_path), "--input_data_folder",
            str(tmp / "data"), "--split", "train", "--results_dir", str(tmp / "results"), "--batch_sz",
            str(args.batch), "--num_workers", "0", "--device", "cpu", "--amp", args.amp]))
        figures = {"checkpoint": str(args.checkpoint or "random CrossAttention (default config)"),
                   "threads": args.threads, "amp": summary["amp"], "eval_images": summary["n_images"],
                   "eval_size": args.size, "eval_images_per_s": summary["images_per_s"],
                   "eval_model_images_per_s": summary["model_images_per_s"], "scenes": {}}
        rng = np.random.default_rng(0)
        for side in (int(s) for s in args.scenes.split(",")):
            cloudy, sar = tmp / f"s2_{side}.tif", tmp / f"s1_{side}.tif"
            georef = dict(driver="GTiff", height=side, width=side, crs="EPSG:32631",
                          transform=from_origin(500000.0, 5600000.0, 10.0, 10.0))
            with rasterio.open(cloudy, "w", count=13, dtype="uint16", **georef) as s2, \
                    rasterio.open(sar, "w", count=2, dtype="float32", **georef) as s1:
                for y in range(0, side, 256):  # written in strips: the parent stays small too
                    h = min(256, side - y)
                    win = rasterio.windows.Window(0, y, side, h)
                    s2.write(rng.integers(0, 6000, (13, h, side), dtype=np.uint16), window=win)
                    s1.write(rng.uniform(-30, 0, (2, h, side)).astype(np.float32), window=win)
            r = in_fresh_process(scene_worker, str(ckpt), str(cloudy), str(sar), str(tmp / f"out_{side}.tif"),
                                 args.tile, args.overlap, args.batch, args.amp, args.threads)
            n_tiles = len(test_CR.tile_starts(side, args.tile, args.overlap)) ** 2
            r.update(tiles=n_tiles, megapixels_per_s=side * side / 1e6 / r["seconds"],
                     full_scene_fp32_accumulator_mb=(13 + 1) * side * side * 4 / 2 ** 20)
            figures["scenes"][side] = r
            for p in (cloudy, sar, tmp / f"out_{side}.tif"):
                p.unlink()
    print(f"model: {figures['checkpoint']}; CPU, {args.threads} threads, amp {figures['amp']}")
    print(f"evaluation: {figures['eval_images']} patches of {args.size} px, batch {args.batch}: "
          f"{figures['eval_images_per_s']:.2f} images/s end to end "
          f"({figures['eval_model_images_per_s']:.2f} images/s in the forward pass alone)")
    print(f"whole scene, tile {args.tile}, overlap {args.overlap}, batch {args.batch}; peak RSS of a fresh process "
          f"(VmHWM of /proc/self/status)")
    print(f"{'scene':<11}{'tiles':>6}{'seconds':>10}{'Mpx/s':>8}{'RSS model MB':>14}{'peak RSS MB':>13}"
          f"{'scene-size acc. MB':>20}")
    for side, r in figures["scenes"].items():
        print(f"{f'{side}x{side}':<11}{r['tiles']:>6}{r['seconds']:>10.1f}{r['megapixels_per_s']:>8.3f}"
              f"{r['rss_after_model_mb']:>14.0f}{r['peak_rss_mb']:>13.0f}{r['full_scene_fp32_accumulator_mb']:>20.0f}")
    return figures


SUBCOMMANDS["eval"] = (_add_eval_args, bench_eval)


# ------------------------------------------------------------------------------------------- model training step
# Training-step throughput and peak memory of the model: train_CR_kaggle.train_step with the L1 loss preset on random
# inputs, every variant in a fresh process so its peak memory is its own: on CPU the process's peak RSS minus its RSS
# just before the first training step (model, optimizer and batch already built); on CUDA
# torch.cuda.max_memory_allocated. The baseline every ratio refers to is the naive implementation: fp32,
# materialised ("reference") attention, channels-first, eager.
PRECISION_AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}  # --precision -> the training script's --amp


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _train_flops_per_sample(run, batch):
    """FLOPs of one forward + backward of the model and its criterion (torch's FlopCounterMode), per sample: the
    eager model, so that a compiled variant counts the same arithmetic."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        with run.ctx:
            prediction = run.model(batch["cloudy_data"], batch["SAR_data"])
        run.criterion(prediction, batch["cloudfree_data"], batch["cloudy_data"])[0].backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["cloudy_data"].shape[0]


def train_step_worker(cfg):
    """One variant of `benchmark.py train`, run by in_fresh_process: median step time and peak memory."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model_config = {} if cfg["model_name"] == "DSen2CR" else {"attention": cfg["attention"]}
    model = net.create_model(cfg["model_name"], **model_config, **cfg["model_config"]).to(device)
    gmacs_256 = net.count_macs(model) / 1e9
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # "on": inductor's default mode; "reduce-overhead": also CUDA graphs (replays the step's kernel launches)
    forward = model if cfg["compile"] == "off" else torch.compile(
        model, mode="reduce-overhead" if cfg["compile"] == "reduce-overhead" else "default")
    criterion = losses.CRLoss(**losses.loss_options("l1")).to(device)
    run = _step_run(model, criterion, device, PRECISION_AMP[cfg["precision"]], cfg["channels_last"], forward)
    n = cfg["batch"]
    batch = _random_batch(n, cfg["size"], device, cfg["channels_last"])
    sync = _synchronizer(device)

    out = {"gmacs_256": gmacs_256}
    if device.type == "cuda":
        out["flops_per_sample"] = _train_flops_per_sample(run, batch)
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    for _ in range(cfg["warmup"]):
        train.train_step(run, batch)
    sync()
    out["warmup_s"] = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(cfg["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        train.train_step(run, batch)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median = sorted(times)[len(times) // 2]
    # CPU seconds the process spent in a step: on a shared machine, unlike wall time, not inflated by the time
    # the process waits for a core (cache and memory-bandwidth contention still count)
    out["step_cpu_s"] = statistics.median(cpu_times)
    out.update(step_s=median, samples_per_s=n / median, step_times=times, peak_rss_mb=peak_rss_mb(),
               base_rss_mb=base_rss, peak_mem_mb=peak_rss_mb() - base_rss)
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if cfg["peak_tflops"]:
            out["mfu"] = out["flops_per_sample"] * n / median / (cfg["peak_tflops"] * 1e12)
    return out


def _add_train_args(parser):
    parser.add_argument("--model_name", choices=("CrossAttention", "DSen2CR"), default="CrossAttention",
                        help="network to time")
    parser.add_argument("--model_configs", nargs="+", type=_json_object, default=[{}],
                        help="constructor arguments of each network compared, as JSON objects, e.g. "
                             "'{}' '{\"affine_residual\": false}' (default: one, the default network); "
                             "'x cfg1' is samples/s over the first one's at the same settings")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="square input sizes")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="batch per size (one value for all, or one per size); default 2 at <=128 px, else 1")
    parser.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16", "fp16"),
                        help="default fp32 bf16 (+ fp16 on CUDA)")
    parser.add_argument("--attention", nargs="+", default=["fused", "reference"], choices=("fused", "reference"),
                        help="attention paths to compare")
    parser.add_argument("--channels_last", nargs="+", default=["off", "on"], choices=("off", "on"),
                        help="memory formats to compare")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=("off", "on", "reduce-overhead"),
                        help="torch.compile variants; 'off on' to compare (compiling takes minutes on 2 cores); "
                             "reduce-overhead adds CUDA graphs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocation, kernel choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch CPU threads per variant (0: torch's default); several values compare them. "
                             "On a loaded shared machine 1 thread can beat 2 by far (OpenMP threads wait on "
                             "each other when one is descheduled)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="dense peak of the GPU for the precision measured, for MFU (e.g. H100 SXM bf16: 989)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant before it is skipped")


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _train_variants(args):
    precisions = args.precision or (["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
    attentions = args.attention if args.model_name == "CrossAttention" else ["n/a"]
    batches = args.batch or [2 if s <= 128 else 1 for s in args.sizes]
    if len(batches) == 1:
        batches = batches * len(args.sizes)
    if len(batches) != len(args.sizes):
        raise SystemExit("--batch takes one value or one per --sizes entry")
    for (size, batch), threads, precision, attention, cl, comp, config in itertools.product(
            zip(args.sizes, batches), args.threads, precisions, attentions, args.channels_last, args.compile,
            args.model_configs):
        yield dict(model_name=args.model_name, model_config=config, size=size, batch=batch, precision=precision,
                   attention="reference" if attention == "n/a" else attention, channels_last=cl == "on",
                   compile=comp, device=args.device, steps=args.steps, warmup=args.warmup,
                   threads=threads, peak_tflops=args.peak_tflops), attention


def _run_train_variant(cfg, timeout):
    if cfg["precision"] == "fp16" and not cfg["device"].startswith("cuda"):
        return {"skipped": "fp16 autocast is for CUDA here (CPU fp16 matmuls are not accelerated)"}
    try:
        return in_fresh_process(train_step_worker, cfg, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over --timeout {timeout} s"}
    except RuntimeError as e:
        return {"skipped": str(e)[:200]}


def bench_train(args):
    """Training-step samples/s and peak memory by network, precision, attention path, channels-last and compile."""
    rows = []
    for cfg, attention in _train_variants(args):
        result = _run_train_variant(cfg, args.timeout)
        row = dict(size=cfg["size"], batch=cfg["batch"], threads=cfg["threads"], precision=cfg["precision"],
                   attention=attention, channels_last=cfg["channels_last"], compile=cfg["compile"],
                   config=args.model_configs.index(cfg["model_config"]) + 1, model_config=cfg["model_config"],
                   **result)
        rows.append(row)
        label = (f"{row['size']}px b{row['batch']} t{row['threads']} {row['precision']} {attention} "
                 f"cl={'on' if row['channels_last'] else 'off'} compile={row['compile']} cfg{row['config']}")
        print(f"  done {label}: " + (row.get("skipped") or f"{row['samples_per_s']:.2f} samples/s"), flush=True)
    _add_train_ratios(rows)
    _print_train_table(args, rows)
    return {"model_name": args.model_name, "device": args.device, "rows": rows}


def _add_train_ratios(rows):
    """x speed / x mem against the naive implementation of the same network at the same size and threads (fp32,
    reference attention, channels-first, eager); x cfg1 against the first network at the same settings."""
    settings = ("size", "batch", "threads", "precision", "attention", "channels_last", "compile")
    for row in (r for r in rows if "skipped" not in r):
        base = next((r for r in rows if r["size"] == row["size"] and r["threads"] == row["threads"]
                     and r["config"] == row["config"] and r["precision"] == "fp32"
                     and r["attention"] in ("reference", "n/a") and not r["channels_last"] and r["compile"] == "off"
                     and "skipped" not in r), None)
        if base:
            row["speed_vs_naive"] = row["samples_per_s"] / base["samples_per_s"]
            row["mem_vs_naive"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None
        first = next((r for r in rows if r["config"] == 1 and "skipped" not in r
                      and all(r[k] == row[k] for k in settings)), None)
        if first:
            row["speed_vs_config1"] = row["samples_per_s"] / first["samples_per_s"]
            row["cpu_vs_config1"] = row["step_cpu_s"] / first["step_cpu_s"]


def _print_train_table(args, rows):
    mem_label = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS-base MiB"
    print(f"\nbenchmark.py train  model={args.model_name} device={args.device} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs) steps={args.steps}")
    header = (f"{'cfg':>3} {'size':>5} {'b':>2} {'thr':>3} {'prec':>5} {'attention':>9} {'cl':>3} {'comp':>4} "
              f"{'samples/s':>9} {'step s':>7} {'cpu s':>7} {mem_label:>17} {'x speed':>7} {'x mem':>6} "
              f"{'x cfg1':>6} {'cpu/cfg1':>8} {'GMACs/256px':>11}")
    if args.device.startswith("cuda"):
        header += f" {'GFLOP/sample':>12} {'MFU':>6}"
    print(header)
    for r in rows:
        head = (f"{r['config']:>3} {r['size']:>5} {r['batch']:>2} {r['threads'] or 'def':>3} {r['precision']:>5} "
                f"{r['attention']:>9} {'on' if r['channels_last'] else 'off':>3} {r['compile'][:4]:>4} ")
        if "skipped" in r:
            print(head + "skipped: " + r["skipped"])
            continue
        line = (head + f"{r['samples_per_s']:>9.3f} {r['step_s']:>7.3f} {r['step_cpu_s']:>7.3f} "
                f"{r['peak_mem_mb']:>17.0f} {r.get('speed_vs_naive', float('nan')):>7.2f} "
                f"{r.get('mem_vs_naive') or float('nan'):>6.2f} {r.get('speed_vs_config1', float('nan')):>6.2f} "
                f"{r.get('cpu_vs_config1', float('nan')):>8.2f} {r['gmacs_256']:>11.1f}")
        if args.device.startswith("cuda"):
            line += f" {r['flops_per_sample'] / 1e9:>12.1f} {r.get('mfu', float('nan')):>6.1%}"
        print(line)
    for i, config in enumerate(args.model_configs, 1):
        print(f"cfg{i}: {args.model_name} {json.dumps(config)}")
    print("x speed / x mem: samples/s and peak memory relative to fp32 + reference attention + channels-first "
          "+ eager at the same size and threads (the naive implementation); x cfg1: samples/s relative to cfg1; "
          "cpu s: the process's CPU seconds per step (median; less sensitive than wall time to a busy machine); "
          "cpu/cfg1: that relative to cfg1.")


SUBCOMMANDS["train"] = (_add_train_args, bench_train)



# ------------------------------------------------------------------------------------------------------- GPU memory
# GPU memory of training, counted without a GPU (sizing.footprint: fake tensors, live storages, CUDA's autocast
# lists): fixed + per-sample bytes by network, crop and precision, and the batch that fits a card. The H100 row of
# "GPU" (default network, L1, bf16, 256 px, batch 32, eager and compiled) is counted beside its measured figures.
MEASURED_H100 = {"eager": 24419, "compiled": 13813}  # MiB, torch.cuda.max_memory_allocated (BENCHMARKS.md, "GPU")
NETWORKS = {"default": {}, "design": net.design_switches()}
PRECISIONS = {"fp32": None, "fp16/bf16": torch.float16}  # fp16 and bf16 take the same bytes under the same op lists


def _add_memory_args(parser):
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS),
                        help="the default network and/or the design document's (net_CR_CrossAttention.design_switches)")
    parser.add_argument("--crops", type=int, nargs="+", default=[256, 128], help="training crop sizes")
    parser.add_argument("--val_size", type=int, default=256, help="validation size (the design's --load_size)")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="autocast precisions")
    parser.add_argument("--loss", default="design", choices=sorted(losses.LOSS_PRESETS),
                        help="loss preset (losses.LOSS_PRESETS; VGG counted where the preset uses it)")
    parser.add_argument("--gpus", nargs="+", default=["T4=15102", "P100=16280"],
                        help="NAME=MiB of memory the card reports; the batch column is the largest that fits it less "
                             "--context_mib with sizing.BATCH_MARGIN left")
    parser.add_argument("--context_mib", type=float, default=400,
                        help="the CUDA context's share of the card, not in torch's figures (300-500 MiB typically)")


def _training_args(loss):
    """The training script's flags for the loss preset (sizing resolves them for each network, as training does)."""
    return train.build_parser().parse_args(losses.preset_flags(loss))


def _h100_check():
    """The counted MiB of the H100 row's step beside its measured MiB, counted with and without CUDA's autocast
    lists (sizing.CudaAutocastPolicy): {"counted_mib", "cpu_lists_mib", "eager_mib", "compiled_mib"}."""
    counted = {}
    for key, cuda_autocast in (("counted_mib", True), ("cpu_lists_mib", False)):
        need = sizing.footprint("CrossAttention", {}, _training_args("l1"), 256, 256, torch.bfloat16,
                                cuda_autocast=cuda_autocast)
        counted[key] = (need.train_fixed + 32 * need.train_per_sample) / 2**20
    return {**counted, **{f"{k}_mib": v for k, v in MEASURED_H100.items()}}


def bench_memory(args):
    """GPU memory of a training step by network, crop and precision, counted without a GPU; batch per card."""
    gpus = {name: float(mib) for name, mib in (g.split("=") for g in args.gpus)}
    rows = []
    for network, crop, precision in itertools.product(args.networks, args.crops, args.precision):
        need = sizing.footprint("CrossAttention", NETWORKS[network], _training_args(args.loss), crop,
                                args.val_size, PRECISIONS[precision])
        free = {name: (mib - args.context_mib) * 2**20 for name, mib in gpus.items()}
        rows.append(dict(network=network, crop=crop, precision=precision, fixed_mib=need.train_fixed / 2**20,
                         per_sample_mib=need.train_per_sample / 2**20, val_per_sample_mib=need.val_per_sample / 2**20,
                         batch={name: sizing.largest_batch(need, b) for name, b in free.items()}))
        print(f"  done {network} {crop}px {precision}", flush=True)
    check = _h100_check()
    _print_memory_table(args, rows, check)
    return {"rows": rows, "h100": check}


def _print_memory_table(args, rows, check):
    names = list(rows[0]["batch"]) if rows else []
    print(f"\nbenchmark.py memory  loss={args.loss} validation at {args.val_size} px  (MiB; batch: the largest that "
          f"fits, {sizing.BATCH_MARGIN * 100:.0f} % margin, {args.context_mib:g} MiB context)")
    print(f"{'network':>8} {'crop':>4} {'precision':>9} {'fixed':>7} {'per sample':>10} {'val/sample':>10} "
          + " ".join(f"{'batch ' + n:>10}" for n in names))
    for r in rows:
        print(f"{r['network']:>8} {r['crop']:>4} {r['precision']:>9} {r['fixed_mib']:>7.0f} "
              f"{r['per_sample_mib']:>10.1f} {r['val_per_sample_mib']:>10.1f} "
              + " ".join(f"{str(r['batch'][n]):>10}" for n in names))
    print(f"H100 row (default network, L1, bf16, 256 px, batch 32): counted {check['counted_mib']:,.0f} MiB; measured "
          f"{check['eager_mib']:,} eager ({check['counted_mib'] / check['eager_mib']:.3f}x), {check['compiled_mib']:,} "
          f"compiled ({check['counted_mib'] / check['compiled_mib']:.3f}x); with CPU autocast's op lists "
          f"{check['cpu_lists_mib']:,.0f} MiB ({check['cpu_lists_mib'] / check['eager_mib']:.3f}x eager)")


SUBCOMMANDS["memory"] = (_add_memory_args, bench_memory)

# ------------------------------------------------------------------------------- training loop vs its model step
# The real training loop (train_CR_kaggle.setup, then train_one_epoch: data loading, host-to-device copies, the
# meter's reads, logging included) against the bare step it is built around: train_CR_kaggle.train_step on one
# batch already on the device, with the same run (model, loss preset, precision, batch, optimizer), in one fresh
# process per loss preset. The loop's first --warmup steps are not timed; one epoch holds all the steps, so start-up
# and validation are not in the figure. Blocks of bare steps run between blocks of loop steps, so the machine's load
# changes hit both alike. The VGG terms take random weights: ImageNet weights cannot be had offline, and they cost
# the same.


def _loop_data(out, n_unique, size, n_train):
    """A data list of n_train training rows (n_unique synthetic patches listed again and again, so a long epoch
    costs no more synthesis) and a small validation split. Returns the CSV path."""
    csv_path = dataloader.make_synthetic_dataset(Path(out) / "unique", n=n_unique, size=size, seed=0,
                                                 val_frac=0.2, test_frac=0.0)
    rows = datalist.read_data_list(csv_path)
    train_rows = [t for t in rows if t.split == 1]
    repeated = [train_rows[i % len(train_rows)] for i in range(n_train)]
    return datalist.write_data_list(Path(out) / "unique" / "loop.csv", repeated + [t for t in rows if t.split == 2])


def _cpu_seconds(pids):
    """User + system CPU seconds of these processes so far (/proc/PID/stat); vanished ones count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid):
    """PIDs of the processes whose parent is `pid` (the DataLoader's workers)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _machine_busy():
    """(busy, total) jiffies of all CPUs since boot (/proc/stat); differences give the machine's load."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class _GpuBusy:
    """Samples torch.cuda.utilization (NVML: the fraction of time a kernel ran) every 0.1 s in a thread, while
    `active` is set (during the loop's timed segments)."""

    def __init__(self, device):
        self.samples, self.stop, self.active, self.device = [], threading.Event(), threading.Event(), device
        try:
            torch.cuda.utilization(device)
        except Exception:  # no NVML bindings: the figure is reported as unavailable
            return
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self.stop.wait(0.1):
            if self.active.is_set():
                self.samples.append(torch.cuda.utilization(self.device))

    def fraction(self):
        self.stop.set()
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


class _InterleavedLoader:
    """The training DataLoader as the loop sees it, with the bare model step interleaved: after `warmup` batches,
    every `block` loop steps it runs `block` bare steps (their own timer), so machine load hits both alike.
    A loop segment runs from handing a batch to the loop until the batch after `block` steps is ready (the steps
    plus their waits for data); segments and bare blocks are bounded by a CUDA synchronisation."""

    def __init__(self, loader, warmup, block, bare_block, sync, gpu):
        self.loader, self.warmup, self.block, self.bare_block, self.sync, self.gpu = \
            loader, warmup, block, bare_block, sync, gpu
        self.sampler, self.dataset, self.batch_size = loader.sampler, loader.dataset, loader.batch_size
        self.loop_s = self.bare_s = self.cpu_s = 0.0
        self.loop_steps = self.bare_steps = 0
        self.busy, self.pids = [0, 0], None

    def __len__(self):
        return len(self.loader)

    def _open_segment(self):
        self.bare_s += self.bare_block(self.block)
        self.bare_steps += self.block
        if self.pids is None:
            self.pids = [os.getpid()] + _children(os.getpid())
        if self.gpu:
            self.gpu.active.set()
        return {"t": time.perf_counter(), "cpu": _cpu_seconds(self.pids), "busy": _machine_busy(), "steps": 0}

    def _close_segment(self, segment):
        self.sync()
        self.loop_s += time.perf_counter() - segment["t"]
        self.cpu_s += _cpu_seconds(self.pids) - segment["cpu"]
        busy = _machine_busy()
        self.busy = [self.busy[0] + busy[0] - segment["busy"][0], self.busy[1] + busy[1] - segment["busy"][1]]
        self.loop_steps += segment["steps"]
        if self.gpu:
            self.gpu.active.clear()

    def __iter__(self):
        segment = None
        for i, batch in enumerate(self.loader):
            if segment is not None and segment["steps"] == self.block:
                self._close_segment(segment)
                segment = None
            if segment is None and i >= self.warmup:
                segment = self._open_segment()
            if segment is not None:
                segment["steps"] += 1
            yield batch
        if segment is not None:
            self._close_segment(segment)


def _on_device(run, batch):
    """A loader batch as train_step finds it once on the device: the inputs by train_CR_kaggle.to_device, the rest of
    its tensors (the cloud labels train_step reads) moved as they are, so the timed steps copy nothing from the host."""
    rest = {k: v.to(run.device) for k, v in batch.items() if torch.is_tensor(v) and k not in train.BATCH_KEYS}
    return {**batch, **rest, **train.to_device(batch, run.device, run.channels_last)}


def _bare_steps(run, batch, steps, sync):
    """Seconds for `steps` calls of train_CR_kaggle.train_step on one batch already on the device: the training step
    with no data loading and no host reads. The run's step count is left as the loop had it (its warm-up, logs)."""
    global_step = run.global_step
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_step(run, batch)
    sync()
    run.global_step = global_step
    return time.perf_counter() - t0


def loop_worker(cfg):
    """One loss preset of `benchmark.py loop`, run by in_fresh_process: loop and bare-step samples/s, CPU/GPU busy."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        args = train.build_parser().parse_args([
            "--data_list_filepath", cfg["csv"], "--input_data_folder", str(Path(cfg["csv"]).parent),
            "--save_model_dir", tmp, "--experiment_name", "loop", "--max_epochs", "1", "--warmup_epochs", "0",
            "--batch_sz", str(cfg["batch"]), "--load_size", str(cfg["size"]), "--crop_size", str(cfg["size"]),
            "--num_workers", str(cfg["workers"]), "--amp", cfg["amp"], "--device", cfg["device"],
            "--num_quicklooks", "0", *losses.preset_flags(cfg["loss"], vgg_weights="random"), *cfg["train_flags"]])
        run = train.setup(args)
        cuda = run.device.type == "cuda"
        sync = _synchronizer(run.device)
        batch = _on_device(run, default_collate([run.train_loader.dataset[i] for i in range(cfg["batch"])]))
        _bare_steps(run, batch, cfg["warmup"], sync)  # allocation, kernel choice, compilation
        gpu = _GpuBusy(run.device) if cuda else None
        run.train_loader = timed = _InterleavedLoader(run.train_loader, cfg["warmup"], cfg["block"],
                                                      lambda n: _bare_steps(run, batch, n, sync), sync, gpu)
        stats = train.train_one_epoch(run, 0)
        n = cfg["batch"]
        out = {"loop_samples_per_s": timed.loop_steps * n / timed.loop_s, "loop_steps": timed.loop_steps,
               "step_samples_per_s": timed.bare_steps * n / timed.bare_s, "bare_steps": timed.bare_steps,
               "train_loss": stats["loss"], "run_cpu_cores": timed.cpu_s / timed.loop_s,
               "machine_busy": timed.busy[0] / max(timed.busy[1], 1), "gpu_busy": gpu.fraction() if gpu else None,
               "device": str(run.device), "amp": str(run.amp_dtype), "compiled": run.train_model is not run.model,
               "cpus": os.cpu_count()}
        if run.writer is not None:
            run.writer.close()
    out["ratio"] = out["loop_samples_per_s"] / out["step_samples_per_s"]
    return out


def _add_loop_args(parser):
    parser.add_argument("--loss", nargs="+", default=["l1", "design"], choices=list(losses.LOSS_PRESETS),
                        help="loss presets of losses.py, each in its own process: l1 (L1 only) and design (the design "
                             "document's loss set) are the cheapest and the dearest; VGG terms with random weights")
    parser.add_argument("--size", type=int, default=64, help="square training crop (the synthetic patch side)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--steps", type=int, default=24, help="timed loop steps (bare steps: the same number)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first, in the loop and the bare step")
    parser.add_argument("--block", type=int, default=6,
                        help="loop steps between bare-step blocks of the same length (interleaved: load hits both; "
                             "the workers' prefetch of 2 batches per worker happens during a bare block)")
    parser.add_argument("--workers", type=int, default=1,
                        help="DataLoader workers (training's default is 2; 1 worker + 1 thread fit 2 cores)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="training --amp")
    parser.add_argument("--device", default="auto", help="training --device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default). On a loaded 2-core machine 2 OpenMP threads wait "
                             "on each other (measured 2.7x slower than 1 here), which would drown what is measured")
    parser.add_argument("--unique", type=int, default=32, help="distinct synthetic patches the epoch cycles through")
    parser.add_argument("--train_flags", default="",
                        help="more train_CR_kaggle.py flags for every variant, e.g. '--compile on --log_every 10'")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per loss set before it is skipped")


def bench_loop(args):
    """Steady-state samples/s of the real training loop vs its bare training step; last line `loop/step RATIO`."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_loop_data_") as tmp:
        csv_path = _loop_data(tmp, args.unique, args.size, (args.warmup + args.steps) * args.batch)
        for loss in args.loss:
            cfg = dict(csv=str(csv_path), loss=loss, size=args.size, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, block=args.block, workers=args.workers, amp=args.amp, device=args.device,
                       threads=args.threads, train_flags=shlex.split(args.train_flags))
            results[loss] = in_fresh_process(loop_worker, cfg, timeout=args.timeout)
            print(f"  done {loss}: loop {results[loss]['loop_samples_per_s']:.2f} samples/s", flush=True)
    first = next(iter(results.values()))
    print(f"\nbenchmark.py loop  device={first['device']} ({os.cpu_count()} CPUs) amp={first['amp']} "
          f"compiled={first['compiled']} {args.size} px batch {args.batch} workers {args.workers} threads "
          f"{args.threads or 'default'}; {first['loop_steps']} loop and {first['bare_steps']} bare steps timed in "
          f"blocks of {args.block}, after {args.warmup} warm-up {args.train_flags}".rstrip())
    print(f"{'loss':<14}{'loop samples/s':>15}{'step samples/s':>15}{'loop/step':>10}{'run CPU cores':>14}"
          f"{'machine busy':>13}{'GPU busy':>9}")
    for loss, r in results.items():
        gpu = "n/a" if r["gpu_busy"] is None else f"{r['gpu_busy']:.0%}"
        print(f"{loss:<14}{r['loop_samples_per_s']:>15.2f}{r['step_samples_per_s']:>15.2f}{r['ratio']:>10.2f}"
              f"{r['run_cpu_cores']:>14.2f}{r['machine_busy']:>13.0%}{gpu:>9}")
    if {"l1", "design"} <= set(results):
        print(f"design-loss loop / L1 loop: "
              f"{results['design']['loop_samples_per_s'] / results['l1']['loop_samples_per_s']:.2f}")
    worst = min(results, key=lambda k: results[k]["ratio"])
    print(f"loop/step {results[worst]['ratio']:.2f}" + (f"  (lowest: {worst})" if len(results) > 1 else ""))
    return {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "results": results}


SUBCOMMANDS["loop"] = (_add_loop_args, bench_loop)


# ----------------------------------------------------------------------------------------- learning and ablations
# Does the model learn, and what does each part of the design buy? Trains every variant with the real
# scripts (train_CR_kaggle.py, then test_CR.py on the test split) in fresh subprocesses on the synthetic
# dataset, for several seeds, and reports test-split scores beside the identity baseline (cloudy input
# taken as the prediction). The base loss set is losses.LOSS_PRESETS["design_no_vgg"] (the design's minus the two
# VGG terms), or "design" when --vgg_weights is given: pretrained VGG weights cannot be had offline, and random VGG
# features measure nothing perceptual. A variant is training flags (LEARN_VARIANTS) plus, where it changes the loss
# set, overrides of the base preset's options (LEARN_LOSS_OVERRIDES).
LEARN_VARIANTS = {
    "full": [],
    # what each part added to the design document's network buys (BENCHMARKS.md, "Learning and ablations")
    "no_confidence_loss": ["--confidence_weight", "0"],
    "no_residual_loss": ["--residual_weight", "0"],
    "no_confidence_refinement": ["--no-use_confidence_refinement"],
    "no_sar_skips": ["--no-use_sar_skips"],
    "no_affine_residual": ["--no-affine_residual"],  # the default before the affine residual head
    "design": lambda: _design_flags(),  # the design document's network and losses, nothing added
    "with_date_correction": ["--use_date_correction"],
    # the design's own parts
    "no_spectral_attention": ["--no-use_spectral_attention"],
    "no_cloud_predictor": ["--no-use_cloud_predictor"],  # plain residual; the map's loss terms go with it
    "no_cloud_focused_loss": [],  # plain L1 in place of the cloud-focused L1: LEARN_LOSS_OVERRIDES
    "no_sar": ["--sar_input", "zeros"],
    "no_cross_attn": ["--no-use_cross_attn"],
    "fp32": ["--amp", "off"],
    "DSen2CR": ["--model_name", "DSen2CR"],
    # the default with the uncertainty head, trained by each NLL (docs/uncertainty.md)
    "uncertainty_gaussian": ["--use_uncertainty_head", "--nll_distribution", "gaussian"],
    "uncertainty_laplace": ["--use_uncertainty_head", "--nll_distribution", "laplace"],
}


def _design_flags():
    """Every switch added since the design document at its older value, and the map's loss terms off (a function:
    reading losses here would load it, and torchvision, into every worker process at import)."""
    return ([f"--{'' if on else 'no-'}{switch}" for switch, on in net.design_switches().items()]
            + [arg for t in losses.LOSS_TERMS if t.needs == "use_cloud_predictor"
               for arg in (f"--{t.name}_weight", "0")])


def learn_variant_flags(variant):
    flags = LEARN_VARIANTS[variant]
    return flags() if callable(flags) else list(flags)


LEARN_LOSS_OVERRIDES = {
    "no_cloud_focused_loss": {"use_cloud_focused_loss": False},
}


# The data settings of `learn`. 128 px: a quarter as many patches as 64 px, so a run trains on the same pixels,
# and batch 1, so a step sees the same pixels and a run takes about as many steps (96 against 112).
LEARN_SETTINGS = {"64": dict(n=80, size=64, batch_sz=4, out="runs/learn"),
                  "128": dict(n=20, size=128, batch_sz=1, out="runs/learn128")}


def _add_learn_args(parser):
    parser.add_argument("--variants", default="full,no_confidence_loss,no_residual_loss,no_confidence_refinement,"
                        "no_sar_skips,no_affine_residual,design,no_cloud_predictor",
                        help=f"comma-separated, from: {', '.join(LEARN_VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds per variant")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs per run (the fixed budget)")
    parser.add_argument("--setting", choices=list(LEARN_SETTINGS), default="64",
                        help="data setting: '64' = 80 patches of 64 px, batch 4; '128' = 20 patches of 128 px, "
                             "batch 1 (the same pixels per run and per step, 4x the context per patch, so a "
                             "receptive-field advantage shows); --n, --size, --batch_sz override its values")
    parser.add_argument("--n", type=int, default=None, help="synthetic patches (split by scene into train/val/test)")
    parser.add_argument("--size", type=int, default=None, help="synthetic patch size in pixels (trained uncropped)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--batch_sz", type=int, default=None, help="training batch size")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument("--amp", default="bf16", help="precision of every variant except 'fp32'")
    parser.add_argument("--vgg_weights", default=None,
                        help="VGG weights path: adds the design's perceptual and contrastive terms")
    parser.add_argument("--out", default=None, help="folder for data, checkpoints and results "
                        "(default runs/learn, or runs/learn128 for --setting 128: run names do not hold the size)")
    parser.add_argument("--extra", default="", help="extra training flags for every variant, e.g. '--lr 1e-3'; a "
                        "single flag as --extra=--use_date_correction (argparse takes a lone '--flag' for an option)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also score each variant's seeds as one ensemble (test_CR.py with all their checkpoints)")


def _learn_loss_flags(variant, vgg_weights):
    """Training flags of a variant's loss set: the design's preset (without its two VGG terms unless vgg_weights is
    given), changed by the variant's LEARN_LOSS_OVERRIDES."""
    overrides = dict(LEARN_LOSS_OVERRIDES.get(variant, {}))
    if vgg_weights:
        overrides["vgg_weights"] = vgg_weights
    return losses.preset_flags("design" if vgg_weights else "design_no_vgg", **overrides)


def resolve_learn_setting(args):
    """args with --n, --size, --batch_sz and --out taken from --setting where not given."""
    for key, value in LEARN_SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def learn_train_flags(variant, seed, args, csv_path, out):
    """train_CR_kaggle.py's flags for one learn run. The memory layout is pinned (channels-last, the CPU default when
    the rows of BENCHMARKS.md were first measured): under bf16 it changes the arithmetic, so a run is reproducible
    only in a fixed one, and --channels_last auto's timing probe picks either where the two time alike (seed 0 of the
    default: 37.05 dB channels-last, 36.52 not). --extra may still set another."""
    return ["--data_list_filepath", str(csv_path), "--input_data_folder", str(Path(csv_path).parent),
            "--load_size", str(args.size), "--crop_size", str(args.size), "--max_epochs", str(args.epochs),
            "--batch_sz", str(args.batch_sz), "--lr", str(args.lr), "--warmup_epochs", "1", "--num_workers", "1",
            "--amp", args.amp, "--channels_last", "on", "--seed", str(seed), "--save_model_dir", str(out / "ckpt"),
            "--experiment_name", f"{variant}_s{seed}", "--train_from_scratch", "--num_quicklooks", "0",
            *_learn_loss_flags(variant, args.vgg_weights), *learn_variant_flags(variant), *args.extra.split()]


def _learn_run(variant, seed, args, csv_path, out):
    name = f"{variant}_s{seed}"
    train_cmd = [sys.executable, "train_CR_kaggle.py", *learn_train_flags(variant, seed, args, csv_path, out)]
    t0 = time.time()
    subprocess.run(train_cmd, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t0
    return {"variant": variant, "seed": seed, "train_s": train_s,
            **_learn_scores([out / "ckpt" / name / "best.pth"], csv_path, out / "results" / name)}


def _learn_scores(checkpoints, csv_path, results):
    """test_CR.py on the test split (several checkpoints: their ensemble); the figures a learn row reads."""
    subprocess.run([sys.executable, "test_CR.py", "--checkpoint", *map(str, checkpoints), "--data_list_filepath",
                    str(csv_path), "--input_data_folder", str(Path(csv_path).parent), "--split", "test",
                    "--results_dir", str(results)], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((results / "summary.json").read_text())
    u = summary.get("uncertainty")
    figures = None if u is None else {
        "cloudy_clear_ratio": u["cloudy_clear_ratio"], "aleatoric_std": u["aleatoric_std"],
        "epistemic_std": u["epistemic_std"],
        **{f"{key}_{region}": r[key] for region, r in u["regions"].items() if r is not None
           for key in ("spearman", "uce_pixels", "uce_pixels_constant", "uce_images", "uce_images_constant",
                       "sparsification_area", "mean_std")},
        **{f"rmse_drop_{pct}_{region}": r["rmse_drop_pct"][pct] for region, r in u["regions"].items()
           if r is not None for pct in r["rmse_drop_pct"]},
        **{f"oracle_drop_{pct}_{region}": r["oracle_rmse_drop_pct"][pct] for region, r in u["regions"].items()
           if r is not None for pct in r["oracle_rmse_drop_pct"]}}
    return {"model": summary["mean"]["model"], "identity": summary["mean"]["identity"], "n_test": summary["n_images"],
            "confidence": summary.get("confidence"), "clear_change": summary["clear_change"]["model"],
            "uncertainty": figures, "truth_bins": summary.get("truth_bins")}


def bench_learn(args):
    """Train each design variant on synthetic data for a fixed budget, score the test split vs identity."""
    args = resolve_learn_setting(args)
    out = Path(args.out)
    csv_path = out / f"data_n{args.n}_s{args.size}_seed{args.data_seed}" / "data.csv"
    if not csv_path.is_file():
        dataloader.make_synthetic_dataset(csv_path.parent, n=args.n, size=args.size, seed=args.data_seed)
    runs = []
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in LEARN_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(LEARN_VARIANTS)}")
    for variant in variants:
        for seed in (int(s) for s in args.seeds.split(",")):
            run = _learn_run(variant, seed, args, csv_path, out)
            runs.append(run)
            print(f"{variant:<24} seed {seed}: test PSNR {run['model']['all']['PSNR']:.2f} dB "
                  f"(identity {run['identity']['all']['PSNR']:.2f}) in {run['train_s']:.0f} s", flush=True)

    table = [_learn_row(variant, [r for r in runs if r["variant"] == variant]) for variant in variants]
    if args.ensemble:
        for variant in variants:
            members = [r for r in runs if r["variant"] == variant]
            if len(members) > 1:
                names = [f"{variant}_s{r['seed']}" for r in members]
                run = {"variant": f"{variant} (ensemble)", "seed": "+".join(str(r["seed"]) for r in members),
                       "train_s": 0.0, **_learn_scores([out / "ckpt" / n / "best.pth" for n in names], csv_path,
                                                        out / "results" / f"{variant}_ensemble")}
                runs.append(run)
                table.append(_learn_row(run["variant"], [run]))
    _print_learn_table(table, runs[0]["identity"], f"{runs[0]['n_test']} test patches of {args.size} px, "
                       f"{args.epochs} epochs each")
    _print_truth_bins(table, runs)
    return {"runs": runs, "table": table, "identity": runs[0]["identity"],
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}}


# What each learn row reports: (key, getter of one run's figure)
LEARN_COLUMNS = (
    ("PSNR", lambda r: r["model"]["all"]["PSNR"]),
    ("PSNR_cloudy", lambda r: r["model"]["cloudy"]["PSNR"]),
    ("SSIM", lambda r: r["model"]["all"]["SSIM"]),
    ("SAM", lambda r: r["model"]["all"]["SAM"]),
    ("conf_AUC_truth", lambda r: (r["confidence"] or {}).get("auc_truth_pooled")),
    ("conf_clear", lambda r: (r["confidence"] or {}).get("mean_clear")),
    ("clear_change", lambda r: r["clear_change"]),
    # the predicted uncertainty (None for a model without one): docs/uncertainty.md
    ("unc_spearman", lambda r: (r.get("uncertainty") or {}).get("spearman_all")),
    ("unc_drop10_pct", lambda r: (r.get("uncertainty") or {}).get("rmse_drop_10_all")),
    ("unc_UCE_px", lambda r: (r.get("uncertainty") or {}).get("uce_pixels_all")),
    # the constant baseline's UCE: the same over pixels as over images when the images are of one size
    ("unc_UCE_const", lambda r: (r.get("uncertainty") or {}).get("uce_pixels_constant_all")),
    ("unc_UCE_img", lambda r: (r.get("uncertainty") or {}).get("uce_images_all")),
    ("unc_cloudy_clear", lambda r: (r.get("uncertainty") or {}).get("cloudy_clear_ratio")),
)


def _learn_row(variant, runs):
    """Mean and sample std over seeds of every LEARN_COLUMNS figure (None where a variant has no such figure), and
    the mean over seeds of each true-cloud bin's PSNR (test_CR.py's "truth_bins")."""
    row = {"variant": variant, "seeds": [r["seed"] for r in runs],
           "train_s": float(np.mean([r["train_s"] for r in runs]))}
    bins = [r["truth_bins"] for r in runs if r.get("truth_bins")]
    row["truth_bins"] = None if len(bins) < len(runs) else {
        name: None if any(b[name]["PSNR_model"] is None for b in bins)
        else float(np.mean([b[name]["PSNR_model"] for b in bins])) for name in bins[0]}
    for key, get in LEARN_COLUMNS:
        values = [get(r) for r in runs]
        if any(v is None for v in values):
            row[key] = None
            continue
        values = np.asarray(values, dtype=np.float64)
        row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return row


def _print_learn_table(table, identity, what):
    """The learn table; columns no row has a figure for (e.g. the uncertainty's, without a head) are left out."""
    keys = [key for key, _ in LEARN_COLUMNS if any(row[key] is not None for row in table)]
    print(f"\n{'variant':<32}" + "".join(f"{key:>18}" for key in keys) + f"{'train s':>9}")
    for row in table:
        cells = "".join(f"{'-':>18}" if row[k] is None else f"{row[k][0]:>10.3f} ± {row[k][1]:<5.3f}" for k in keys)
        print(f"{row['variant']:<32}{cells}{row['train_s']:>9.0f}")
    known = {"PSNR": identity["all"]["PSNR"], "PSNR_cloudy": identity["cloudy"]["PSNR"],
             "SSIM": identity["all"]["SSIM"], "SAM": identity["all"]["SAM"], "clear_change": 0.0}
    print(f"{'identity (cloudy input)':<32}" + "".join(f"{known[k]:>10.3f}{'':8}" if k in known else f"{'-':>18}"
                                                      for k in keys))
    print(f"mean ± sample std over seeds; {what}")


def _print_truth_bins(table, runs):
    """PSNR by true cloud per variant (means over seeds), beside the identity's: where each variant's error lies."""
    rows = [row for row in table if row["truth_bins"]]
    if not rows:
        return
    names = list(rows[0]["truth_bins"])
    identity = runs[0]["truth_bins"]
    print(f"\nPSNR by true cloud, dB (squared error pooled over each bin's pixels; means over seeds)\n{'variant':<32}"
          + "".join(f"{name:>20}" for name in names))
    fmt = lambda v: f"{'-':>20}" if v is None else f"{v:>20.2f}"
    for row in rows:
        print(f"{row['variant']:<32}" + "".join(fmt(row["truth_bins"][name]) for name in names))
    print(f"{'identity (cloudy input)':<32}" + "".join(fmt(identity[name]["PSNR_identity"]) for name in names))
    print(f"{'pixels':<32}" + "".join(f"{identity[name]['pixels']:>20}" for name in names))


SUBCOMMANDS["learn"] = (_add_learn_args, bench_learn)


# ----------------------------------------------------------------------------------------- uncertainty: sparsification
# How far can a head's own stds go? The RMSE fall when the most uncertain pixels are removed, for the model's real
# errors and for errors drawn from the distributions the head predicts (what a perfectly calibrated head with the
# same stds would give): if both fall alike, the limit is the spread of the stds, not their calibration.

def _add_sparsify_args(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with the uncertainty head")
    parser.add_argument("--data_list_filepath", required=True, help="CSV list of the data set")
    parser.add_argument("--split", default="test", help="rows of the list to use")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn errors")


def bench_sparsify(args):
    """Sparsification of a head's stds: the model's errors against errors drawn from the predicted Laplace."""
    model, _ = runtime.load_model(args.checkpoint, torch.device("cpu"))
    rows = datalist.select_split(datalist.read_data_list(args.data_list_filepath), args.split)
    dataset = dataloader.SEN12MSCRDataset(rows, str(Path(args.data_list_filepath).parent), augment=False)
    rng, std, se, drawn = np.random.default_rng(args.seed), [], [], []
    for sample in (dataset[i] for i in range(len(dataset))):
        out = test_CR.forward_all(model, sample["cloudy_data"][None], sample["SAR_data"][None],
                                  contextlib.nullcontext())
        band_std = out["variance"][0].sqrt().numpy()
        error = (out["prediction"][0] - sample["cloudfree_data"]).numpy()
        std.append(band_std.mean(0).ravel())
        se.append((error ** 2).mean(0).ravel())
        drawn.append((rng.laplace(0.0, band_std / np.sqrt(2.0)) ** 2).mean(0).ravel())  # Laplace scale = std / sqrt 2
    std = np.concatenate(std)
    figures = {"std_percentiles_50_90_99": np.percentile(std, [50, 90, 99]).tolist()}
    for name, squared in (("model", np.concatenate(se)), ("drawn_laplace", np.concatenate(drawn))):
        curve = metrics.sparsification(std, squared)
        at = curve["removed"].index(0.10)
        figures[name] = {"fall_10_pct": 100 * (1 - curve["rmse"][at] / curve["rmse"][0]),
                         "oracle_fall_10_pct": 100 * (1 - curve["oracle_rmse"][at] / curve["oracle_rmse"][0]),
                         "spearman": metrics.spearman(std, np.sqrt(squared))}
        print(f"{name:<14} RMSE fall with the 10 % most uncertain pixels removed {figures[name]['fall_10_pct']:.1f} % "
              f"(oracle {figures[name]['oracle_fall_10_pct']:.1f} %), Spearman {figures[name]['spearman']:.3f}")
    print(f"std percentiles 50 / 90 / 99: {' / '.join(f'{v:.4f}' for v in figures['std_percentiles_50_90_99'])}")
    return figures


SUBCOMMANDS["sparsify"] = (_add_sparsify_args, bench_sparsify)


if __name__ == "__main__":
    sys.exit(main())
