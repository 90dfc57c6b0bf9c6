"""The reusable training machinery, called by train_CR_kaggle.py and by the benchmarks: the Run and setup(), which
builds it from training_setup's pieces; one step (train_step, optimizer_step, StepMeter, to_device, get_lr,
clip_groups); an epoch and validation; the time limit; what an epoch leaves behind (history.csv, TensorBoard,
last.pth/best.pth); and the dry run's timing (time_steps, validation_seconds_per_sample).
"""
from __future__ import annotations  # Run's fields name types defined below it (StepMeter) or imported lazily

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import bands
import files
import losses
import metrics
import net_CR_temporal
import rasters
import runtime
import sizing
import training_setup

if TYPE_CHECKING:  # TensorBoard is imported when a run starts logging (setup_logging), not with this module
    from torch.utils.tensorboard import SummaryWriter

HISTORY_FIELDS = (["epoch", "lr", "train_loss", "train_psnr", "samples_per_s"]
                  + [f"val_{name}" for name in metrics.METRIC_NAMES] + ["best_psnr", "seconds"])
BATCH_KEYS = ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask")  # the tensors a step moves to the device
# Host reads of the step's figures (loss, terms, PSNR, gradient norm, the non-finite flag) happen every LOG_EVERY
# steps: a read waits for the GPU to drain its queue; reading all of them every step cost 6-8 % on an H100.
LOG_EVERY = 10
# --time_limit: stop after an epoch when elapsed + MARGIN x the longest epoch so far would pass the limit; within an
# epoch, stop (like SIGTERM: a resumable last.pth) when less than RESERVE of the limit is left.
TIME_LIMIT_MARGIN = 1.25
TIME_LIMIT_RESERVE_S = 60.0
# --dry_run times this many training steps after this many untimed ones (workers starting, kernels chosen, compiling)
DRY_RUN_WARMUP, DRY_RUN_TIMED = 2, 3


# ----------------------------------------------------------------------------- the run and its set-up

@dataclass
class Run:
    """One training run, every field declared here. setup() fills the first two blocks once; the loop's functions
    update the progress fields."""
    args: argparse.Namespace
    argv: list[str]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.monotonic)  # for --time_limit, counted from set-up
    # built by setup()
    dir: Path | None = None
    amp_dtype: torch.dtype | None = None
    amp_text: str = ""           # the header's precision and why
    batch_text: str = ""         # the header's batch and why (--batch_sz auto says what it counted)
    footprint: sizing.Footprint | None = None  # where --batch_sz auto counted it
    layout_text: str = ""        # the header's memory layout and why
    channels_last: bool = False
    ctx: contextlib.AbstractContextManager | None = None  # the one autocast context: training, validation, quicklooks
    criterion: losses.CRLoss | None = None
    model: torch.nn.Module | None = None  # a net_CR_CrossAttention network
    train_model: torch.nn.Module | None = None  # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer | None = None
    # parameter lists --grad_clip clips each on its own
    clip_groups: list[list[torch.nn.Parameter]] = field(default_factory=list)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # after the warm-up; None for --lr_scheduler none
    scaler: torch.amp.GradScaler | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    meter: StepMeter | None = None
    compiled: bool = False
    show_bars: bool = False
    warmup_steps: int = 0
    start_epoch: int = 0         # epochs done when this process started (resumed runs start above 0)
    first_step: int = 0
    quicklook_batch: dict[str, torch.Tensor] | None = None
    writer: SummaryWriter | None = None
    made_dir: Path | None = None     # folders this run created, removed again if it fails before its first step
    moved_aside: Path | None = None  # an old run moved aside by --train_from_scratch, put back on such a failure
    # progress
    epochs_done: int = 0
    global_step: int = 0
    best_psnr: float = -math.inf
    early_stop_counter: int = 0
    history: list[dict[str, float | int | str]] = field(default_factory=list)  # history.csv's rows
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_started: float = 0.0
    # the next epoch's iterator, asked for before validation so workers prefetch
    next_batches: Iterator[dict[str, torch.Tensor]] | None = None
    grad_norm: torch.Tensor | None = None  # the last step's gradient norm (a device tensor)
    last_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # the last step's loss terms (device tensors)
    stop_signal: int | None = None
    stop_requested: bool = False  # a signal or the time limit's reserve ended an epoch part-way
    stop_reason: str | None = None

    @property
    def is_main(self):
        return self.rank == 0


