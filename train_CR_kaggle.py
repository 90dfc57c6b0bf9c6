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
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import dataloader
import losses
import metrics
import net_CR_CrossAttention

# bf16 autocast on CPU: measured in BENCHMARKS.md ("Model training step": 2.0-2.7x fp32's speed; "Learning and
# ablations": the same PSNR), which decides what --amp auto means on a machine without a GPU.
CPU_AUTO_AMP = "bf16"

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_SAMPLES, DEMO_SIZE, DEMO_SEED, DEMO_EPOCHS = 128, 64, 0, 24  # ~2 min on 2 quiet CPU cores (measured 1 min 53 s)

METRIC_NAMES = ("PSNR", "SSIM", "SAM", "MAE", "RMSE")  # the keys of metrics.compute_metrics
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_psnr", "samples_per_s", "val_PSNR", "val_SSIM",
                  "val_SAM", "val_MAE", "val_RMSE", "best_psnr", "seconds"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (unreadable, truncated, or not one of ours)."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default="CrossAttention", choices=["CrossAttention", "DSen2CR"],
                   help="network to train: the GLF-CR CrossAttention v3 design, or the DSen2-CR baseline")
    g.add_argument("--use_cross_attn", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse SAR into optical features with transformer cross-attention "
                        "(--no-use_cross_attn: concatenation + convolution)")
    g.add_argument("--use_spectral_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="channel attention over VV/VH at the SAR encoder input")
    g.add_argument("--use_cloud_predictor", action=argparse.BooleanOptionalAction, default=True,
                   help="weight the residual by a predicted cloud confidence map "
                        "(--no-use_cloud_predictor: output = cloudy + residual)")
    g.add_argument("--attention", default="fused", choices=["fused", "reference"],
                   help="attention kernel: fused scaled_dot_product_attention, or the explicit reference")
    g.add_argument("--sar_input", default="on", choices=["on", "zeros"],
                   help="'zeros' feeds an all-zero SAR image (ablation: does the model use the radar?)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_epochs", type=int, default=30, help="number of epochs to train")
    g.add_argument("--batch_sz", type=int, default=6, help="training batch size per process")
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
                   help="abort after this many consecutive steps with a non-finite loss")
    g.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"],
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16 with GradScaler; "
                        f"on CPU auto = {CPU_AUTO_AMP} (see BENCHMARKS.md)")
    g.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format: auto = on for CPU (measured ~1.5x faster with bf16, "
                        "BENCHMARKS.md), off on CUDA (not yet measured there)")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--seed", type=int, default=0, help="random seed (each DDP rank adds its rank)")

    g = p.add_argument_group("losses (see losses.py)")
    g.add_argument("--l1_weight", type=float, default=1.0, help="weight of the L1 (or cloud-focused L1) term")
    g.add_argument("--perceptual_weight", type=float, default=0.5,
                   help="weight of the VGG perceptual term on RGB (0 = off)")
    g.add_argument("--use_fft_loss", action="store_true", help="add the Fourier-domain L1 term")
    g.add_argument("--fft_weight", type=float, default=0.3, help="weight of the FFT term")
    g.add_argument("--use_gradient_loss", action="store_true", help="add the image-gradient L1 term")
    g.add_argument("--gradient_weight", type=float, default=0.2, help="weight of the gradient term")
    g.add_argument("--use_contrastive_loss", action="store_true",
                   help="add the AECR-Net contrastive term (VGG space: pull to target, push from cloudy)")
    g.add_argument("--contrastive_weight", type=float, default=0.1, help="weight of the contrastive term")
    g.add_argument("--use_cloud_focused_loss", action="store_true",
                   help="replace plain L1 by L1 weighted 1 + factor * cloud intensity")
    g.add_argument("--cloud_weight_factor", type=float, default=2.5,
                   help="extra weight of fully cloudy pixels in the cloud-focused loss")
    g.add_argument("--confidence_weight", type=float, default=0.0,
                   help="weight of the BCE between the confidence map and the cloud mask (0 = off)")
    g.add_argument("--vgg_weights", default="imagenet",
                   help="VGG weights for perceptual/contrastive terms: 'imagenet' (torchvision, torch cache), "
                        "a local .pth path, or 'random' (offline smoke tests only)")

    g = p.add_argument_group("data")
    g.add_argument("--data_list_filepath", default=None,
                   help="CSV list of triplets (GLF-CR 5-column or Kaggle 7-column format)")
    g.add_argument("--input_data_folder", default=None, help="root the CSV's folders are relative to")
    g.add_argument("--load_size", type=int, default=256, help="size of the image region crops are taken from")
    g.add_argument("--crop_size", type=int, default=128, help="training crop size (random crop + flips)")
    g.add_argument("--val_crop_size", type=int, default=None,
                   help="validation centre-crop size (default: --load_size, the whole patch)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and 90-degree rotations of training crops")
    g.add_argument("--cloud_detector", default="rule", choices=["rule", "s2cloudless", "none"],
                   help="soft cloud score behind the cloud-focused and confidence losses")
    g.add_argument("--num_workers", type=int, default=2, help="data loading worker processes per training process")
    g.add_argument("--val_batch_sz", type=int, default=None, help="validation batch size (default: --batch_sz)")

    g = p.add_argument_group("run")
    g.add_argument("--save_model_dir", default="./checkpoints", help="folder holding one subfolder per experiment")
    g.add_argument("--experiment_name", default="glf_cr_enhanced_v3", help="name of this run's subfolder")
    g.add_argument("--train_from_scratch", action="store_true",
                   help="start fresh even if the experiment has a last.pth (the old run is moved aside, not deleted)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file")
    g.add_argument("--notes", default="", help="free text stored in args.json and TensorBoard")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    g.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and at the last)")
    g.add_argument("--num_quicklooks", type=int, default=4,
                   help="fixed validation samples shown in TensorBoard (cloudy | prediction | target | confidence)")
    g.add_argument("--demo", action="store_true",
                   help="train a short run on built-in synthetic data (no dataset needed)")
    return p


