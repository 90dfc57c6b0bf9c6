"""`benchmark.py loss`: what the loss terms cost in a training step (the design's full set against L1
alone, VGG in float32 against AMP)."""
import statistics
import time
import warnings

import torch

import bench_step
import losses
import net_CR_CrossAttention as net
import training

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
    run = bench_step.step_run(model, None, device, args.amp, channels_last)
    variants = {name: c.to(device) for name, c in _loss_variants(args, run.amp_dtype).items()}
    batch = bench_step.random_batch(args.batch, args.size, device, channels_last)
    sync = bench_step.synchronizer(device)

    def step(criterion):
        run.criterion = criterion
        training.train_step(run, batch)

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


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"loss": (_add_loss_args, bench_loss)}
