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
from types import SimpleNamespace

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
import runtime
# Re-exported: these lived here before runtime.py held them, and notebooks call them by this module's name.
from runtime import (CPU_AUTO_AMP, CheckpointError, build_model_from_checkpoint, load_checkpoint,  # noqa: F401
                     resolve_amp)
from runtime import save_checkpoint as atomic_torch_save

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_SAMPLES, DEMO_SIZE, DEMO_SEED, DEMO_EPOCHS = 128, 64, 0, 24  # ~2 min on 2 quiet CPU cores (measured 1 min 53 s)

HISTORY_FIELDS = (["epoch", "lr", "train_loss", "train_psnr", "samples_per_s"]
                  + [f"val_{name}" for name in metrics.METRIC_NAMES] + ["best_psnr", "seconds"])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (_model_flags, _optimisation_flags, _loss_flags, _data_flags, _run_flags):
        add_flags(p)
    return p


def _model_flags(p):
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
    g.add_argument("--use_date_correction", action=argparse.BooleanOptionalAction, default=False,
                   help="a per-image, per-band gain and offset applied to every pixel (the two dates' radiometric "
                        "change), so the confidence map only marks clouds: output = corrected + confidence * residual")
    g.add_argument("--use_sar_skips", action=argparse.BooleanOptionalAction, default=False,
                   help="feed the SAR encoder's full- and half-resolution features to the decoder too")
    g.add_argument("--use_confidence_refinement", action=argparse.BooleanOptionalAction, default=False,
                   help="sharpen the cloud confidence map at full resolution from the decoder's features")
    g.add_argument("--detach_confidence_input", action=argparse.BooleanOptionalAction, default=False,
                   help="the confidence head reads detached features: --confidence_weight trains the head only, "
                        "not the shared encoders and decoder")
    g.add_argument("--attention", default="fused", choices=["fused", "reference"],
                   help="attention kernel: fused scaled_dot_product_attention, or the explicit reference")
    g.add_argument("--sar_input", default="on", choices=list(net_CR_CrossAttention.SAR_INPUTS),
                   help="'zeros' feeds an all-zero SAR image (ablation: does the model use the radar?); "
                        "stored in the model's config, so evaluation feeds what training fed")


def _optimisation_flags(p):
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
    g.add_argument("--amp", default="auto", choices=list(runtime.AMP_CHOICES),
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16 with GradScaler; "
                        f"on CPU auto = {runtime.CPU_AUTO_AMP} (see BENCHMARKS.md)")
    g.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format: auto = on for CPU (measured ~1.5x faster with bf16, "
                        "BENCHMARKS.md), off on CUDA (not yet measured there)")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--seed", type=int, default=0, help="random seed (each DDP rank adds its rank)")


def _loss_flags(p):
    d = losses.LOSS_DEFAULTS
    g = p.add_argument_group("losses (see losses.py)")
    g.add_argument("--l1_weight", type=float, default=d["l1_weight"], help="weight of the L1 (or cloud-focused L1) term")
    g.add_argument("--perceptual_weight", type=float, default=d["perceptual_weight"],
                   help="weight of the VGG perceptual term on RGB (0 = off)")
    g.add_argument("--use_fft_loss", action="store_true", help="add the Fourier-domain L1 term")
    g.add_argument("--fft_weight", type=float, default=d["fft_weight"], help="weight of the FFT term")
    g.add_argument("--use_gradient_loss", action="store_true", help="add the image-gradient L1 term")
    g.add_argument("--gradient_weight", type=float, default=d["gradient_weight"], help="weight of the gradient term")
    g.add_argument("--use_contrastive_loss", action="store_true",
                   help="add the AECR-Net contrastive term (VGG space: pull to target, push from cloudy)")
    g.add_argument("--contrastive_weight", type=float, default=d["contrastive_weight"], help="weight of the contrastive term")
    g.add_argument("--use_cloud_focused_loss", action="store_true",
                   help="replace plain L1 by L1 weighted 1 + factor * cloud intensity")
    g.add_argument("--cloud_weight_factor", type=float, default=d["cloud_weight_factor"],
                   help="extra weight of fully cloudy pixels in the cloud-focused loss (2.5: the design document's "
                        "training command; its usage example shows 2.0)")
    g.add_argument("--confidence_weight", type=float, default=None,
                   help=f"weight of the BCE that teaches the confidence map where clouds are (the true cloud map of "
                        f"synthetic data, else the cloud mask); default {d['confidence_weight']} for a model with a "
                        f"confidence map, 0 for one without (DSen2CR, --no-use_cloud_predictor)")
    g.add_argument("--vgg_weights", default=d["vgg_weights"],
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
                   help="validation centre-crop size (default: --load_size, the whole patch)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and 90-degree rotations of training crops")
    g.add_argument("--cloud_detector", default="rule", choices=["rule", "s2cloudless", "none"],
                   help="soft cloud score behind the cloud-focused and confidence losses")
    g.add_argument("--cloud_mask_dir", default=None,
                   help="read the cloud masks precomputed by `python dataloader.py masks` from this folder instead "
                        "of running --cloud_detector on every sample")
    g.add_argument("--num_workers", type=int, default=2, help="data loading worker processes per training process")
    g.add_argument("--val_batch_sz", type=int, default=None, help="validation batch size (default: --batch_sz)")


