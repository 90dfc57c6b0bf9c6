"""Train GLF-CR CrossAttention v3 (or the DSen2-CR baseline) on SEN12MS-CR.

One GPU or CPU:       python train_CR_kaggle.py --data_list_filepath data.csv --input_data_folder ROOT ...
Several GPUs (DDP):   torchrun --nproc_per_node=2 train_CR_kaggle.py ...
No dataset at hand:   python train_CR_kaggle.py --demo

Everything a run writes lives in SAVE_MODEL_DIR/EXPERIMENT_NAME/: last.pth (every epoch), best.pth (best
validation PSNR), history.csv, args.json and tensorboard/. Run it again without --train_from_scratch and
it resumes from last.pth.
"""
import argparse
import csv
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import bands
import clouds
import datalist
import dataloader
import files
import losses
import metrics
import net_CR_CrossAttention
import rasters
import runtime
import scanning
import sizing

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
# The demo: 128 synthetic patches of 64 px, trained on 32 px crops (a quarter of the compute per sample) for at most
# DEMO_EPOCHS within DEMO_MINUTES, so it ends in about five minutes on any CPU; a fast one finishes its epochs sooner.
DEMO_SAMPLES, DEMO_SIZE, DEMO_SEED = 128, 64, 0
DEMO_CROP, DEMO_EPOCHS, DEMO_MINUTES, DEMO_LR = 32, 24, 4.5, 1e-3

HISTORY_FIELDS = (["epoch", "lr", "train_loss", "train_psnr", "samples_per_s"]
                  + [f"val_{name}" for name in metrics.METRIC_NAMES] + ["best_psnr", "seconds"])
BATCH_KEYS = ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask")  # the tensors a step moves to the device
# Host reads of the step's figures (loss, terms, PSNR, gradient norm, the non-finite flag) happen every LOG_EVERY
# steps: a read waits for the GPU to drain its queue; reading all of them every step cost 6-8 % on an H100.
LOG_EVERY = 10
# --compile auto: on for CUDA, where the compiled step and loop measured faster; off on CPU, where they measured
# slower after minutes of compiling (BENCHMARKS.md, "GPU" and "Model training step").
COMPILE_AUTO = {"cuda": True, "cpu": False}
# Triton, which writes torch.compile's GPU kernels, refuses GPUs below CUDA capability 7.0 (Kaggle's P100 is 6.0):
# there auto stays eager rather than fail at the first step.
TRITON_MIN_CAPABILITY = (7, 0)
# --time_limit: stop after an epoch when elapsed + MARGIN x the longest epoch so far would pass the limit; within an
# epoch, stop (like SIGTERM: a resumable last.pth) when less than RESERVE of the limit is left.
TIME_LIMIT_MARGIN = 1.25
TIME_LIMIT_RESERVE_S = 60.0
DESIGN_BATCH = 6  # the design's --batch_sz, and what --batch_sz auto takes where memory is not the limit (CPU)
# --dry_run times this many training steps after this many untimed ones (workers starting, kernels chosen, compiling)
DRY_RUN_WARMUP, DRY_RUN_TIMED = 2, 3


# ----------------------------------------------------------------------------- the run, top down

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    run = setup(args, argv)
    if args.dry_run:
        return dry_run(run)

    def on_signal(signum, _frame):  # Ctrl-C or Kaggle's SIGTERM: finish the step, save, exit 130
        run.stop_signal = signum
        for s, h in old_handlers.items():  # a second signal (timeout, a scheduler) does what it did before: ends us
            signal.signal(s, h)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    epoch_bar = tqdm(total=args.max_epochs, initial=run.start_epoch, desc="epochs", dynamic_ncols=True,
                     disable=not run.show_bars)
    try:
        for epoch in range(run.start_epoch, args.max_epochs):
            stats = train_one_epoch(run, epoch)
            if run.stop_requested:
                break
            val = validate(run) if is_validation_epoch(args, epoch) else None
            stop = end_of_epoch(run, epoch, stats, val)
            epoch_bar.update(1)
            epoch_bar.set_postfix_str(f"best PSNR {run.best_psnr:.2f} | {pace(run)}")
            if stop:
                break
        epoch_bar.close()
        return finish(run)
    except BaseException:
        if run.is_main and run.global_step == run.first_step:  # failed before its first step: leave no folder
            if run.writer is not None:
                run.writer.close()
                run.writer = None
            discard_run_dir(run)
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if run.writer is not None:
            run.writer.close()
        if run.world_size > 1:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- set-up

def distributed_backend(device_arg):
    """The torch.distributed backend for this machine: NCCL when the processes train on GPUs, else gloo."""
    return "nccl" if torch.cuda.is_available() and device_arg != "cpu" else "gloo"


def setup_distributed(device_arg):
    """torchrun sets LOCAL_RANK/RANK/WORLD_SIZE; without them this is a plain single-process run."""
    if "LOCAL_RANK" not in os.environ:
        return runtime.resolve_device(device_arg), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = distributed_backend(device_arg)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    if backend == "gloo":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device, dist.get_rank(), dist.get_world_size()


def resolve_compile(choice, device):
    """Whether to torch.compile the model: 'on', 'off', or 'auto' (COMPILE_AUTO by device type, on CUDA only for GPUs
    Triton compiles for; off elsewhere)."""
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < TRITON_MIN_CAPABILITY:
        return False
    return COMPILE_AUTO.get(device.type, False)


