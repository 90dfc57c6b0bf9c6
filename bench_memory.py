"""`benchmark.py memory`: GPU memory of a training step counted without a GPU, and the batch that fits a card."""
import itertools

import torch

import losses
import net_CR_CrossAttention as net
import net_CR_temporal
import sizing
import train_CR_kaggle as train

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
    parser.add_argument("--input_t", type=int, nargs="+", default=[1],
                        help="cloudy dates per sample (issue 30): 1 = the single-date network; N > 1 the time series "
                             "network, counted at each --date_chunk")
    parser.add_argument("--date_chunk", type=int, nargs="+", default=[net_CR_temporal.TemporalConfig.date_chunk],
                        help="--input_t > 1: dates encoded per pass with activation checkpointing (0: all at once, "
                             "kept)")
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
    dates = [(t, chunk) for t in args.input_t for chunk in (args.date_chunk if t > 1 else [None])]
    for network, crop, precision, (t, chunk) in itertools.product(args.networks, args.crops, args.precision, dates):
        series = {} if t == 1 else {"input_t": t, "date_chunk": chunk}
        need = sizing.footprint("CrossAttention", {**NETWORKS[network], **series}, _training_args(args.loss), crop,
                                args.val_size, PRECISIONS[precision])
        free = {name: (mib - args.context_mib) * 2**20 for name, mib in gpus.items()}
        rows.append(dict(network=network, input_t=t, date_chunk=chunk, crop=crop, precision=precision,
                         fixed_mib=need.train_fixed / 2**20,
                         per_sample_mib=need.train_per_sample / 2**20, val_per_sample_mib=need.val_per_sample / 2**20,
                         batch={name: sizing.largest_batch(need, b) for name, b in free.items()}))
        print(f"  done {network} {crop}px {precision} input_t {t} date_chunk {chunk}", flush=True)
    check = _h100_check()
    _print_memory_table(args, rows, check)
    return {"rows": rows, "h100": check}


def _print_memory_table(args, rows, check):
    names = list(rows[0]["batch"]) if rows else []
    print(f"\nbenchmark.py memory  loss={args.loss} validation at {args.val_size} px  (MiB; batch: the largest that "
          f"fits, {sizing.BATCH_MARGIN * 100:.0f} % margin, {args.context_mib:g} MiB context)")
    print(f"{'network':>8} {'dates':>5} {'chunk':>5} {'crop':>4} {'precision':>9} {'fixed':>7} {'per sample':>10} "
          f"{'val/sample':>10} " + " ".join(f"{'batch ' + n:>10}" for n in names))
    for r in rows:
        chunk = "-" if r["date_chunk"] is None else r["date_chunk"]
        print(f"{r['network']:>8} {r['input_t']:>5} {chunk:>5} {r['crop']:>4} {r['precision']:>9} "
              f"{r['fixed_mib']:>7.0f} {r['per_sample_mib']:>10.1f} {r['val_per_sample_mib']:>10.1f} "
              + " ".join(f"{str(r['batch'][n]):>10}" for n in names))
    print(f"H100 row (default network, L1, bf16, 256 px, batch 32): counted {check['counted_mib']:,.0f} MiB; measured "
          f"{check['eager_mib']:,} eager ({check['counted_mib'] / check['eager_mib']:.3f}x), {check['compiled_mib']:,} "
          f"compiled ({check['counted_mib'] / check['compiled_mib']:.3f}x); with CPU autocast's op lists "
          f"{check['cpu_lists_mib']:,.0f} MiB ({check['cpu_lists_mib'] / check['eager_mib']:.3f}x eager)")


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"memory": (_add_memory_args, bench_memory)}