def _run_flags(p):
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


# ----------------------------------------------------------------------------- set-up

def setup_distributed(device_arg):
    """torchrun sets LOCAL_RANK/RANK/WORLD_SIZE; without them this is a plain single-process run."""
    if "LOCAL_RANK" not in os.environ:
        return runtime.resolve_device(device_arg), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if not use_cuda:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device, dist.get_rank(), dist.get_world_size()


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


def resolve_confidence_weight(args):
    """--confidence_weight's default: the loss table's value where the model has a confidence map, else 0."""
    if args.confidence_weight is None:
        has_map = args.model_name == "CrossAttention" and args.use_cloud_predictor
        args.confidence_weight = losses.LOSS_DEFAULTS["confidence_weight"] if has_map else 0.0
    return args.confidence_weight


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


def build_model(args, ckpt, resume_path, is_main):
    """The network to train: rebuilt from the checkpoint when resuming, else from the model flags."""
    if ckpt is not None:
        model = build_model_from_checkpoint(ckpt, resume_path)
        if is_main:
            print(f"resuming from {resume_path} (epoch {ckpt['epoch']} done, best PSNR {ckpt['best_psnr']:.3f})")
    else:
        config = dict(sar_input=args.sar_input)
        if args.model_name == "CrossAttention":
            config.update(use_cross_attn=args.use_cross_attn, use_spectral_attention=args.use_spectral_attention,
                          use_cloud_predictor=args.use_cloud_predictor, attention=args.attention,
                          use_date_correction=args.use_date_correction, use_sar_skips=args.use_sar_skips,
                          use_confidence_refinement=args.use_confidence_refinement,
                          detach_confidence_input=args.detach_confidence_input)
        model = net_CR_CrossAttention.create_model(args.model_name, **config)
    if args.confidence_weight > 0 and not model.config.get("use_cloud_predictor", False):
        raise SystemExit(f"--confidence_weight {args.confidence_weight} supervises the cloud confidence map, which "
                         f"{model.model_name} without the cloud predictor does not have; set it to 0")
    return model


def build_loaders(args, train_rows, val_rows, device, rank, world_size):
    """(train_loader, val_loader, val_set). Validation: every rank scores its own disjoint share and the sums are
    all-reduced, so no sample is padded in twice."""
    train_set = dataloader.SEN12MSCRDataset(train_rows, args.input_data_folder, crop_size=args.crop_size,
                                            load_size=args.load_size, augment=args.augment,
                                            cloud_detector=args.cloud_detector, cloud_mask_dir=args.cloud_mask_dir)
    val_set = dataloader.SEN12MSCRDataset(val_rows, args.input_data_folder,
                                          crop_size=args.val_crop_size or args.load_size, load_size=args.load_size,
                                          augment=False, cloud_detector="none")
    val_share = Subset(val_set, list(range(rank, len(val_set), world_size)))
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True) if world_size > 1 else None
    loader_kw = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=args.batch_sz, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_set) >= args.batch_sz * world_size, **loader_kw)
    val_loader = DataLoader(val_share, batch_size=args.val_batch_sz or args.batch_sz, shuffle=False, **loader_kw)
    if len(train_loader) == 0:
        raise dataloader.DataError(f"{args.data_list_filepath}: too few training samples for one batch per process")
    return train_loader, val_loader, val_set


def build_optimizer(args, model):
    """AdamW and the schedule that follows the warm-up (None for --lr_scheduler none)."""
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
    return optimizer, scheduler