def batch_size_arg(text):
    """--batch_sz: a positive number, or 'auto' (resolve_batch)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None


def resolve_batch(run, n_train):
    """(batch per process, text for the header). --batch_sz auto on a GPU: the largest batch whose counted training
    and validation peaks (sizing.footprint) fit this process's GPU with sizing.BATCH_MARGIN left; under DDP each rank
    counts its own GPU and all take the smallest, since every rank must take the same number of steps."""
    args, device = run.args, run.device
    if args.batch_sz != "auto":
        return args.batch_sz, f"batch {args.batch_sz} ({'the demo' if args.demo else '--batch_sz'})"
    if device.type != "cuda":
        return DESIGN_BATCH, f"batch {DESIGN_BATCH} (auto: the design's batch on {device.type}, where memory is " \
                             f"not the limit)"
    model, val_size = run.model, args.val_crop_size or args.load_size
    run.footprint = need = sizing.footprint(model.model_name, asdict(model.config), args, args.crop_size, val_size,
                                            run.amp_dtype)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)  # what this process holds is counted
    batch = sizing.largest_batch(need, free, val_batch=args.val_batch_sz, limit=max(1, n_train // run.world_size))
    if batch is None:
        raise runtime.UsageError(f"--batch_sz auto: not even one sample fits {free / 2**30:.1f} GiB free on "
                                 f"{torch.cuda.get_device_name(device)} (a step needs {need.bytes_for(1) / 2**30:.1f} "
                                 f"GiB); lower --crop_size or --val_crop_size, or use --amp fp16/bf16")
    if run.world_size > 1:
        smallest = torch.tensor([batch], device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        batch = int(smallest.item())
    return batch, (f"batch {batch} (auto: {free / 2**30:.1f} GiB free on {torch.cuda.get_device_name(device)}, "
                   f"{need.train_fixed / 2**30:.1f} GiB fixed + {need.train_per_sample / 2**30:.2f} GiB per sample at "
                   f"{args.crop_size} px {need.precision}, {sizing.BATCH_MARGIN * 100:.0f} % margin"
                   + (f", the smallest over {run.world_size} ranks)" if run.world_size > 1 else ")"))


def step_seconds(model, ctx, size, channels_last, repeats=2):
    """Fastest of `repeats` forward + backward passes of one random sample of `size` px in the given layout (after
    one untimed pass, which builds oneDNN's kernels)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    cloudy, sar = (torch.rand(1, c, size, size).contiguous(memory_format=layout) for c in (13, 2))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with ctx:
            prediction = model(cloudy, sar)
        prediction.float().mean().backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.to(memory_format=torch.contiguous_format)
    return min(times[1:])


def resolve_channels_last(args, model, ctx, device, world_size, resumed=None):
    """(use channels-last, text for the header line). auto on CPU times one step in each layout at the training
    crop size and keeps the faster: which wins depends on the CPU, the precision and the input size, in both
    directions (BENCHMARKS.md, "Model training step"). Off on CUDA, where it measured slower. Under DDP every
    rank takes rank 0's measurement. resumed: the layout the checkpoint being resumed trained in (None: none
    recorded), which auto keeps: under bf16 the layout changes the arithmetic, and where the two layouts time alike
    a fresh probe could pick either, so a resumed run would no longer continue the one it resumes."""
    if args.channels_last != "auto":
        return args.channels_last == "on", f"channels-last {args.channels_last} (--channels_last)"
    if device.type != "cpu":
        return False, "channels-last off (auto on a GPU)"
    if resumed is not None:
        return bool(resumed), f"channels-last {'on' if resumed else 'off'} (auto: the layout of the run resumed)"
    with torch.random.fork_rng(devices=[]):  # the probe's random inputs leave the run's random stream alone
        first, last = (step_seconds(model, ctx, args.crop_size, cl) for cl in (False, True))
    choice = torch.tensor([float(last < first)])
    if world_size > 1:
        dist.broadcast(choice, src=0)
    on = bool(choice.item())
    return on, f"channels-last {'on' if on else 'off'} (a step took {last:.2f} s channels-last, {first:.2f} s not)"


def prepare_demo(args):
    """Point the run at the cached synthetic dataset (built on first use) and shrink it to a few minutes."""
    csv_path = DEMO_DIR / f"n{DEMO_SAMPLES}_s{DEMO_SIZE}_seed{DEMO_SEED}" / "data.csv"
    if not csv_path.is_file():
        print(f"[demo] building the synthetic SEN12MS-CR dataset once in {csv_path.parent} ...")
        dataloader.make_synthetic_dataset(csv_path.parent, n=DEMO_SAMPLES, size=DEMO_SIZE, seed=DEMO_SEED)
    args.data_list_filepath, args.input_data_folder = str(csv_path), str(csv_path.parent)
    args.load_size, args.crop_size, args.val_crop_size = DEMO_SIZE, DEMO_CROP, DEMO_SIZE
    args.max_epochs, args.batch_sz, args.warmup_epochs = min(args.max_epochs, DEMO_EPOCHS), 4, 1
    args.lr, args.num_workers = DEMO_LR, min(args.num_workers, 1)
    args.time_limit = args.time_limit or DEMO_MINUTES / 60
    args.experiment_name = "demo" if args.experiment_name == "glf_cr_enhanced_v3" else args.experiment_name
    # The design's full loss set; the VGG terms only where their weights can be had.
    preset = "design"
    if args.vgg_weights == "imagenet":
        try:
            losses.VGGFeatures("imagenet")
        except losses.VGGWeightsError as e:
            print(f"[demo] perceptual and contrastive terms left out: {str(e).splitlines()[0]}")
            preset = "design_no_vgg"
    vars(args).update(losses.LOSS_PRESETS[preset])
    args.notes = args.notes or "demo run on synthetic data"


def stored_loss_config(ckpt):
    """The losses a checkpoint's run trained with: its "loss_config", or for a checkpoint written before that was
    stored, the loss flags of its args read as they meant then (a --use_X switch off turned its term off, whatever
    its weight); None when it holds neither."""
    if "loss_config" in ckpt:
        return losses.LossConfig.from_stored(ckpt["loss_config"])
    flags = {name: value for name, value in ckpt.get("args", {}).items() if name in losses.GIVEN_NAMES}
    return losses.resolve(flags, ckpt.get("model_config")) if flags else None


def resolve_losses(args, model, ckpt=None, is_main=True):
    """The run's losses: a resumed run's own (stored in its checkpoint), else every term's default for this model
    (the terms that need a model part on where the model has it); the loss flags given change either. Checked
    against the model, and written into args (args.json and the checkpoint's args show the weights used)."""
    stored = None if ckpt is None else stored_loss_config(ckpt)
    config = losses.resolve(losses.given_flags(args), model.config, stored)
    try:
        losses.check_model(config, model.config, model.model_name)
    except ValueError as e:
        raise runtime.UsageError(str(e)) from None
    if is_main and stored is not None and config != stored:
        print(f"losses changed by flags: {stored.enabled} in the checkpoint, {config.enabled} now")
    vars(args).update(config.flat())
    return config


def check_inputs(args):
    """Fail before the first step, with the file named, on anything that would fail later."""
    if not args.data_list_filepath or not args.input_data_folder:
        raise runtime.UsageError("pass --data_list_filepath and --input_data_folder (or --demo for synthetic data)")
    for flag in ("log_every", "batch_sz", "max_epochs"):
        if getattr(args, flag) != "auto" and getattr(args, flag) < 1:
            raise runtime.UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise runtime.UsageError(f"--time_limit is in hours and must be positive, got {args.time_limit}")
    rows = datalist.read_data_list(args.data_list_filepath)
    train_rows = datalist.select_split(rows, "train", source=args.data_list_filepath)
    val_rows = datalist.select_split(rows, "val", source=args.data_list_filepath)
    root = rasters.data_root(args.input_data_folder)
    if len(train_rows) + len(val_rows) <= scanning.AUTO_FOOTPRINT_LIMIT:  # headers: about 1 ms a file
        rasters.check_listed_files(train_rows + val_rows, root, f"the train and val splits of "
                                                                   f"{args.data_list_filepath}")
        return train_rows, val_rows
    for rows in (train_rows, val_rows):
        for t in rows:
            for rel in (t.s1, t.s2_cloudfree, t.s2_cloudy):
                if not (root / rel).is_file():
                    raise files.DataError(f"{root / rel}: file listed in {args.data_list_filepath} not found")
    return train_rows, val_rows


def check_data(args, is_main):
    """check_inputs, then (rank 0) the leak check's warnings: a place in train and in val or test inflates their
    scores, and pairs whose files could not all be read are named as not checked."""
    train_rows, val_rows = check_inputs(args)
    leak = is_main and scanning.leak_warning(
        scanning.startup_leak_check(args.data_list_filepath, args.input_data_folder), ((1, 2), (1, 3)),
        args.input_data_folder)
    if leak:
        print(leak, file=sys.stderr)
    return train_rows, val_rows


def prepare_run_dir(run):
    """Rank 0, once nothing but the first step can fail: create the run folder (moving an earlier run aside with
    --train_from_scratch). run.made_dir / run.moved_aside let discard_run_dir undo this if the run never starts."""
    run_dir = run.dir
    if run.args.train_from_scratch and run_dir.exists() and any(run_dir.iterdir()):
        run.moved_aside = run_dir.with_name(f"{run_dir.name}.{datetime.now():%Y%m%d-%H%M%S}")
        os.replace(run_dir, run.moved_aside)
        print(f"--train_from_scratch: the earlier run in {run_dir} was moved to {run.moved_aside}")
    if not run_dir.exists():  # the outermost folder this run creates (--save_model_dir too, if it is new)
        run.made_dir = run_dir
        while not run.made_dir.parent.exists():
            run.made_dir = run.made_dir.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        discard_run_dir(run)
        raise runtime.UsageError(f"cannot write to --save_model_dir {run_dir}: {e}") from None


def discard_run_dir(run):
    """Undo prepare_run_dir for a run that failed before its first step: no empty run folder is left to be moved
    aside by the next attempt, and the run moved aside is put back."""
    if run.made_dir is not None:
        shutil.rmtree(run.made_dir, ignore_errors=True)
    if run.moved_aside is not None and not run.dir.exists():
        os.replace(run.moved_aside, run.dir)
    run.made_dir, run.moved_aside = None, None


def build_model(args, ckpt, resume_path, is_main):
    """The network to train: rebuilt from the checkpoint when resuming, else from the model flags."""
    if ckpt is not None:
        model = runtime.build_model_from_checkpoint(ckpt, resume_path)
        if is_main:
            print(f"resuming from {resume_path} (epoch {ckpt['epoch']} done, best PSNR {ckpt['best_psnr']:.3f})")
    else:
        names = [f.name for f in net_CR_CrossAttention.flag_fields()] if args.model_name == "CrossAttention" else [
            "sar_input"]  # DSen2-CR has one switch of its own
        config = {name: getattr(args, name) for name in names}
        model = net_CR_CrossAttention.create_model(args.model_name, **config)
    return model


def build_loaders(args, train_rows, val_rows, device, rank, world_size):
    """(train_loader, val_loader, val_set). S2 travels as uint16 (half the bytes; to_device normalises it on the
    device) from pinned memory on CUDA. Validation: every rank scores its own disjoint share and the sums are
    all-reduced, so no sample is padded in twice."""
    train_set = dataloader.SEN12MSCRDataset(train_rows, args.input_data_folder, crop_size=args.crop_size,
                                            load_size=args.load_size, augment=args.augment,
                                            cloud_detector=args.cloud_detector, cloud_mask_dir=args.cloud_mask_dir,
                                            s2_encoding="uint16")
    val_set = dataloader.SEN12MSCRDataset(val_rows, args.input_data_folder,
                                          crop_size=args.val_crop_size or args.load_size, load_size=args.load_size,
                                          augment=False, cloud_detector="none", s2_encoding="uint16",
                                          crop_flag="--val_crop_size" if args.val_crop_size else "--load_size")
    val_share = Subset(val_set, list(range(rank, len(val_set), world_size)))
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True) if world_size > 1 else None
    loader_kw = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=args.batch_sz, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_set) >= args.batch_sz * world_size, **loader_kw)
    val_loader = DataLoader(val_share, batch_size=args.val_batch_sz or args.batch_sz, shuffle=False, **loader_kw)
    if len(train_loader) == 0:
        raise files.DataError(f"{args.data_list_filepath}: too few training samples for one batch per process")
    return train_loader, val_loader, val_set


