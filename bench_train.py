"""`benchmark.py train`: training-step samples/s and peak memory by network, precision, attention path, memory
format and compile, each variant in a fresh process."""
import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import time

import torch
from torch.utils import flop_counter

import bench_process
import bench_step
import losses
import net_CR_CrossAttention as net
import net_CR_temporal
import training

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
    model = net_CR_temporal.create_model(cfg["model_name"], **model_config, **cfg["model_config"]).to(device)
    gmacs_256 = net.count_macs(model) / 1e9
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # "on": inductor's default mode; "reduce-overhead": also CUDA graphs (replays the step's kernel launches)
    forward = model if cfg["compile"] == "off" else torch.compile(
        model, mode="reduce-overhead" if cfg["compile"] == "reduce-overhead" else "default")
    criterion = losses.CRLoss(**losses.loss_options("l1")).to(device)
    run = bench_step.step_run(model, criterion, device, PRECISION_AMP[cfg["precision"]], cfg["channels_last"], forward)
    n = cfg["batch"]
    batch = bench_step.random_batch(n, cfg["size"], device, cfg["channels_last"], net_CR_temporal.input_t_of(model))
    sync = bench_step.synchronizer(device)

    out = {"gmacs_256": gmacs_256}
    if device.type == "cuda":
        out["flops_per_sample"] = _train_flops_per_sample(run, batch)
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    for _ in range(cfg["warmup"]):
        training.train_step(run, batch)
    sync()
    out["warmup_s"] = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(cfg["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        training.train_step(run, batch)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median = sorted(times)[len(times) // 2]
    # CPU seconds the process spent in a step: on a shared machine, unlike wall time, not inflated by the time
    # the process waits for a core (cache and memory-bandwidth contention still count)
    out["step_cpu_s"] = statistics.median(cpu_times)
    out.update(step_s=median, samples_per_s=n / median, step_times=times, peak_rss_mb=bench_process.peak_rss_mb(),
               base_rss_mb=base_rss, peak_mem_mb=bench_process.peak_rss_mb() - base_rss)
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
                        help="default fp32 bf16 (+ fp16 on CUDA; on a CPU fp16 runs ATen's slow reference "
                             "convolutions, so it is timed only when asked for)")
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
    try:
        return bench_process.in_fresh_process(train_step_worker, cfg, timeout=timeout)
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


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"train": (_add_train_args, bench_train)}