def setup(args, argv=(), prepare=None):
    """Everything a run needs, in the order that fails early: device, data list, model, losses (their defaults
    depend on the model, a resumed run's on its checkpoint), data, optimiser,
    then (only then) the run folder and logging. prepare(args): the script's changes to the flags, made by rank 0
    once the processes are up and shared with the others (train_CR_kaggle.prepare_demo)."""
    device, rank, world_size = training_setup.setup_distributed(args.device)
    run = Run(args=args, argv=list(argv), device=device, rank=rank, world_size=world_size)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if prepare is not None:
        prepare_args(run, prepare)
    run.dir = Path(args.save_model_dir) / args.experiment_name
    resume_path = args.resume or (None if args.train_from_scratch else
                                  (run.dir / "last.pth" if (run.dir / "last.pth").is_file() else None))
    # the data list and its files, and the checkpoint to resume: both reported when both are wrong
    (train_rows, val_rows), ckpt = runtime.check_together(
        lambda: training_setup.check_data(args, run.is_main),
        lambda: runtime.load_checkpoint(resume_path, map_location="cpu") if resume_path else None)
    run.amp_dtype, use_scaler = runtime.resolve_amp(args.amp, device)
    run.amp_text, amp_warning = runtime.describe_amp(args.amp, device)
    if amp_warning and rank == 0:
        print(amp_warning, file=sys.stderr)
    run.ctx = runtime.autocast(device, run.amp_dtype)  # the one autocast context: training, validation, quicklooks
    run.model = training_setup.build_model(args, ckpt, resume_path, run.is_main).to(device)
    run.criterion = losses.CRLoss(training_setup.resolve_losses(args, run.model, ckpt, run.is_main),
                                  vgg_dtype=run.amp_dtype,
                                  vgg_weights=args.vgg_weights).to(device)  # fails here without VGG weights
    run.channels_last, run.layout_text = training_setup.resolve_channels_last(
        args, run.model, run.ctx, device, world_size, None if ckpt is None else ckpt.get("channels_last"))
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
        run.criterion.to(memory_format=torch.channels_last)  # its VGG, fed channels-last inputs
    # the number args.json and checkpoints keep
    args.batch_sz, run.batch_text = training_setup.resolve_batch(run, len(train_rows))
    run.train_loader, run.val_loader, val_set = training_setup.build_loaders(args, train_rows, val_rows, device, rank,
                                                                             world_size)
    run.optimizer, run.scheduler = training_setup.build_optimizer(args, run.model, device)
    run.clip_groups = clip_groups(run.model)
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if ckpt is not None:
        training_setup.restore(run, ckpt)
    run.start_epoch, run.first_step = run.epochs_done, run.global_step
    run.warmup_steps = int(args.warmup_epochs * len(run.train_loader))
    run.compiled = training_setup.resolve_compile(args.compile, device)
    run.train_model = torch.compile(run.model) if run.compiled else run.model
    if world_size > 1:
        run.train_model = DDP(run.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    run.meter = StepMeter(["loss", "psnr", "grad_norm"] + list(run.criterion.weights), device)
    run.show_bars = run.is_main and (sys.stderr.isatty() or "ipykernel" in sys.modules)  # a terminal or a notebook
    if run.is_main and not args.dry_run:  # a dry run writes nothing
        run.quicklook_batch = read_quicklooks(val_set, args.num_quicklooks)  # reads files: before the folder exists
        training_setup.prepare_run_dir(run)
        setup_logging(run, ckpt is not None, val_set)
    if world_size > 1:
        dist.barrier()
    return run


def prepare_args(run, prepare):
    """prepare(run.args) on rank 0, whose flags every other rank then takes (the demo: rank 0 builds the data)."""
    if run.is_main:
        prepare(run.args)
    if run.world_size > 1:  # rank 0 built the data; everyone takes the same settings
        holder = [vars(run.args)]
        dist.broadcast_object_list(holder, src=0)
        vars(run.args).update(holder[0])


def read_quicklooks(val_set, n):
    picks = [val_set[i] for i in range(min(n, len(val_set)))]
    return {k: torch.stack([s[k] for s in picks]) for k in BATCH_KEYS} if picks else None


def setup_logging(run, resumed, val_set):
    """Rank 0 only: TensorBoard, args.json, the history so far."""
    from torch.utils.tensorboard import SummaryWriter

    args = run.args
    run.writer = SummaryWriter(log_dir=str(run.dir / "tensorboard"), purge_step=run.global_step or None)
    files.write_text_atomic(run.dir / "args.json", json.dumps(vars(args), indent=2, default=str))
    run.writer.add_text("notes", args.notes or "(none)", run.global_step)
    run.history = read_history(run.dir / "history.csv") if resumed else []
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"{run.model.model_name}: {n_params / 1e6:.2f}M parameters | device {run.device} x{run.world_size} | "
          f"{run.amp_text} | {run.batch_text} | {run.layout_text} | compile {'on' if run.compiled else 'off'} | "
          f"{len(run.train_loader.dataset)} train / {len(val_set)} val samples | run dir {run.dir}")