def build_optimizer(args, model, device):
    """AdamW (fused on CPU and CUDA: one kernel for all parameters, and it skips a step on the device when told the
    loss was not finite) and the schedule that follows the warm-up (None for --lr_scheduler none)."""
    fused = device.type in ("cuda", "cpu")  # measured on CPU: 8 ms a step against 22 ms for foreach (6M parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)
    if args.lr_scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_factor,
                                                               patience=args.lr_patience)
    elif args.lr_scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, args.max_epochs - math.ceil(args.warmup_epochs)))
    elif args.lr_scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_factor)
    else:
        scheduler = None
    return optimizer, scheduler


def restore(run, ckpt):
    """Optimizer, schedule, scaler and counters from a checkpoint, so a resumed run carries on exactly."""
    fused = [group.get("fused") for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(ckpt["optimizer"])
    for group, was in zip(run.optimizer.param_groups, fused):  # this machine's choice, not the checkpoint's
        group["fused"] = was
    if run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epochs_done, run.best_psnr = ckpt["epoch"], ckpt["best_psnr"]
    run.early_stop_counter, run.global_step = ckpt.get("early_stop_counter", 0), ckpt.get("global_step", 0)


@dataclass
class Run:
    """One training run, every field declared here. setup() fills the first two blocks once; the loop's functions
    update the progress fields."""
    args: argparse.Namespace
    argv: list
    device: torch.device
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.monotonic)  # for --time_limit, counted from set-up
    # built by setup()
    dir: Path | None = None
    amp_dtype: torch.dtype | None = None
    amp_text: str = ""           # the header's precision and why
    batch_text: str = ""         # the header's batch and why (--batch_sz auto says what it counted)
    footprint: object = None     # sizing.Footprint of this run, where --batch_sz auto counted it
    layout_text: str = ""        # the header's memory layout and why
    channels_last: bool = False
    ctx: object = None           # the one autocast context: training, validation, quicklooks
    criterion: object = None
    model: object = None
    train_model: object = None   # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: object = None
    clip_groups: list = field(default_factory=list)  # parameter lists --grad_clip clips each on its own
    scheduler: object = None
    scaler: object = None
    train_loader: object = None
    val_loader: object = None
    meter: object = None
    compiled: bool = False
    show_bars: bool = False
    warmup_steps: int = 0
    start_epoch: int = 0         # epochs done when this process started (resumed runs start above 0)
    first_step: int = 0
    quicklook_batch: dict | None = None
    writer: object = None
    made_dir: Path | None = None     # folders this run created, removed again if it fails before its first step
    moved_aside: Path | None = None  # an old run moved aside by --train_from_scratch, put back on such a failure
    # progress
    epochs_done: int = 0
    global_step: int = 0
    best_psnr: float = -math.inf
    early_stop_counter: int = 0
    history: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    epoch_started: float = 0.0
    next_batches: object = None  # the next epoch's iterator, asked for before validation so workers prefetch
    grad_norm: object = None     # the last step's gradient norm (a device tensor)
    last_terms: dict = field(default_factory=dict)  # the last step's loss terms (device tensors)
    stop_signal: int | None = None
    stop_requested: bool = False  # a signal or the time limit's reserve ended an epoch part-way
    stop_reason: str | None = None

    @property
    def is_main(self):
        return self.rank == 0