def restore(run, ckpt):
    """Optimizer, schedule, scaler and counters from a checkpoint, so a resumed run carries on exactly."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epochs_done, run.best_psnr = ckpt["epoch"], ckpt["best_psnr"]
    run.early_stop_counter, run.global_step = ckpt.get("early_stop_counter", 0), ckpt.get("global_step", 0)


def setup(args):
    """Everything a run needs, in the order that fails early: device, data list, losses, run folder, model, data,
    optimiser, logging. Returns the run as one namespace that the loop's functions share."""
    device, rank, world_size = setup_distributed(args.device)
    run = SimpleNamespace(args=args, device=device, rank=rank, world_size=world_size, is_main=rank == 0,
                          epochs_done=0, best_psnr=-math.inf, early_stop_counter=0, global_step=0, bad_steps=0,
                          stop_signal=None, writer=None, history=[], quicklook_batch=None)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if args.demo:
        if run.is_main:
            prepare_demo(args)
        if world_size > 1:  # rank 0 built the data; everyone takes the same settings
            holder = [vars(args)]
            dist.broadcast_object_list(holder, src=0)
            vars(args).update(holder[0])
    train_rows, val_rows = check_inputs(args)
    resolve_confidence_weight(args)
    run.criterion = losses.build_criterion(args).to(device)  # fails here if VGG weights are unavailable
    run.amp_dtype, use_scaler = resolve_amp(args.amp, device)
    run.ctx = runtime.autocast(device, run.amp_dtype)  # the one autocast context: training, validation, quicklooks
    run.dir = prepare_run_dir(args) if run.is_main else Path(args.save_model_dir) / args.experiment_name
    if world_size > 1:
        dist.barrier()

    resume_path = args.resume or (None if args.train_from_scratch else
                                  (run.dir / "last.pth" if (run.dir / "last.pth").is_file() else None))
    ckpt = load_checkpoint(resume_path, map_location="cpu") if resume_path else None
    run.model = build_model(args, ckpt, resume_path, run.is_main).to(device)
    run.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cpu")
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
    run.train_loader, run.val_loader, val_set = build_loaders(args, train_rows, val_rows, device, rank, world_size)
    run.optimizer, run.scheduler = build_optimizer(args, run.model)
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if ckpt is not None:
        restore(run, ckpt)
    run.start_epoch = run.epochs_done
    run.warmup_steps = int(args.warmup_epochs * len(run.train_loader))
    run.train_model = torch.compile(run.model) if args.compile else run.model
    if world_size > 1:
        run.train_model = DDP(run.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if run.is_main:
        setup_logging(run, ckpt is not None, val_set)
    return run


def setup_logging(run, resumed, val_set):
    """Rank 0 only: TensorBoard, args.json, the history so far, and the fixed quicklook samples."""
    from torch.utils.tensorboard import SummaryWriter

    args = run.args
    run.writer = SummaryWriter(log_dir=str(run.dir / "tensorboard"), purge_step=run.global_step or None)
    runtime.write_text_atomic(run.dir / "args.json", json.dumps(vars(args), indent=2, default=str))
    run.writer.add_text("notes", args.notes or "(none)", run.global_step)
    run.history = read_history(run.dir / "history.csv") if resumed else []
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"{run.model.model_name}: {n_params / 1e6:.2f}M parameters | device {run.device} x{run.world_size} | "
          f"amp {run.amp_dtype} | {len(run.train_loader.dataset)} train / {len(val_set)} val samples | "
          f"run dir {run.dir}")
    if args.num_quicklooks > 0:
        picks = [val_set[i] for i in range(min(args.num_quicklooks, len(val_set)))]
        run.quicklook_batch = {k: torch.stack([s[k] for s in picks])
                               for k in ("cloudy_data", "cloudfree_data", "SAR_data")}
    if run.start_epoch >= args.max_epochs:
        print(f"nothing to train: {run.dir} already holds {run.start_epoch} epochs; raise --max_epochs to continue "
              f"or pass --train_from_scratch to start again")


# ----------------------------------------------------------------------------- history and quicklooks