# ----------------------------------------------------------------------------- history and quicklooks

def write_history(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    files.write_text_atomic(path, buf.getvalue())


def read_history(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quicklook_grid(cloudy, prediction, target, confidence):
    """One row per sample: cloudy | prediction | target | confidence, RGB with the project's fixed stretch."""
    panels = [bands.s2_to_rgb(cloudy), bands.s2_to_rgb(prediction), bands.s2_to_rgb(target)]
    conf = confidence if confidence is not None else torch.zeros_like(cloudy[:, :1])
    panels.append(conf.clamp(0, 1).expand(-1, 3, -1, -1))
    rows = [torch.cat([p[i] for p in panels], dim=2) for i in range(cloudy.shape[0])]
    return torch.cat(rows, dim=1)  # 3 x (n*H) x (4*W)


@torch.no_grad()
def log_quicklooks(run):
    """The fixed validation samples through the model, under the run's autocast context, into TensorBoard."""
    batch = to_device(run.quicklook_batch, run.device)
    run.model.eval()
    with run.ctx:
        prediction, aux = run.model(batch["cloudy_data"], batch["SAR_data"], return_aux=True)
    run.model.train()
    confidence = None if aux.confidence is None else aux.confidence.float().cpu()
    shown = batch["cloudy_data"] if batch["cloudy_data"].dim() == 4 else aux.corrected  # a series: its base
    grid = quicklook_grid(shown.cpu(), bands.finish_s2(prediction).cpu(),
                          batch["cloudfree_data"].cpu(), confidence)
    run.writer.add_image("val/quicklook_cloudy_prediction_target_confidence", grid, run.global_step)


# ----------------------------------------------------------------------------- train / validate

class StepMeter:
    """What each training step reports (loss, PSNR, gradient norm, loss terms; whether it was skipped), summed on
    the device. read() is the loop's only host read of them, every --log_every steps and at the end of an epoch."""

    def __init__(self, names, device):
        self.names, self.device = list(names), device
        self.streak = torch.zeros((), device=device)  # consecutive skipped steps; runs on across reads and epochs
        self._reset()
        self.start_epoch()

    def start_epoch(self):
        self.epoch_sums, self.epoch_taken = dict.fromkeys(self.names, 0.0), 0

    def epoch_mean(self, name):
        """Mean over this epoch's steps taken and read so far."""
        return self.epoch_sums[name] / max(self.epoch_taken, 1)

    def _reset(self):
        # the named sums over the steps taken, then: steps taken, steps skipped, longest skip streak
        self.sums = torch.zeros(len(self.names) + 3, device=self.device)

    def add(self, values, skipped):
        """values: 0-d tensors in the order of names; skipped: 0-d float, 1 when the step was not taken."""
        self.streak = (self.streak + 1) * skipped
        taken = torch.where(skipped > 0, 0.0, torch.stack(values).float())  # a skipped step's NaN stays out
        self.sums[:-1] += torch.cat([taken, torch.stack([1 - skipped, skipped])])
        self.sums[-1] = torch.maximum(self.sums[-1], self.streak)

    def read(self):
        """Host copy of the figures since the last read: {"means": {name: mean over the steps taken}, "taken",
        "skipped", "worst_streak"}; adds them to the epoch's totals and starts a new interval."""
        *sums, taken, skipped, worst = self.sums.tolist()
        self._reset()
        for name, value in zip(self.names, sums):
            self.epoch_sums[name] += value
        self.epoch_taken += int(taken)
        means = {name: value / taken if taken else math.nan for name, value in zip(self.names, sums)}
        return {"means": means, "taken": int(taken), "skipped": int(skipped), "worst_streak": int(worst)}


def get_lr(step, peak_lr, warmup_steps):
    """Learning rate of warm-up iteration `step`: linear from peak_lr / warmup_steps up to peak_lr. After the
    warm-up the scheduler (plateau, cosine, step) owns the learning rate."""
    return peak_lr * (step + 1) / warmup_steps


def to_device(batch, device, channels_last=False):
    """The batch's tensors on the device (non-blocking from pinned memory); S2 that came as uint16 x10000 is
    normalised there to [0, 1], the same float32 values the dataset's float encoding gives."""
    out = {}
    for key in BATCH_KEYS:
        t = batch[key]
        if t.dtype == torch.uint16:  # moved as int16, the same bits (values <= 10000): every backend converts int16
            out[key] = t.view(torch.int16).to(device, non_blocking=True).float() * (1.0 / bands.S2_SCALE)
        else:
            out[key] = t.to(device, non_blocking=True)
    if channels_last:  # the model's convolutions want NHWC inputs when its weights are NHWC (a series: per date)
        for key in ("cloudy_data", "SAR_data") if out["cloudy_data"].dim() == 4 else ():
            out[key] = out[key].contiguous(memory_format=torch.channels_last)
    return out


def optimizer_step(run, skip):
    """Clip and step without reading the device: the fused AdamW skips the update itself when `skip` is 1 or the
    gradient norm is not finite; under fp16 the GradScaler hands it its own inf/NaN check the same way."""
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    clip = run.args.grad_clip if run.args.grad_clip > 0 else math.inf
    network, *head = (torch.nn.utils.clip_grad_norm_(group, clip, foreach=True) for group in run.clip_groups)
    run.grad_norm = network  # the network's, as without a head: the figure TensorBoard shows
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
        return
    found_inf = torch.maximum(skip, (~torch.isfinite(torch.stack([network, *head]).sum())).float())
    if not run.optimizer.param_groups[0].get("fused"):  # no device-side skip: read the flag
        if not found_inf.item():
            run.optimizer.step()
        return
    run.optimizer.found_inf = found_inf
    run.optimizer.step()
    del run.optimizer.found_inf


def clip_groups(model):
    """The parameter lists whose gradients --grad_clip clips each on its own: the network's, then the uncertainty
    head's where there is one. The head learns from the NLL term alone; clipped together, its gradient would change
    the factor the network's gradient is clipped by, and so how the network trains (docs/uncertainty.md: apart,
    the network trains bit for bit as without the head)."""
    head = [p for name, p in model.named_parameters() if name.startswith("uncertainty_head.")]
    in_head = {id(p) for p in head}
    return [[p for p in model.parameters() if id(p) not in in_head]] + ([head] if head else [])


def cloud_labels(batch):
    """Where the clouds are: the true cloud map where the data has one (synthetic sets), else the detector's binary
    mask (score >= threshold); (N,1,H,W), or each input date's (N,T,1,H,W)."""
    if "cloud_truth" in batch:
        return rasters.truth_mask(batch["cloud_truth"]).float()
    return batch["cloud_binary"]


def confidence_targets(batch, device, weights):
    """(what the confidence map should be, what each input date's should be) on the device, None where no loss term
    reads it: cloud_labels, made once; the target's for several dates is cloudy on every date
    (net_CR_temporal.target_cloud_mask), the dates' are their own."""
    if "confidence" not in weights and "date_confidence" not in weights:
        return None, None
    labels = cloud_labels(batch).to(device, non_blocking=True)
    target = net_CR_temporal.target_cloud_mask(labels) if labels.dim() == 5 else labels
    return (target if "confidence" in weights else None), (labels if "date_confidence" in weights else None)


def train_step(run, batch):
    """One optimisation step. Returns (figures, skipped) as device tensors, read later by StepMeter: figures in
    run.meter's order (loss, PSNR, gradient norm, terms); skipped is 1 when the loss was not finite on some rank,
    and then every rank leaves its weights alone."""
    args = run.args
    if run.global_step < run.warmup_steps:
        for group in run.optimizer.param_groups:
            group["lr"] = get_lr(run.global_step, args.lr, run.warmup_steps)
    b = to_device(batch, run.device, run.channels_last)
    with run.ctx:
        prediction, aux = run.train_model(b["cloudy_data"], b["SAR_data"], return_aux=True)
    labels, date_labels = confidence_targets(batch, run.device, run.criterion.weights)
    cloud_mask = b["cloud_mask"] if b["cloud_mask"].dim() == 4 else net_CR_temporal.target_cloud_mask(b["cloud_mask"])
    total, terms = run.criterion(prediction, b["cloudfree_data"], net_CR_temporal.loss_reference(b["cloudy_data"], aux),
                                 cloud_mask=cloud_mask, confidence_target=labels, aux=aux,
                                 date_confidence_target=date_labels)
    skipped = (~torch.isfinite(total.detach())).float()
    if run.world_size > 1:  # all ranks skip together, so their weights stay identical
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    optimizer_step(run, skipped)
    with torch.no_grad():
        batch_psnr = metrics.psnr(prediction.detach().float().clamp(0, 1), b["cloudfree_data"]).mean()
    run.global_step += 1
    run.last_terms = terms
    return [total.detach(), batch_psnr, run.grad_norm.detach(), *terms.values()], skipped


def log_interval(run, interval, bar):
    """Rank 0, at each read: TensorBoard points (means over the interval's steps) and the bar's postfix."""
    means, w, step = interval["means"], run.writer, run.global_step
    if interval["taken"]:
        w.add_scalar("train/loss", means["loss"], step)
        for name in run.criterion.weights:
            w.add_scalar(f"train/loss_{name}", means[name], step)
        w.add_scalar("train/grad_norm", means["grad_norm"], step)
        w.add_scalar("train/psnr", means["psnr"], step)
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", psnr=f"{means['psnr']:.2f}")
    w.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], step)