def setup(args, argv=()):
    """Everything a run needs, in the order that fails early: device, data list, model, losses (their defaults
    depend on the model, a resumed run's on its checkpoint), data, optimiser,
    then (only then) the run folder and logging."""
    device, rank, world_size = setup_distributed(args.device)
    run = Run(args=args, argv=list(argv), device=device, rank=rank, world_size=world_size)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if args.demo:
        if run.is_main:
            prepare_demo(args)
        if world_size > 1:  # rank 0 built the data; everyone takes the same settings
            holder = [vars(args)]
            dist.broadcast_object_list(holder, src=0)
            vars(args).update(holder[0])
    run.dir = Path(args.save_model_dir) / args.experiment_name
    resume_path = args.resume or (None if args.train_from_scratch else
                                  (run.dir / "last.pth" if (run.dir / "last.pth").is_file() else None))
    # the data list and its files, and the checkpoint to resume: both reported when both are wrong
    (train_rows, val_rows), ckpt = runtime.check_together(
        lambda: check_data(args, run.is_main),
        lambda: runtime.load_checkpoint(resume_path, map_location="cpu") if resume_path else None)
    run.amp_dtype, use_scaler = runtime.resolve_amp(args.amp, device)
    run.amp_text, amp_warning = runtime.describe_amp(args.amp, device)
    if amp_warning and rank == 0:
        print(amp_warning, file=sys.stderr)
    run.ctx = runtime.autocast(device, run.amp_dtype)  # the one autocast context: training, validation, quicklooks
    run.model = build_model(args, ckpt, resume_path, run.is_main).to(device)
    run.criterion = losses.CRLoss(resolve_losses(args, run.model, ckpt, run.is_main), vgg_dtype=run.amp_dtype,
                                  vgg_weights=args.vgg_weights).to(device)  # fails here without VGG weights
    run.channels_last, run.layout_text = resolve_channels_last(args, run.model, run.ctx, device, world_size,
                                                               None if ckpt is None else ckpt.get("channels_last"))
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
        run.criterion.to(memory_format=torch.channels_last)  # its VGG, fed channels-last inputs
    args.batch_sz, run.batch_text = resolve_batch(run, len(train_rows))  # the number args.json and checkpoints keep
    run.train_loader, run.val_loader, val_set = build_loaders(args, train_rows, val_rows, device, rank, world_size)
    run.optimizer, run.scheduler = build_optimizer(args, run.model, device)
    run.clip_groups = clip_groups(run.model)
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if ckpt is not None:
        restore(run, ckpt)
    run.start_epoch, run.first_step = run.epochs_done, run.global_step
    run.warmup_steps = int(args.warmup_epochs * len(run.train_loader))
    run.compiled = resolve_compile(args.compile, device)
    run.train_model = torch.compile(run.model) if run.compiled else run.model
    if world_size > 1:
        run.train_model = DDP(run.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    run.meter = StepMeter(["loss", "psnr", "grad_norm"] + list(run.criterion.weights), device)
    run.show_bars = run.is_main and (sys.stderr.isatty() or "ipykernel" in sys.modules)  # a terminal or a notebook
    if run.is_main and not args.dry_run:  # a dry run writes nothing
        run.quicklook_batch = read_quicklooks(val_set, args.num_quicklooks)  # reads files: before the folder exists
        prepare_run_dir(run)
        setup_logging(run, ckpt is not None, val_set)
    if world_size > 1:
        dist.barrier()
    return run


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
    confidence = None if aux["confidence"] is None else aux["confidence"].float().cpu()
    grid = quicklook_grid(batch["cloudy_data"].cpu(), bands.finish_s2(prediction).cpu(),
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
    if channels_last:  # the model's convolutions want NHWC inputs when its weights are NHWC
        for key in ("cloudy_data", "SAR_data"):
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


def confidence_target(batch, device):
    """What the confidence map should be: the true cloud map where the data has one (synthetic sets), else the
    detector's binary mask (score >= threshold)."""
    if "cloud_truth" in batch:
        return rasters.truth_mask(batch["cloud_truth"]).float().to(device, non_blocking=True)
    return batch["cloud_binary"].to(device, non_blocking=True)


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
    labels = confidence_target(batch, run.device) if "confidence" in run.criterion.weights else None
    total, terms = run.criterion(prediction, b["cloudfree_data"], b["cloudy_data"], cloud_mask=b["cloud_mask"],
                                 confidence_target=labels, aux={key: aux.get(key) for key in run.criterion.reads})
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


# ----------------------------------------------------------------------------- end of epoch, end of run

def checkpoint_state(run):
    return {"model": run.model.state_dict(), "model_name": run.model.model_name,
            "model_config": asdict(run.model.config), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler else None, "scaler": run.scaler.state_dict(),
            "epoch": run.epochs_done, "best_psnr": run.best_psnr, "early_stop_counter": run.early_stop_counter,
            "global_step": run.global_step, "args": vars(run.args),
            "loss_config": asdict(run.criterion.config),  # a resumed run keeps its losses
            "channels_last": run.channels_last}  # the layout trained in, which --channels_last auto chose


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


def resume_command(run):
    """The command that continues this run from its last.pth: this one without --train_from_scratch / --resume."""
    argv, kept, skip_next = run.argv, [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a == "--resume":
            skip_next = True
        elif a != "--train_from_scratch" and not a.startswith("--resume="):
            kept.append(a)
    script = os.path.relpath(__file__)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", run.world_size))  # set by torchrun
    if run.world_size > per_node:  # several nodes: torchrun does not pass its rendezvous flags on to the processes
        launcher = ["torchrun", f"--nnodes={run.world_size // per_node}", f"--nproc_per_node={per_node}"]
        return shlex.join(launcher + [script] + kept) + "  # on every node, with this launch's --rdzv_* flags"
    launcher = ["torchrun", f"--nproc_per_node={run.world_size}"] if run.world_size > 1 else ["python"]
    return shlex.join(launcher + [script] + kept)


def evaluation_command(args, checkpoint):
    # the demo's command also draws quicklooks, so a first run ends with a picture to look at
    pictures = f" --results_dir results/{args.experiment_name} --save_png" if args.demo else ""
    return (f"python test_CR.py --checkpoint {checkpoint} --data_list_filepath {args.data_list_filepath} "
            f"--input_data_folder {args.input_data_folder} --split test{pictures}")


def finish(run):
    """Exit status: 130 after a stop signal, 0 otherwise; a stop (signal or time limit) leaves a resumable last.pth
    and prints the command that resumes; a completed run prints the command that evaluates it. The demo's time
    budget is part of the demo: it ends like a completed run."""
    args = run.args
    stopped = run.stop_requested or run.stop_reason == "time limit"
    if stopped and run.is_main and run.stop_requested:  # an interrupted epoch is not counted: resuming re-runs it
        runtime.save_checkpoint(checkpoint_state(run), run.dir / "last.pth")
    if stopped and not (args.demo and run.stop_signal is None):
        if run.is_main:
            why = f"signal {run.stop_signal}" if run.stop_signal is not None else f"--time_limit {args.time_limit} h"
            print(f"\nstopped by {why} after {run.epochs_done} of {args.max_epochs} epochs: resumable checkpoint "
                  f"saved to {run.dir / 'last.pth'}. Resume with:\n  {resume_command(run)}")
        return 130 if run.stop_signal is not None else 0
    if run.is_main:
        best = run.dir / "best.pth" if (run.dir / "best.pth").is_file() else run.dir / "last.pth"
        if stopped:
            print(f"\ndemo: its {args.time_limit * 60:g}-minute budget ended training after {run.epochs_done} of "
                  f"{args.max_epochs} epochs (the same command again trains further)")
        if run.start_epoch >= args.max_epochs:  # a finished experiment run again (a notebook cell re-run)
            print(f"already finished: {run.dir} holds {run.start_epoch} epochs (--max_epochs {args.max_epochs}); "
                  f"raise --max_epochs to continue, or pass --train_from_scratch to start again.\n"
                  f"best checkpoint: {best} (validation PSNR {run.best_psnr:.3f} dB). Evaluate with:")
        else:
            print(f"\ndone: best validation PSNR {run.best_psnr:.3f} dB. Evaluate with:")
        print(f"  {evaluation_command(args, best)}")
    return 0


# ----------------------------------------------------------------------------- --dry_run

def dry_run(run):
    """--dry_run: set-up as the run would do it (no run folder, checkpoint or TensorBoard), DRY_RUN_TIMED training
    steps and a few validation batches timed on the real loaders, then the plan, printed by rank 0. Returns 0."""
    try:
        setup_s = time.monotonic() - run.started
        warmup_s, step_s = time_steps(run)
        val_s = validation_seconds_per_sample(run)
        if run.is_main:
            print("dry run: nothing written; the plan for these flags")
            for name, value in dry_run_plan(run, setup_s + warmup_s - DRY_RUN_WARMUP * step_s, step_s, val_s):
                print(f"  {name}: {value}")
        return 0
    finally:
        if run.world_size > 1:
            dist.destroy_process_group()


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


def dry_run_plan(run, start_s, step_s, val_s):
    """[(field, text)] of the plan: the machine, the choices made, speed, memory, MFU, epoch time, time limit."""
    args, device = run.args, run.device
    samples_per_s = args.batch_sz / step_s  # per process
    flops = 3 * 2 * net_CR_CrossAttention.count_macs(run.model, args.crop_size)  # backward ~ 2 x forward
    train_s = len(run.train_loader) * step_s
    val_epoch_s = val_s * len(run.val_loader.dataset) / args.val_every
    n_params = sum(p.numel() for p in run.model.parameters())
    return [*dry_run_device(device), ("model", f"{run.model.model_name}, {n_params / 1e6:.2f}M parameters"),
            ("data", f"{len(run.train_loader.dataset)} training / {len(run.val_loader.dataset)} validation samples "
                     f"per process"),
            ("precision", run.amp_text), ("compile", f"{'on' if run.compiled else 'off'} (--compile {args.compile})"),
            ("layout", run.layout_text),
            ("batch", f"{run.batch_text} per process, {run.world_size} process{'es' if run.world_size > 1 else ''}"),
            ("speed", f"{samples_per_s * run.world_size:.2f} samples/s ({DRY_RUN_TIMED} steps of {step_s:.3f} s "
                      f"timed after {DRY_RUN_WARMUP}, on the training data at {args.crop_size} px)"),
            ("peak memory", dry_run_memory(run)),
            ("FLOPs", f"{flops / 1e9:.1f} GFLOP per sample for forward + backward (3 x the forward's "
                      f"{flops / 6e9:.1f} GMAC x 2, net_CR_CrossAttention.count_macs; the network only, VGG and "
                      f"the other loss terms not counted)"),
            ("MFU", dry_run_mfu(run, flops * samples_per_s)),
            ("epoch", f"{format_duration(train_s + val_epoch_s)}: {len(run.train_loader)} steps of "
                      f"{args.batch_sz * run.world_size} samples ({format_duration(train_s)}) + validation of "
                      f"{len(run.val_loader.dataset)} samples per process every {args.val_every} epoch(s) "
                      f"({format_duration(val_s * len(run.val_loader.dataset))})"),
            ("time limit", dry_run_epochs(run, start_s, train_s + val_epoch_s))]


def dry_run_device(device):
    """[(device, ...), (compute capability, ...)]: the card, or the CPU's model and torch's capability for it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return [("device", f"{device}: {torch.cuda.get_device_name(device)}"),
                ("compute capability", f"{major}.{minor}")]
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return [("device", f"cpu: {model or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}"),
            ("compute capability", f"CPU capability {torch.backends.cpu.get_cpu_capability()} (torch)")]


def dry_run_memory(run):
    """Measured peak (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory, VmHWM) and the
    fake-tensor count of a GPU step at this batch (sizing.footprint)."""
    args, model = run.args, run.model
    need = run.footprint or sizing.footprint(model.model_name, asdict(model.config), args, args.crop_size,
                                             args.val_crop_size or args.load_size, run.amp_dtype)
    at_batch = need.bytes_for(args.batch_sz, args.val_batch_sz)
    counted = (f"counted for a GPU (sizing.py, eager, {need.precision}): {at_batch / 2**20:,.0f} MiB = "
               f"{need.train_fixed / 2**20:,.0f} fixed + "
               f"{need.train_per_sample / 2**20:,.1f} per sample at {args.crop_size} px")
    if run.device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(run.device) / 2**20
        return f"{measured:,.0f} MiB measured (torch.cuda.max_memory_allocated); {counted}"
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), float("nan"))
    return f"{hwm:,.0f} MiB peak resident memory of this process (CPU, measured); {counted}"


def dry_run_mfu(run, flops_per_s):
    """Model FLOP utilisation against the card's dense peak at the run's precision (sizing.GPU_PEAK_TFLOPS)."""
    if run.device.type != "cuda":
        return "no peak table for CPUs"
    precision = sizing.precision_name(run.amp_dtype)
    peak, source = sizing.peak_tflops(torch.cuda.get_device_name(run.device), precision)
    if peak is None:
        return f"no peak figure ({source})"
    return f"{flops_per_s / (peak * 1e12):.1%} of {peak:g} TFLOP/s dense {precision} ({source})"


def dry_run_epochs(run, start_s, epoch_s):
    """How many of the epochs left fit --time_limit, by the loop's own rule (next_epoch_fits), after the set-up and
    the first steps' extra time (compiling, the workers' start) that a run spends once."""
    args, left = run.args, run.args.max_epochs - run.start_epoch
    if args.time_limit is None:
        return f"no --time_limit; the {left} epochs left take about {format_duration(left * epoch_s)}"
    seconds, epochs = args.time_limit * 3600 - start_s, []
    while len(epochs) < left and next_epoch_fits(seconds, epochs, time_limit_reserve(run)):
        epochs.append(epoch_s)
        seconds -= epoch_s
    return f"{len(epochs)} of the {left} epochs left fit --time_limit {args.time_limit:g} h"


# ----------------------------------------------------------------------------- command-line flags

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dataloader.HelpFormatter)
    for add_flags in (_model_flags, _optimisation_flags, _loss_flags, _data_flags, _run_flags):
        add_flags(p)
    return p


def _model_flags(p):
    g = p.add_argument_group("model (net_CR_CrossAttention.ModelConfig)")
    g.add_argument("--model_name", default="CrossAttention", choices=["CrossAttention", "DSen2CR"],
                   help="network to train: the GLF-CR CrossAttention v3 design, or the DSen2-CR baseline")
    for f in net_CR_CrossAttention.flag_fields():  # one flag per switch of the model's config, help and default there
        if f.type in (bool, "bool"):
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            g.add_argument(f"--{f.name}", default=f.default, choices=list(f.metadata["choices"]),
                           help=f.metadata["help"])


def _optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_epochs", type=int, default=30, help="number of epochs to train")
    g.add_argument("--batch_sz", type=batch_size_arg, default=DESIGN_BATCH,
                   help="training batch size per process, or 'auto': on a GPU the largest batch whose training step "
                        f"and validation fit the card's free memory with a margin of {sizing.BATCH_MARGIN * 100:.0f} "
                        f"%% (counted without running it: sizing.py; under DDP the smallest over the ranks), on CPU "
                        f"the design's {DESIGN_BATCH}")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW")
    g.add_argument("--weight_decay", type=float, default=1e-5, help="AdamW weight decay")
    g.add_argument("--lr_scheduler", default="plateau", choices=["plateau", "cosine", "step", "none"],
                   help="schedule after warmup: plateau (on validation PSNR), cosine, step or none")
    g.add_argument("--lr_patience", type=int, default=5,
                   help="plateau: validations without PSNR gain before the LR is reduced")
    g.add_argument("--lr_factor", type=float, default=0.5, help="plateau/step: factor the LR is multiplied by")
    g.add_argument("--lr_step_size", type=int, default=10, help="step: epochs between LR reductions")
    g.add_argument("--warmup_epochs", type=float, default=2,
                   help="linear LR warmup from 0 over this many epochs, updated every iteration")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--early_stop_patience", type=int, default=10,
                   help="stop after this many validations without a new best PSNR (0 = never)")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="abort after this many consecutive steps with a non-finite loss (checked at each log read)")
    g.add_argument("--amp", default="auto", choices=list(runtime.AMP_CHOICES),
                   help="mixed precision: auto = on CUDA bf16 where the card has bf16 units (compute capability "
                        ">= 8.0: A100, A10, L4, H100), else fp16 with a GradScaler (T4, V100, P100), never emulated "
                        "bf16; on CPU bf16 where the CPU has native bf16 (AVX512-BF16 or AMX), else off (float32), "
                        "since emulated bf16 is several times slower than fp32. fp16 also runs on CPU, to test the "
                        "T4's path: its convolutions take ATen's slow reference kernels there, about 13x the CPU "
                        "time of fp32 per step")
    g.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format: auto = on CPU, time one step in each layout at start-up and "
                        "keep the faster (the winner depends on the CPU, the precision and the crop size); off on "
                        "CUDA, where it measured slower")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model: auto = on for CUDA GPUs of compute capability 7.0 or more "
                        "(Triton's floor; not a P100), where it measured faster, off on CPU, where it measured "
                        "slower (BENCHMARKS.md). A bare --compile means on")
    g.add_argument("--seed", type=int, default=0, help="random seed (each DDP rank adds its rank)")


def _loss_flags(p):
    """One --<term>_weight per term of losses.LOSS_TERMS (a term is on when its weight is > 0), the design document's
    --use_X switches as aliases, and the terms' options. Not given, a flag is absent from the namespace (SUPPRESS):
    a resumed run keeps its checkpoint's value, a new one the term's default for its model (losses.resolve)."""
    g = p.add_argument_group("losses (losses.LOSS_TERMS; docs/losses.md)",
                             "A term is on when its weight is > 0. A resumed run keeps its checkpoint's losses; the "
                             "flags given change the terms they name.")
    for term in losses.LOSS_TERMS:
        g.add_argument(f"--{term.name}_weight", type=float, default=argparse.SUPPRESS,
                       help=f"weight of the {term.name} term, {term.help} (0 = off); default {term.default_text}")
        if term.alias:
            g.add_argument(f"--{term.alias}", action="store_true", default=argparse.SUPPRESS,
                           help=f"the design document's switch, off by default: turn the {term.name} term on, at "
                                f"--{term.name}_weight if given (which alone turns it on too)")
        for name, option in term.options.items():
            g.add_argument(f"--{name}", type=type(option.default), default=argparse.SUPPRESS,
                           choices=option.choices, help=f"{option.help}; default {option.default}")
    g.add_argument("--vgg_weights", default=losses.VGG_WEIGHTS_DEFAULT,
                   help="VGG weights for perceptual/contrastive terms: 'imagenet' (torchvision, torch cache), "
                        "a local .pth path, or 'random' (offline smoke tests only)")


def _data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data_list_filepath", default=None,
                   help="CSV list of triplets (GLF-CR 5-column or Kaggle 7-column format)")
    g.add_argument("--input_data_folder", default=None, help="root the CSV's folders are relative to")
    g.add_argument("--load_size", type=int, default=256, help="size of the image region crops are taken from")
    g.add_argument("--crop_size", type=int, default=128, help="training crop size (random crop + flips)")
    g.add_argument("--val_crop_size", type=int, default=None,
                   help="validation centre-crop size (None: --load_size, the whole patch)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and 90-degree rotations of training crops")
    g.add_argument("--cloud_detector", default="rule", choices=list(clouds.CLOUD_DETECTORS),
                   help="cloud score behind the cloud-focused and confidence losses (soft for rule and "
                        "s2cloudless_prob; s2cloudless: the literature's binary mask, best precomputed)")
    g.add_argument("--cloud_mask_dir", default=None,
                   help="read the cloud masks precomputed by `python dataloader.py masks` from this folder instead "
                        "of running --cloud_detector on every sample")
    g.add_argument("--num_workers", type=int, default=2, help="data loading worker processes per training process")
    g.add_argument("--val_batch_sz", type=int, default=None, help="validation batch size (None: --batch_sz)")


def _run_flags(p):
    g = p.add_argument_group("run")
    g.add_argument("--save_model_dir", default="./checkpoints", help="folder holding one subfolder per experiment")
    g.add_argument("--experiment_name", default="glf_cr_enhanced_v3", help="name of this run's subfolder")
    g.add_argument("--train_from_scratch", action="store_true",
                   help="start fresh even if the experiment has a last.pth (the old run is moved aside, not deleted)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file (None: the experiment's last.pth)")
    g.add_argument("--notes", default="", help="free text stored in args.json and TensorBoard")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    g.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and at the last)")
    g.add_argument("--num_quicklooks", type=int, default=4,
                   help="fixed validation samples shown in TensorBoard (cloudy | prediction | target | confidence)")
    g.add_argument("--log_every", type=int, default=LOG_EVERY,
                   help="read the loss, its terms, PSNR and gradient norm from the device every N steps (TensorBoard "
                        "points are means over them); each read waits for the GPU")
    g.add_argument("--time_limit", type=float, default=None,
                   help="hours this command may run (e.g. 11.5 in a 12-hour Kaggle session): stop after the last "
                        "epoch that fits, with a resumable last.pth and the command that resumes (None: no limit)")
    g.add_argument("--dry_run", action="store_true",
                   help=f"build everything these flags ask for, time {DRY_RUN_TIMED} training steps (after "
                        f"{DRY_RUN_WARMUP} untimed) on the training data, print the plan (device, precision, batch, "
                        f"samples/s, peak memory, MFU, epoch time, epochs that fit --time_limit) and exit; writes no "
                        f"run folder, checkpoint or TensorBoard file (--demo still builds its cached data set)")
    g.add_argument("--demo", action="store_true",
                   help=f"train a short run on built-in synthetic data (no dataset needed): at most {DEMO_EPOCHS} "
                        f"epochs within {DEMO_MINUTES:g} minutes (--time_limit overrides the budget)")


if __name__ == "__main__":
    sys.exit(runtime.run_cli(main, user_errors=(losses.VGGWeightsError,)))