def write_history(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    runtime.write_text_atomic(path, buf.getvalue())


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


@torch.no_grad()
def log_quicklooks(run):
    """The fixed validation samples through the model, under the run's autocast context, into TensorBoard."""
    batch = {k: v.to(run.device) for k, v in run.quicklook_batch.items()}
    run.model.eval()
    with run.ctx:
        prediction, aux = run.model(batch["cloudy_data"], batch["SAR_data"], return_aux=True)
    run.model.train()
    confidence = None if aux["confidence"] is None else aux["confidence"].float().cpu()
    grid = quicklook_grid(batch["cloudy_data"].cpu(), dataloader.finish_s2(prediction).cpu(),
                          batch["cloudfree_data"].cpu(), confidence)
    run.writer.add_image("val/quicklook_cloudy_prediction_target_confidence", grid, run.global_step)


# ----------------------------------------------------------------------------- train / validate

def get_lr(step, peak_lr, warmup_steps):
    """Learning rate of warm-up iteration `step`: linear from peak_lr / warmup_steps up to peak_lr. After the
    warm-up the scheduler (plateau, cosine, step) owns the learning rate."""
    return peak_lr * (step + 1) / warmup_steps


def to_device(batch, device, channels_last=False):
    cloudy = batch["cloudy_data"].to(device, non_blocking=True)
    cloudfree = batch["cloudfree_data"].to(device, non_blocking=True)
    sar = batch["SAR_data"].to(device, non_blocking=True)
    cloud_mask = batch["cloud_mask"].to(device, non_blocking=True)
    if channels_last:  # the model's convolutions want NHWC inputs when its weights are NHWC
        cloudy, sar = (t.contiguous(memory_format=torch.channels_last) for t in (cloudy, sar))
    return cloudy, cloudfree, sar, cloud_mask


def confidence_target(batch, device):
    """What the confidence map should be: the true cloud map where the data has one (synthetic sets), else the
    detector's binary mask (score >= threshold)."""
    if "cloud_truth" in batch:
        return dataloader.truth_mask(batch["cloud_truth"]).float().to(device, non_blocking=True)
    return batch["cloud_binary"].to(device, non_blocking=True)


def train_step(run, batch):
    """One optimisation step. Returns (loss, terms, batch PSNR) or None when the loss was not finite on any rank
    (the step is skipped on every rank) or a stop signal arrived (the step is taken first)."""
    args = run.args
    if run.global_step < run.warmup_steps:
        for group in run.optimizer.param_groups:
            group["lr"] = get_lr(run.global_step, args.lr, run.warmup_steps)
    cloudy, cloudfree, sar, cloud_mask = to_device(batch, run.device, run.channels_last)
    with run.ctx:
        prediction, aux = run.train_model(cloudy, sar, return_aux=True)
    total, terms = run.criterion(prediction, cloudfree, cloudy, cloud_mask=cloud_mask, confidence=aux.get("confidence"),
                                 confidence_target=confidence_target(batch, run.device))
    # Every rank must agree on skipping a step or on stopping, or DDP's all-reduce would hang.
    flags = torch.tensor([float(not torch.isfinite(total)), float(run.stop_signal is not None)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    run.stop_requested = bool(flags[1] > 0)
    run.optimizer.zero_grad(set_to_none=True)
    if flags[0] > 0:
        run.bad_steps += 1
        warnings.warn(f"non-finite loss at step {run.global_step}: step skipped ({run.bad_steps} in a row)")
        if run.bad_steps >= args.max_bad_steps:
            raise FloatingPointError(f"{run.bad_steps} consecutive non-finite losses (terms: "
                                     f"{ {k: float(v) for k, v in terms.items()} }); lower --lr, try --amp "
                                     f"bf16/off, or check the data for NaN")
        return None
    run.bad_steps = 0
    run.scaler.scale(total).backward()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    run.grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                   args.grad_clip if args.grad_clip > 0 else math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with torch.no_grad():
        batch_psnr = metrics.psnr(prediction.detach().float().clamp(0, 1), cloudfree).mean().item()
    run.global_step += 1
    return total.item(), terms, batch_psnr


def log_step(run, loss, terms, batch_psnr, bar):
    bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{batch_psnr:.2f}")
    w, step = run.writer, run.global_step
    w.add_scalar("train/loss", loss, step)
    for name, value in terms.items():
        w.add_scalar(f"train/loss_{name}", float(value), step)
    w.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], step)
    w.add_scalar("train/grad_norm", float(run.grad_norm), step)
    w.add_scalar("train/psnr", batch_psnr, step)


def train_one_epoch(run, epoch):
    """One pass over the training set: {"loss", "psnr", "samples_per_s", "seconds"} (means over the steps taken)."""
    run.model.train()
    if isinstance(run.train_loader.sampler, DistributedSampler):
        run.train_loader.sampler.set_epoch(epoch)
    t0, seen, loss_sum, psnr_sum, n_steps = time.time(), 0, 0.0, 0.0, 0
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{run.args.max_epochs}", disable=not run.is_main,
               leave=False, dynamic_ncols=True)
    run.stop_requested = False
    for batch in bar:
        result = train_step(run, batch)
        if result is not None:
            loss, terms, batch_psnr = result
            loss_sum, psnr_sum, n_steps = loss_sum + loss, psnr_sum + batch_psnr, n_steps + 1
            seen += batch["cloudy_data"].shape[0] * run.world_size
            if run.is_main:
                log_step(run, loss, terms, batch_psnr, bar)
        if run.stop_requested:
            break
    bar.close()
    seconds = time.time() - t0
    return {"loss": loss_sum / max(n_steps, 1), "psnr": psnr_sum / max(n_steps, 1),
            "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def validate(run):
    """Mean of per-image metrics over the whole validation set, summed across DDP ranks; predictions are scored
    with the same rule as test_CR.py (bands.finish_s2)."""
    run.model.eval()
    sums = torch.zeros(len(metrics.METRIC_NAMES) + 1, dtype=torch.float64, device=run.device)
    for batch in run.val_loader:
        cloudy, cloudfree, sar, _ = to_device(batch, run.device)
        with run.ctx:
            prediction = run.model(cloudy, sar)
        scores = metrics.compute_metrics(dataloader.finish_s2(prediction), cloudfree)
        for i, name in enumerate(metrics.METRIC_NAMES):
            sums[i] += scores[name].double().sum()
        sums[-1] += cloudy.shape[0]
    if run.world_size > 1:
        dist.all_reduce(sums)
    run.model.train()
    return {name: (sums[i] / sums[-1]).item() for i, name in enumerate(metrics.METRIC_NAMES)}


def is_validation_epoch(args, epoch):
    return (epoch + 1) % args.val_every == 0 or epoch + 1 == args.max_epochs


# ----------------------------------------------------------------------------- end of epoch, end of run

def checkpoint_state(run):
    return {"model": run.model.state_dict(), "model_name": run.model.model_name,
            "model_config": dict(run.model.config), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler else None, "scaler": run.scaler.state_dict(),
            "epoch": run.epochs_done, "best_psnr": run.best_psnr, "early_stop_counter": run.early_stop_counter,
            "global_step": run.global_step, "args": vars(run.args)}


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
    atomic_torch_save(checkpoint_state(run), run.dir / "last.pth")
    if improved:
        atomic_torch_save(checkpoint_state(run), run.dir / "best.pth")
    w.flush()
    msg = f"epoch {epoch + 1}/{run.args.max_epochs}: loss {stats['loss']:.4f} | {stats['samples_per_s']:.1f} samples/s"
    if val is not None:
        msg += " | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" | best PSNR {run.best_psnr:.3f}"
    tqdm.write(msg)


def end_of_epoch(run, epoch, stats, val):
    """Schedule, logging and checkpoints after an epoch; True when training should stop early."""
    improved = update_schedule(run, val)
    run.epochs_done = epoch + 1  # counted before the checkpoint is written, so last.pth resumes after this epoch
    if run.is_main:
        record_epoch(run, epoch, stats, val, improved)
    if run.args.early_stop_patience > 0 and run.early_stop_counter >= run.args.early_stop_patience:
        if run.is_main:
            tqdm.write(f"early stop: no PSNR gain in {run.early_stop_counter} validations")
        return True
    return False


def finish(run):
    """Exit status of the run: 130 after a stop signal (with a resumable last.pth), else 0 and the next command."""
    args = run.args
    if run.stop_signal is not None:
        if run.is_main:
            # An interrupted epoch is not counted: resuming re-runs it from the weights reached so far.
            atomic_torch_save(checkpoint_state(run), run.dir / "last.pth")
            print(f"\nstopped by signal {run.stop_signal}: resumable checkpoint saved to {run.dir / 'last.pth'}; "
                  f"run the same command again to continue")
        return 130
    if run.is_main:
        best = run.dir / "best.pth" if (run.dir / "best.pth").is_file() else run.dir / "last.pth"
        print(f"\ndone: best validation PSNR {run.best_psnr:.3f} dB. Evaluate with:\n"
              f"  python test_CR.py --checkpoint {best} --data_list_filepath {args.data_list_filepath} "
              f"--input_data_folder {args.input_data_folder} --split test")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    run = setup(args)

    def on_signal(signum, _frame):  # Ctrl-C or Kaggle's SIGTERM: finish the step, save, exit 130
        run.stop_signal = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    epoch_bar = tqdm(total=args.max_epochs, initial=run.start_epoch, desc="epochs", disable=not run.is_main,
                     dynamic_ncols=True)
    try:
        for epoch in range(run.start_epoch, args.max_epochs):
            stats = train_one_epoch(run, epoch)
            if run.stop_requested:
                break
            val = validate(run) if is_validation_epoch(args, epoch) else None
            stop = end_of_epoch(run, epoch, stats, val)
            epoch_bar.update(1)
            epoch_bar.set_postfix(best_psnr=f"{run.best_psnr:.2f}")
            if stop:
                break
        epoch_bar.close()
        return finish(run)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if run.writer is not None:
            run.writer.close()
        if run.world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