def check_non_finite(run, interval):
    """Warn about skipped steps; abort after --max_bad_steps in a row (every rank sees the same all-reduced flags,
    so all of them stop here together)."""
    if interval["skipped"]:
        warnings.warn(f"non-finite loss at {interval['skipped']} of the last {interval['taken'] + interval['skipped']} "
                      f"steps (up to step {run.global_step}): those steps were skipped", stacklevel=2)
    if interval["worst_streak"] >= run.args.max_bad_steps:
        terms = {k: float(v) for k, v in run.last_terms.items()}
        raise FloatingPointError(f"{interval['worst_streak']} consecutive non-finite losses (last terms: {terms}); "
                                 f"lower --lr, try --amp bf16/off, or check the data for NaN")


def should_stop(run, reading):
    """A stop signal, or the time limit's last minutes. Host state only; under DDP the ranks agree at reads (an
    all-reduce), so they leave the epoch at the same step."""
    local = run.stop_signal is not None or seconds_left(run) < time_limit_reserve(run)
    if run.world_size == 1:
        return local
    if not reading:
        return False
    flag = torch.tensor([float(local)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_one_epoch(run, epoch):
    """One pass over the training set: {"loss", "psnr", "samples_per_s", "seconds"} (means over the steps taken).
    Host reads happen every --log_every steps; at the end the next epoch's first batches are requested, so the
    loader workers fetch them while validation runs."""
    args, meter = run.args, run.meter
    run.model.train()
    batches = run.next_batches if run.next_batches is not None else start_epoch_batches(run, epoch)
    run.next_batches, run.epoch_started, run.stop_requested = None, time.monotonic(), False
    bar = tqdm(batches, total=len(run.train_loader), desc=f"epoch {epoch + 1}/{args.max_epochs}", leave=False,
               dynamic_ncols=True) if run.show_bars else None
    t0, seen = time.time(), 0
    meter.start_epoch()
    for i, batch in enumerate(bar if bar is not None else batches, start=1):
        meter.add(*train_step(run, batch))
        seen += batch["cloudy_data"].shape[0] * run.world_size
        reading = i % args.log_every == 0 or i == len(run.train_loader)
        if reading:
            interval = meter.read()
            if run.is_main:
                log_interval(run, interval, bar)
            check_non_finite(run, interval)
        if should_stop(run, reading):
            run.stop_requested = True
            break
    if bar is not None:
        bar.close()
    if epoch + 1 < args.max_epochs and not run.stop_requested:
        run.next_batches = start_epoch_batches(run, epoch + 1)
    seconds = time.time() - t0
    return {"loss": meter.epoch_mean("loss"), "psnr": meter.epoch_mean("psnr"),
            "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


def start_epoch_batches(run, epoch):
    """The epoch's batch iterator; creating it sends the loader workers their first indices."""
    if isinstance(run.train_loader.sampler, DistributedSampler):
        run.train_loader.sampler.set_epoch(epoch)
    return iter(run.train_loader)


@torch.no_grad()
def validate(run):
    """Mean of per-image metrics over the whole validation set, summed across DDP ranks; predictions are scored
    with the same rule as test_CR.py (bands.finish_s2)."""
    run.model.eval()
    sums = torch.zeros(len(metrics.METRIC_NAMES) + 1, dtype=torch.float64, device=run.device)
    for batch in run.val_loader:
        b = to_device(batch, run.device)
        with run.ctx:
            prediction = run.model(b["cloudy_data"], b["SAR_data"])
        scores = metrics.compute_metrics(bands.finish_s2(prediction), b["cloudfree_data"])
        for i, name in enumerate(metrics.METRIC_NAMES):
            sums[i] += scores[name].double().sum()
        sums[-1] += b["cloudy_data"].shape[0]
    if run.world_size > 1:
        dist.all_reduce(sums)
    run.model.train()
    return {name: (sums[i] / sums[-1]).item() for i, name in enumerate(metrics.METRIC_NAMES)}


def is_validation_epoch(args, epoch):
    return (epoch + 1) % args.val_every == 0 or epoch + 1 == args.max_epochs


# ----------------------------------------------------------------------------- time limit

def seconds_left(run):
    """Seconds until --time_limit, counted from the start of set-up (inf without a limit)."""
    if run.args.time_limit is None:
        return math.inf
    return run.args.time_limit * 3600 - (time.monotonic() - run.started)


def time_limit_reserve(run):
    """Seconds kept free at the end of the limit to save a checkpoint and exit."""
    return 0.0 if run.args.time_limit is None else min(TIME_LIMIT_RESERVE_S, 0.05 * run.args.time_limit * 3600)


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def pace(run):
    """'41 s/epoch, 5 min 28 s left': the mean wall time of the last three epochs (training and validation) and
    what the remaining epochs will take at that pace, capped by --time_limit. Shown from the first epoch on, so a
    slow machine shows itself at once."""
    recent = run.epoch_seconds[-3:]
    per_epoch = sum(recent) / len(recent)
    left = min(per_epoch * (run.args.max_epochs - run.epochs_done), max(seconds_left(run), 0.0))
    return f"{per_epoch:.0f} s/epoch, {format_duration(left)} left"


def next_epoch_fits(seconds_left_now, epoch_seconds, reserve=0.0):
    """Whether another epoch, taken as TIME_LIMIT_MARGIN x the longest one so far, ends before the limit."""
    return not epoch_seconds or seconds_left_now - reserve >= TIME_LIMIT_MARGIN * max(epoch_seconds)


def out_of_time(run):
    """After an epoch: True when the next one would not fit in --time_limit (all DDP ranks take rank 0's view)."""
    if run.args.time_limit is None:
        return False
    stop = torch.tensor([0.0 if next_epoch_fits(seconds_left(run), run.epoch_seconds, time_limit_reserve(run))
                         else 1.0], device=run.device)
    if run.world_size > 1:
        dist.broadcast(stop, src=0)
    return bool(stop.item())


# ----------------------------------------------------------------------------- end of epoch

def checkpoint_state(run):
    return {"model": run.model.state_dict(), "model_name": run.model.model_name,
            "model_config": asdict(run.model.config), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler else None, "scaler": run.scaler.state_dict(),
            "epoch": run.epochs_done, "best_psnr": run.best_psnr, "early_stop_counter": run.early_stop_counter,
            "global_step": run.global_step, "args": vars(run.args),
            "loss_config": asdict(run.criterion.config),  # a resumed run keeps its losses
            "channels_last": run.channels_last,  # the layout trained in, which --channels_last auto chose
            "s2_product": run.args.s2_product}  # test_CR.py refuses the other product's files


def update_schedule(run, val):
    """Best PSNR, early-stopping counter and the post-warm-up LR schedule; True when validation improved."""
    improved = False
    warmed_up = run.global_step >= run.warmup_steps
    if val is not None:
        improved = val["PSNR"] > run.best_psnr
        run.best_psnr = val["PSNR"] if improved else run.best_psnr
        run.early_stop_counter = 0 if improved else run.early_stop_counter + 1
        if run.scheduler is not None and run.args.lr_scheduler == "plateau" and warmed_up:
            run.scheduler.step(val["PSNR"])
    if run.scheduler is not None and run.args.lr_scheduler != "plateau" and warmed_up:
        run.scheduler.step()
    return improved


def record_epoch(run, epoch, stats, val, improved):
    """Rank 0: TensorBoard scalars and quicklooks, history.csv, last.pth (and best.pth), one summary line."""
    w, step = run.writer, run.global_step
    w.add_scalar("train/samples_per_s", stats["samples_per_s"], step)
    w.add_scalar("train/epoch_loss", stats["loss"], step)
    row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": stats["loss"],
           "train_psnr": stats["psnr"], "samples_per_s": stats["samples_per_s"], "best_psnr": run.best_psnr,
           "seconds": stats["seconds"]}
    if val is not None:
        for name, value in val.items():
            w.add_scalar(f"val/{name}", value, step)
            row[f"val_{name}"] = value
        if run.quicklook_batch is not None:
            log_quicklooks(run)
    run.history.append(row)
    write_history(run.dir / "history.csv", run.history)
    runtime.save_checkpoint(checkpoint_state(run), run.dir / "last.pth")
    if improved:
        runtime.save_checkpoint(checkpoint_state(run), run.dir / "best.pth")
    w.flush()
    msg = f"epoch {epoch + 1}/{run.args.max_epochs}: loss {stats['loss']:.4f} | {stats['samples_per_s']:.1f} samples/s"
    if val is not None:
        msg += " | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" | best PSNR {run.best_psnr:.3f}"
    msg += f" | {pace(run)}"
    if run.show_bars:
        tqdm.write(msg)  # above the bars, not through them
    else:
        print(msg, flush=True)


def end_of_epoch(run, epoch, stats, val):
    """Schedule, logging and checkpoints after an epoch; True when training should stop (early stopping, or the
    next epoch would not fit in --time_limit)."""
    improved = update_schedule(run, val)
    run.epochs_done = epoch + 1  # counted before the checkpoint is written, so last.pth resumes after this epoch
    run.epoch_seconds.append(time.monotonic() - run.epoch_started)
    if run.is_main:
        record_epoch(run, epoch, stats, val, improved)
    elif val is not None:  # the other ranks say what they saw, so a multi-node run shows that they agree
        print(f"rank {run.rank} of {run.world_size}: epoch {epoch + 1} validation PSNR {val['PSNR']:.6f} "
              f"(all-reduced over the ranks)", flush=True)
    if run.args.early_stop_patience > 0 and run.early_stop_counter >= run.args.early_stop_patience:
        if run.is_main:
            print(f"early stop: no PSNR gain in {run.early_stop_counter} validations")
        return True
    if run.epochs_done < run.args.max_epochs and out_of_time(run):
        run.stop_reason = "time limit"
        return True
    return False


# ----------------------------------------------------------------------------- the dry run's timing

def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run):
    """(seconds of the DRY_RUN_WARMUP untimed steps, seconds per step of the DRY_RUN_TIMED after them), on batches
    from the training loader (its workers, reads and copies included), as train_one_epoch takes them."""
    def batches():
        while True:  # a list shorter than the steps: start it again
            yield from run.train_loader
    source, t0 = batches(), time.perf_counter()
    run.model.train()
    for i in range(DRY_RUN_WARMUP + DRY_RUN_TIMED):
        if i == DRY_RUN_WARMUP:
            _synchronize(run.device)
            warmup_s, t0 = time.perf_counter() - t0, time.perf_counter()
        train_step(run, next(source))
    _synchronize(run.device)
    return warmup_s, (time.perf_counter() - t0) / DRY_RUN_TIMED


@torch.no_grad()
def validation_seconds_per_sample(run, timed_batches=2):
    """Seconds per validation sample, as validate() spends them: the batches after the first (which starts the
    workers); the first itself when there is only one."""
    run.model.eval()
    seen, t0 = 0, time.perf_counter()
    for i, batch in enumerate(run.val_loader):
        if i == 1:
            _synchronize(run.device)
            seen, t0 = 0, time.perf_counter()
        b = to_device(batch, run.device)
        with run.ctx:
            prediction = run.model(b["cloudy_data"], b["SAR_data"])
        metrics.compute_metrics(bands.finish_s2(prediction), b["cloudfree_data"])
        seen += b["cloudy_data"].shape[0]
        if i == timed_batches:
            break
    _synchronize(run.device)
    run.model.train()
    return (time.perf_counter() - t0) / max(seen, 1)
