"""`benchmark.py loop`: the real training loop's samples/s against the bare training step it is built around."""
import os
import shlex
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

import bench_process
import bench_step
import datalist
import losses
import synthetic_sets
import train_CR_kaggle as train
import training

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
    csv_path = synthetic_sets.make_synthetic_dataset(Path(out) / "unique", n=n_unique, size=size, seed=0,
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
    rest = {k: v.to(run.device) for k, v in batch.items() if torch.is_tensor(v) and k not in training.BATCH_KEYS}
    return {**batch, **rest, **training.to_device(batch, run.device, run.channels_last)}


def _bare_steps(run, batch, steps, sync):
    """Seconds for `steps` calls of train_CR_kaggle.train_step on one batch already on the device: the training step
    with no data loading and no host reads. The run's step count is left as the loop had it (its warm-up, logs)."""
    global_step = run.global_step
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        training.train_step(run, batch)
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
        run = training.setup(args)
        cuda = run.device.type == "cuda"
        sync = bench_step.synchronizer(run.device)
        batch = _on_device(run, default_collate([run.train_loader.dataset[i] for i in range(cfg["batch"])]))
        _bare_steps(run, batch, cfg["warmup"], sync)  # allocation, kernel choice, compilation
        gpu = _GpuBusy(run.device) if cuda else None
        run.train_loader = timed = _InterleavedLoader(run.train_loader, cfg["warmup"], cfg["block"],
                                                      lambda n: _bare_steps(run, batch, n, sync), sync, gpu)
        stats = training.train_one_epoch(run, 0)
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
            results[loss] = bench_process.in_fresh_process(loop_worker, cfg, timeout=args.timeout)
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


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"loop": (_add_loop_args, bench_loop)}
