"""Train GLF-CR CrossAttention v3 (or the DSen2-CR baseline) on SEN12MS-CR.

One GPU or CPU:       python train_CR_kaggle.py --data_list_filepath data.csv --input_data_folder ROOT ...
Several GPUs (DDP):   torchrun --nproc_per_node=2 train_CR_kaggle.py ...
No dataset at hand:   python train_CR_kaggle.py --demo

Everything a run writes lives in SAVE_MODEL_DIR/EXPERIMENT_NAME/: last.pth (every epoch), best.pth (best
validation PSNR), history.csv, args.json and tensorboard/. Run it again without --train_from_scratch and
it resumes from last.pth.
"""
import argparse
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import bands
import dataloader
import losses
import net_CR_CrossAttention
import net_CR_temporal
import runtime
import sizing
import synthetic_sets
import training
import training_setup

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
# The demo: 128 synthetic patches of 64 px, trained on 32 px crops (a quarter of the compute per sample) for at most
# DEMO_EPOCHS within DEMO_MINUTES, so it ends in about five minutes on any CPU; a fast one finishes its epochs sooner.
DEMO_SAMPLES, DEMO_SIZE, DEMO_SEED = 128, 64, 0
DEMO_CROP, DEMO_EPOCHS, DEMO_MINUTES, DEMO_LR = 32, 24, 4.5, 1e-3


# ----------------------------------------------------------------------------- the run, top down

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    run = training.setup(args, argv, prepare_demo if args.demo else None)
    if args.dry_run:
        return dry_run(run)
    old_handlers = catch_stop_signals(run)
    try:
        train_epochs(run)
        return finish(run)
    except BaseException:
        if run.is_main and run.global_step == run.first_step:  # failed before its first step: leave no folder
            if run.writer is not None:
                run.writer.close()
                run.writer = None
            training_setup.discard_run_dir(run)
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if run.writer is not None:
            run.writer.close()
        if run.world_size > 1:
            dist.destroy_process_group()


def catch_stop_signals(run):
    """Ctrl-C or Kaggle's SIGTERM sets run.stop_signal: the epoch finishes its step, saves and the script exits 130.
    Returns the handlers replaced, which main puts back."""
    def on_signal(signum, _frame):
        run.stop_signal = signum
        for s, h in old_handlers.items():  # a second signal (timeout, a scheduler) does what it did before: ends us
            signal.signal(s, h)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    return old_handlers


def train_epochs(run):
    """The epochs left: train, validate when due, then the epoch's end (schedule, logs, checkpoints); stops after a
    stop signal, early stopping or when the next epoch would not fit --time_limit."""
    args = run.args
    epoch_bar = tqdm(total=args.max_epochs, initial=run.start_epoch, desc="epochs", dynamic_ncols=True,
                     disable=not run.show_bars)
    for epoch in range(run.start_epoch, args.max_epochs):
        stats = training.train_one_epoch(run, epoch)
        if run.stop_requested:
            break
        val = training.validate(run) if training.is_validation_epoch(args, epoch) else None
        stop = training.end_of_epoch(run, epoch, stats, val)
        epoch_bar.update(1)
        epoch_bar.set_postfix_str(f"best PSNR {run.best_psnr:.2f} | {training.pace(run)}")
        if stop:
            break
    epoch_bar.close()