# ----------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj, path):
    """Write to a temp file beside `path`, then rename: a kill at any moment leaves the old file intact."""
    with dataloader.atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint written by this script; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in ("model", "model_name", "model_config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of train_CR_kaggle.py (missing {', '.join(missing)})")
    return ckpt


def build_model_from_checkpoint(ckpt, path="<checkpoint>"):
    """Rebuild the network a checkpoint was trained with and load its weights."""
    try:
        model = net_CR_CrossAttention.create_model(ckpt["model_name"], **ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not match model {ckpt.get('model_name')!r}: {e}") from e
    return model


# ----------------------------------------------------------------------------- setup helpers

def setup_distributed(device_arg):
    """torchrun sets LOCAL_RANK/RANK/WORLD_SIZE; without them this is a plain single-process run."""
    if "LOCAL_RANK" not in os.environ:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg)
        return device, 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if not use_cuda:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device, dist.get_rank(), dist.get_world_size()


def resolve_amp(amp, device):
    """Return (autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = CPU_AUTO_AMP
    if amp == "off":
        return None, False
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    return (torch.float16, True) if amp == "fp16" else (torch.bfloat16, False)


def prepare_demo(args):
    """Point the run at the cached synthetic dataset (built on first use) and shrink it to a few minutes."""
    csv_path = DEMO_DIR / f"n{DEMO_SAMPLES}_s{DEMO_SIZE}_seed{DEMO_SEED}" / "data.csv"
    if not csv_path.is_file():
        print(f"[demo] building the synthetic SEN12MS-CR dataset once in {csv_path.parent} ...")
        dataloader.make_synthetic_dataset(csv_path.parent, n=DEMO_SAMPLES, size=DEMO_SIZE, seed=DEMO_SEED)
    args.data_list_filepath, args.input_data_folder = str(csv_path), str(csv_path.parent)
    args.load_size, args.crop_size = DEMO_SIZE, DEMO_SIZE
    args.max_epochs, args.batch_sz, args.warmup_epochs = min(args.max_epochs, DEMO_EPOCHS), 4, 1
    args.lr, args.num_workers = 5e-4, min(args.num_workers, 1)
    args.experiment_name = "demo" if args.experiment_name == "glf_cr_enhanced_v3" else args.experiment_name
    # The design's full loss set; the VGG terms only where their weights can be had (checked below).
    args.use_fft_loss = args.use_gradient_loss = args.use_contrastive_loss = args.use_cloud_focused_loss = True
    if args.vgg_weights == "imagenet":
        try:
            losses.VGGFeatures("imagenet")
        except RuntimeError as e:
            print(f"[demo] perceptual and contrastive terms left out: {e}")
            args.perceptual_weight, args.use_contrastive_loss = 0.0, False
    args.notes = args.notes or "demo run on synthetic data"


def check_inputs(args):
    """Fail before the first step, with the file named, on anything that would fail later."""
    if not args.data_list_filepath or not args.input_data_folder:
        raise SystemExit("pass --data_list_filepath and --input_data_folder (or --demo for synthetic data)")
    rows = dataloader.read_data_list(args.data_list_filepath)
    train_rows = dataloader.select_split(rows, "train", source=args.data_list_filepath)
    val_rows = dataloader.select_split(rows, "val", source=args.data_list_filepath)
    root = Path(args.input_data_folder)
    for rows in (train_rows, val_rows):
        for t in rows:
            for rel in (t.s1, t.s2_cloudfree, t.s2_cloudy):
                if not (root / rel).is_file():
                    raise dataloader.DataError(f"{root / rel}: file listed in {args.data_list_filepath} not found")
    return train_rows, val_rows


def prepare_run_dir(args):
    run_dir = Path(args.save_model_dir) / args.experiment_name
    if args.train_from_scratch and run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.{datetime.now():%Y%m%d-%H%M%S}")
        os.replace(run_dir, aside)
        print(f"--train_from_scratch: the earlier run in {run_dir} was moved to {aside}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"cannot write to --save_model_dir {run_dir}: {e}")
    return run_dir


def write_history(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    dataloader.write_text_atomic(path, buf.getvalue())


def read_history(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quicklook_grid(cloudy, prediction, target, confidence):
    """One row per sample: cloudy | prediction | target | confidence, RGB with the project's fixed stretch."""
    panels = [dataloader.s2_to_rgb(cloudy), dataloader.s2_to_rgb(prediction), dataloader.s2_to_rgb(target)]
    conf = confidence if confidence is not None else torch.zeros_like(cloudy[:, :1])
    panels.append(conf.clamp(0, 1).expand(-1, 3, -1, -1))
    rows = [torch.cat([p[i] for p in panels], dim=2) for i in range(cloudy.shape[0])]
    return torch.cat(rows, dim=1)  # 3 x (n*H) x (4*W)


# ----------------------------------------------------------------------------- train / validate

def to_device(batch, device, sar_input):
    cloudy = batch["cloudy_data"].to(device, non_blocking=True)
    cloudfree = batch["cloudfree_data"].to(device, non_blocking=True)
    sar = batch["SAR_data"].to(device, non_blocking=True)
    if sar_input == "zeros":
        sar = torch.zeros_like(sar)
    cloud_mask = batch["cloud_mask"].to(device, non_blocking=True)
    return cloudy, cloudfree, sar, cloud_mask


@torch.no_grad()
def validate(model, loader, device, amp_dtype, args, world_size):
    """Mean of per-image metrics over the whole validation set, summed across DDP ranks."""
    model.eval()
    sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64, device=device)
    for batch in loader:
        cloudy, cloudfree, sar, _ = to_device(batch, device, args.sar_input)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            prediction = model(cloudy, sar)
        scores = metrics.compute_metrics(dataloader.finish_s2(prediction), cloudfree)  # as test_CR scores
        for i, name in enumerate(METRIC_NAMES):
            sums[i] += scores[name].double().sum()
        sums[-1] += cloudy.shape[0]
    if world_size > 1:
        dist.all_reduce(sums)
    model.train()
    return {name: (sums[i] / sums[-1]).item() for i, name in enumerate(METRIC_NAMES)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, rank, world_size = setup_distributed(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    if args.demo:
        if is_main:
            prepare_demo(args)
        if world_size > 1:  # rank 0 built the data; everyone takes the same settings
            holder = [vars(args)]
            dist.broadcast_object_list(holder, src=0)
            vars(args).update(holder[0])
    train_rows, val_rows = check_inputs(args)
    criterion = losses.build_criterion(args).to(device)  # fails here if VGG weights are unavailable
    amp_dtype, use_scaler = resolve_amp(args.amp, device)

    run_dir = Path(args.save_model_dir) / args.experiment_name
    if is_main:
        run_dir = prepare_run_dir(args)
    if world_size > 1:
        dist.barrier()

    # ---- resume or start
    resume_path = args.resume or (None if args.train_from_scratch else
                                  (run_dir / "last.pth" if (run_dir / "last.pth").is_file() else None))
    ckpt = load_checkpoint(resume_path, map_location="cpu") if resume_path else None
    if ckpt is not None:
        model = build_model_from_checkpoint(ckpt, resume_path)
        if is_main:
            print(f"resuming from {resume_path} (epoch {ckpt['epoch']} done, best PSNR {ckpt['best_psnr']:.3f})")
    else:
        config = {} if args.model_name == "DSen2CR" else dict(
            use_cross_attn=args.use_cross_attn, use_spectral_attention=args.use_spectral_attention,
            use_cloud_predictor=args.use_cloud_predictor, attention=args.attention)
        model = net_CR_CrossAttention.create_model(args.model_name, **config)
    model_name, model_config = ckpt["model_name"] if ckpt else args.model_name, dict(model.config)
    if args.confidence_weight > 0 and not model_config.get("use_cloud_predictor", False):
        raise SystemExit(f"--confidence_weight {args.confidence_weight} supervises the cloud confidence map, which "
                         f"{model_name} without the cloud predictor does not have; set it to 0")
    model.to(device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)

    # ---- data
    train_set = dataloader.SEN12MSCRDataset(train_rows, args.input_data_folder, crop_size=args.crop_size,
                                            load_size=args.load_size, augment=args.augment,
                                            cloud_detector=args.cloud_detector)
    val_set = dataloader.SEN12MSCRDataset(val_rows, args.input_data_folder,
                                          crop_size=args.val_crop_size or args.load_size, load_size=args.load_size,
                                          augment=False, cloud_detector="none")
    # Validation: every rank scores its own disjoint share; sums are all-reduced (no padded duplicates).
    val_share = Subset(val_set, list(range(rank, len(val_set), world_size)))
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True) if world_size > 1 else None
    loader_kw = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=args.batch_sz, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=len(train_set) >= args.batch_sz * world_size,
                              **loader_kw)
    val_loader = DataLoader(val_share, batch_size=args.val_batch_sz or args.batch_sz, shuffle=False, **loader_kw)
    if len(train_loader) == 0:
        raise dataloader.DataError(f"{args.data_list_filepath}: too few training samples for one batch per process")

    # ---- optimiser, schedule, AMP
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, best_psnr, early_stop_counter, global_step = 0, -math.inf, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_psnr = ckpt["epoch"], ckpt["best_psnr"]
        early_stop_counter, global_step = ckpt.get("early_stop_counter", 0), ckpt.get("global_step", 0)
    warmup_steps = int(args.warmup_epochs * len(train_loader))

    train_model = torch.compile(model) if args.compile else model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- logging (rank 0 only)
    writer, history = None, []
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=global_step or None)
        dataloader.write_text_atomic(run_dir / "args.json", json.dumps(vars(args), indent=2, default=str))
        writer.add_text("notes", args.notes or "(none)", global_step)
        history = read_history(run_dir / "history.csv") if ckpt is not None else []
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{model_name}: {n_params / 1e6:.2f}M parameters | device {device} x{world_size} | "
              f"amp {amp_dtype} | {len(train_set)} train / {len(val_set)} val samples | run dir {run_dir}")
    quicklook_batch = None
    if is_main and args.num_quicklooks > 0:
        picks = [val_set[i] for i in range(min(args.num_quicklooks, len(val_set)))]
        quicklook_batch = {k: torch.stack([s[k] for s in picks]) for k in ("cloudy_data", "cloudfree_data", "SAR_data")}

    def checkpoint_state(epochs_done):
        return {"model": model.state_dict(), "model_name": model_name, "model_config": model_config,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "scaler": scaler.state_dict(), "epoch": epochs_done, "best_psnr": best_psnr,
                "early_stop_counter": early_stop_counter, "global_step": global_step, "args": vars(args)}

    if is_main and start_epoch >= args.max_epochs:
        print(f"nothing to train: {run_dir} already holds {start_epoch} epochs; raise --max_epochs to continue "
              f"or pass --train_from_scratch to start again")
    stop_requested = {"signal": None}

    def on_signal(signum, _frame):
        stop_requested["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bad_steps = 0
    epochs_done = start_epoch  # epochs whose end-of-epoch checkpoint has been written
    try:
        epoch_bar = tqdm(total=args.max_epochs, initial=start_epoch, desc="epochs", disable=not is_main,
                         dynamic_ncols=True)
        for epoch in range(start_epoch, args.max_epochs):
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            model.train()
            t0, seen, loss_sum, psnr_sum, n_batches = time.time(), 0, 0.0, 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.max_epochs}", disable=not is_main,
                       leave=False, dynamic_ncols=True)
            for batch in bar:
                if global_step < warmup_steps:
                    for group in optimizer.param_groups:
                        group["lr"] = args.lr * (global_step + 1) / warmup_steps
                cloudy, cloudfree, sar, cloud_mask = to_device(batch, device, args.sar_input)
                if channels_last:
                    cloudy, sar = cloudy.contiguous(memory_format=torch.channels_last), sar.contiguous(
                        memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    prediction, aux = train_model(cloudy, sar, return_aux=True)
                total, terms = criterion(prediction, cloudfree, cloudy, cloud_mask=cloud_mask,
                                         confidence=aux.get("confidence"))
                # Every rank must agree on skipping a step or on stopping, or DDP's all-reduce would hang.
                flags = torch.tensor([float(not torch.isfinite(total)), float(stop_requested["signal"] is not None)],
                                     device=device)
                if world_size > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[0] > 0:
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    warnings.warn(f"non-finite loss at step {global_step}: step skipped ({bad_steps} in a row)")
                    if bad_steps >= args.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_steps} consecutive non-finite losses (terms: "
                            f"{ {k: float(v) for k, v in terms.items()} }); lower --lr, try --amp bf16/off, "
                            f"or check the data for NaN")
                else:
                    bad_steps = 0
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(total).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                               args.grad_clip if args.grad_clip > 0 else math.inf)
                    scaler.step(optimizer)
                    scaler.update()
                    with torch.no_grad():
                        batch_psnr = metrics.psnr(prediction.detach().float().clamp(0, 1), cloudfree).mean().item()
                    loss_sum, psnr_sum, n_batches = loss_sum + total.item(), psnr_sum + batch_psnr, n_batches + 1
                    seen += cloudy.shape[0] * world_size
                    global_step += 1
                    if is_main:
                        bar.set_postfix(loss=f"{total.item():.4f}", psnr=f"{batch_psnr:.2f}")
                        writer.add_scalar("train/loss", total.item(), global_step)
                        for name, value in terms.items():
                            writer.add_scalar(f"train/loss_{name}", float(value), global_step)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                        writer.add_scalar("train/grad_norm", float(grad_norm), global_step)
                        writer.add_scalar("train/psnr", batch_psnr, global_step)
                if flags[1] > 0:
                    break
            bar.close()
            if flags[1] > 0:
                break
            elapsed = time.time() - t0
            samples_per_s = seen / max(elapsed, 1e-9)

            val = None
            if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.max_epochs:
                val = validate(model, val_loader, device, amp_dtype, args, world_size)
                if val["PSNR"] > best_psnr:
                    best_psnr, early_stop_counter, improved = val["PSNR"], 0, True
                else:
                    early_stop_counter, improved = early_stop_counter + 1, False
                if scheduler is not None and args.lr_scheduler == "plateau" and global_step >= warmup_steps:
                    scheduler.step(val["PSNR"])
            else:
                improved = False
            if scheduler is not None and args.lr_scheduler != "plateau" and global_step >= warmup_steps:
                scheduler.step()

            if is_main:
                writer.add_scalar("train/samples_per_s", samples_per_s, global_step)
                writer.add_scalar("train/epoch_loss", loss_sum / max(n_batches, 1), global_step)
                row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": loss_sum / max(n_batches, 1), "train_psnr": psnr_sum / max(n_batches, 1),
                       "samples_per_s": samples_per_s, "best_psnr": best_psnr, "seconds": elapsed}
                if val is not None:
                    for name, value in val.items():
                        writer.add_scalar(f"val/{name}", value, global_step)
                        row[f"val_{name}"] = value
                    if quicklook_batch is not None:
                        model.eval()
                        with torch.no_grad():
                            qb = {k: v.to(device) for k, v in quicklook_batch.items()}
                            sar_q = torch.zeros_like(qb["SAR_data"]) if args.sar_input == "zeros" else qb["SAR_data"]
                            pred_q, aux_q = model(qb["cloudy_data"], sar_q, return_aux=True)
                        model.train()
                        writer.add_image("val/quicklook_cloudy_prediction_target_confidence",
                                         quicklook_grid(qb["cloudy_data"].cpu(), dataloader.finish_s2(pred_q).cpu(),
                                                        qb["cloudfree_data"].cpu(),
                                                        None if aux_q["confidence"] is None else
                                                        aux_q["confidence"].float().cpu()), global_step)
                history.append(row)
                write_history(run_dir / "history.csv", history)
                atomic_torch_save(checkpoint_state(epoch + 1), run_dir / "last.pth")
                if improved:
                    atomic_torch_save(checkpoint_state(epoch + 1), run_dir / "best.pth")
                writer.flush()
                msg = (f"epoch {epoch + 1}/{args.max_epochs}: loss {row['train_loss']:.4f} | "
                       f"{samples_per_s:.1f} samples/s")
                if val is not None:
                    msg += " | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" | best PSNR {best_psnr:.3f}"
                tqdm.write(msg)
            epochs_done = epoch + 1
            epoch_bar.update(1)
            epoch_bar.set_postfix(best_psnr=f"{best_psnr:.2f}")
            if args.early_stop_patience > 0 and early_stop_counter >= args.early_stop_patience:
                if is_main:
                    tqdm.write(f"early stop: no PSNR gain in {early_stop_counter} validations")
                break
        epoch_bar.close()
        if stop_requested["signal"] is not None:
            if is_main:
                # An interrupted epoch is not counted: resuming re-runs it from the weights reached so far.
                atomic_torch_save(checkpoint_state(epochs_done), run_dir / "last.pth")
                print(f"\nstopped by signal {stop_requested['signal']}: resumable checkpoint saved to "
                      f"{run_dir / 'last.pth'}; run the same command again to continue")
            return 130
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
        if world_size > 1:
            dist.destroy_process_group()

    if is_main:
        best = run_dir / "best.pth" if (run_dir / "best.pth").is_file() else run_dir / "last.pth"
        print(f"\ndone: best validation PSNR {best_psnr:.3f} dB. Evaluate with:\n"
              f"  python test_CR.py --checkpoint {best} --data_list_filepath {args.data_list_filepath} "
              f"--input_data_folder {args.input_data_folder} --split test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