def batch_size_arg(text):
    """--batch_sz: a positive number, or 'auto' (training_setup.resolve_batch)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None


def prepare_demo(args):
    """Point the run at the cached synthetic dataset (built on first use) and shrink it to a few minutes."""
    product = "" if args.s2_product == bands.DEFAULT_S2_PRODUCT else f"_{args.s2_product}"  # L1C: the folder it had
    csv_path = DEMO_DIR / f"n{DEMO_SAMPLES}_s{DEMO_SIZE}_seed{DEMO_SEED}{product}" / "data.csv"
    if not csv_path.is_file():
        print(f"[demo] building the synthetic SEN12MS-CR dataset once in {csv_path.parent} ...")
        synthetic_sets.make_synthetic_dataset(csv_path.parent, n=DEMO_SAMPLES, size=DEMO_SIZE, seed=DEMO_SEED,
                                          s2_product=args.s2_product)
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
        runtime.save_checkpoint(training.checkpoint_state(run), run.dir / "last.pth")
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
        warmup_s, step_s = training.time_steps(run)
        val_s = training.validation_seconds_per_sample(run)
        if run.is_main:
            print("dry run: nothing written; the plan for these flags")
            for name, value in dry_run_plan(run, setup_s + warmup_s - training.DRY_RUN_WARMUP * step_s, step_s, val_s):
                print(f"  {name}: {value}")
        return 0
    finally:
        if run.world_size > 1:
            dist.destroy_process_group()


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
            ("speed", f"{samples_per_s * run.world_size:.2f} samples/s ({training.DRY_RUN_TIMED} steps of "
                      f"{step_s:.3f} s timed after {training.DRY_RUN_WARMUP}, on the training data at "
                      f"{args.crop_size} px)"),
            ("peak memory", dry_run_memory(run)),
            ("FLOPs", f"{flops / 1e9:.1f} GFLOP per sample for forward + backward (3 x the forward's "
                      f"{flops / 6e9:.1f} GMAC x 2, net_CR_CrossAttention.count_macs; the network only, VGG and "
                      f"the other loss terms not counted)"),
            ("MFU", dry_run_mfu(run, flops * samples_per_s)),
            ("epoch", f"{training.format_duration(train_s + val_epoch_s)}: {len(run.train_loader)} steps of "
                      f"{args.batch_sz * run.world_size} samples ({training.format_duration(train_s)}) + validation of "
                      f"{len(run.val_loader.dataset)} samples per process every {args.val_every} epoch(s) "
                      f"({training.format_duration(val_s * len(run.val_loader.dataset))})"),
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
        return f"no --time_limit; the {left} epochs left take about {training.format_duration(left * epoch_s)}"
    seconds, epochs = args.time_limit * 3600 - start_s, []
    while len(epochs) < left and training.next_epoch_fits(seconds, epochs, training.time_limit_reserve(run)):
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
    g.add_argument("--model_name", default="CrossAttention", choices=list(net_CR_CrossAttention.MODELS),
                   help="network to train: the GLF-CR CrossAttention v3 design, or the DSen2-CR baseline")
    for f in net_CR_CrossAttention.flag_fields():  # one flag per switch of the model's config, help and default there
        if f.type in (bool, "bool"):
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            kind = {"choices": list(f.metadata["choices"])} if "choices" in f.metadata else {"type": f.type}
            g.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"], **kind)
    g.add_argument("--input_t", type=int, default=1,
                   help="cloudy dates per sample (issue 30): 1 = one date, today's network and data list; N > 1 = the "
                        "time series network (net_CR_temporal.py) on a time series list (dataloader.SEN12MSCRTSDataset"
                        "), stored in the checkpoint")
    g.add_argument("--date_chunk", type=int, default=net_CR_temporal.TemporalConfig.date_chunk,
                   help="--input_t > 1: dates encoded in one pass, recomputed in the backward pass instead of kept "
                        "(activation checkpointing; 0 = all dates in one pass, kept: faster, more memory). Changes "
                        "memory and time, not the numbers")


def _optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_epochs", type=int, default=30, help="number of epochs to train")
    g.add_argument("--batch_sz", type=batch_size_arg, default=training_setup.DESIGN_BATCH,
                   help="training batch size per process, or 'auto': on a GPU the largest batch whose training step "
                        f"and validation fit the card's free memory with a margin of {sizing.BATCH_MARGIN * 100:.0f} "
                        f"%% (counted without running it: sizing.py; under DDP the smallest over the ranks), on CPU "
                        f"the design's {training_setup.DESIGN_BATCH}")
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
    runtime.add_shared_flag(g, "amp")
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
    for name in ("data_list_filepath", "input_data_folder", "load_size"):
        runtime.add_shared_flag(g, name)
    g.add_argument("--s2_product", default=bands.DEFAULT_S2_PRODUCT, choices=list(bands.S2_PRODUCTS),
                   help="Sentinel-2 product of the data: L1C (top-of-atmosphere, 13 bands, SEN12MS-CR) or L2A "
                        "(surface reflectance, 12 bands without B10); sets the network's input and output bands and "
                        "is stored in the checkpoint, so test_CR.py refuses the other product")
    runtime.add_shared_flag(g, "s2_offset")
    g.add_argument("--crop_size", type=int, default=128, help="training crop size (random crop + flips)")
    g.add_argument("--val_crop_size", type=int, default=None,
                   help="validation centre-crop size (None: --load_size, the whole patch)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips and 90-degree rotations of training crops")
    runtime.add_shared_flag(g, "cloud_detector", note="its score drives the cloud-focused and confidence losses")
    runtime.add_shared_flag(g, "cloud_mask_dir")
    runtime.add_shared_flag(g, "date_sampler")
    runtime.add_shared_flag(g, "coverage_cache")
    runtime.add_shared_flag(g, "num_workers", note="per training process")
    g.add_argument("--val_batch_sz", type=int, default=None, help="validation batch size (None: --batch_sz)")


def _run_flags(p):
    g = p.add_argument_group("run")
    g.add_argument("--save_model_dir", default="./checkpoints", help="folder holding one subfolder per experiment")
    g.add_argument("--experiment_name", default="glf_cr_enhanced_v3", help="name of this run's subfolder")
    g.add_argument("--train_from_scratch", action="store_true",
                   help="start fresh even if the experiment has a last.pth (the old run is moved aside, not deleted)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file (None: the experiment's last.pth)")
    g.add_argument("--notes", default="", help="free text stored in args.json and TensorBoard")
    runtime.add_shared_flag(g, "device")
    g.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and at the last)")
    g.add_argument("--num_quicklooks", type=int, default=4,
                   help="fixed validation samples shown in TensorBoard (cloudy | prediction | target | confidence)")
    g.add_argument("--log_every", type=int, default=training.LOG_EVERY,
                   help="read the loss, its terms, PSNR and gradient norm from the device every N steps (TensorBoard "
                        "points are means over them); each read waits for the GPU")
    g.add_argument("--time_limit", type=float, default=None,
                   help="hours this command may run (e.g. 11.5 in a 12-hour Kaggle session): stop after the last "
                        "epoch that fits, with a resumable last.pth and the command that resumes (None: no limit)")
    g.add_argument("--dry_run", action="store_true",
                   help=f"build everything these flags ask for, time {training.DRY_RUN_TIMED} training steps (after "
                        f"{training.DRY_RUN_WARMUP} untimed) on the training data, print the plan (device, precision, "
                        f"batch, samples/s, peak memory, MFU, epoch time, epochs that fit --time_limit) and exit; "
                        f"writes no run folder, checkpoint or TensorBoard file (--demo still builds its cached data "
                        f"set)")
    g.add_argument("--demo", action="store_true",
                   help=f"train a short run on built-in synthetic data (no dataset needed): at most {DEMO_EPOCHS} "
                        f"epochs within {DEMO_MINUTES:g} minutes (--time_limit overrides the budget)")


if __name__ == "__main__":
    sys.exit(runtime.run_cli(main, user_errors=(losses.VGGWeightsError,)))
