"""What a training run needs before it starts: GPU memory per sample, counted without a GPU, and the peak compute
of the GPUs the project's users train on (for MFU).

    need = footprint("CrossAttention", {}, loss_args, crop=128, val_size=256, amp_dtype=torch.float16)
    need.train_fixed, need.train_per_sample         # bytes: weights, gradients, AdamW, VGG | activations
    batch = largest_batch(need, free_bytes)          # None when not even one sample fits

The count: one training step (forward under autocast, the criterion, backward, gradient clipping, AdamW) and one
validation forward run on fake tensors (torch's FakeTensorMode: shapes and dtypes, no arithmetic, no memory) while a
TorchDispatchMode sums the storages alive and keeps the peak, each rounded up to 512 bytes as CUDA's caching
allocator rounds a block (what torch.cuda.max_memory_allocated counts). Two batch sizes give fixed + per-sample
bytes. The count runs on fake CPU tensors: torch's autograd engine will not run a backward pass on fake CUDA tensors
without a GPU ("hasPrimaryContext expects a valid device index"), and one count on every machine is what
BENCHMARKS.md checks against a measured GPU. CPU autocast keeps group_norm, layer_norm and a few more in 16 bits
where CUDA autocast runs them in float32 (torch.amp's op lists), so the count applies CUDA's float32 list itself
(CudaAutocastPolicy); without it the count came to 0.60x the H100's measured peak, with it 1.00x (BENCHMARKS.md,
"GPU memory"). Not counted: cuDNN's workspaces, the allocator's fragmentation (reserved beyond allocated), the CUDA
context (300-500 MiB, outside torch's figures and already gone from torch.cuda.mem_get_info's free memory), DDP's
gradient buckets (one more copy of the gradients, 25 MB for this network); the margin below covers them. Compiled
steps need less (the H100's compiled step measured 0.57x its eager one): the count is the eager step, an upper bound.

A time series network (model_config's input_t > 1) is counted with its input_t dates per sample, in its date
chunks (net_CR_temporal.TemporalConfig.date_chunk). Imports the model and the losses only (training and the memory
benchmark, bench_memory.py, import this, never the other way).
"""
import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import losses
import net_CR_temporal

MiB = 2 ** 20
ALLOCATOR_ROUNDING = 512  # bytes: CUDA's caching allocator rounds every block up to this (CUDACachingAllocator.cpp)
# --batch_sz auto keeps this share of the free memory unused: the allocator's fragmentation (reserved beyond
# allocated, commonly 5-10 % over a long run), cuDNN's workspaces and DDP's buckets, which the count leaves out, and
# the count's own error (+0.6 % against one H100 measurement). An out-of-memory error hours into a Kaggle session
# costs more than a batch one or two smaller.
BATCH_MARGIN = 0.15
# Ops CUDA autocast runs in float32 and CPU autocast does not (torch.amp docs, "CUDA Ops that can autocast to
# float32" against "CPU Ops that can autocast to float32"); those this project's networks and losses call.
CUDA_FLOAT32_OPS = frozenset({"group_norm", "layer_norm", "softplus", "exp", "pow", "__pow__", "__rpow__", "softmax",
                              "log_softmax", "rsqrt", "reciprocal", "log", "norm", "normalize"})


class LiveMemory(TorchDispatchMode):
    """Sum of the bytes of the storages alive (each rounded to ALLOCATOR_ROUNDING) and its peak, for every tensor an
    op creates inside the mode. A view shares its base's storage and counts once."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        key = id(storage)  # torch keeps one Python object per live storage, so its id names it while it lives
        if key in self.live:
            return
        size = math.ceil(storage.nbytes() / ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING
        self.live[key], self.now = size, self.now + size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key)

    def reset_peak(self):
        self.peak = self.now


class CudaAutocastPolicy(TorchFunctionMode):
    """Under CPU autocast, run CUDA_FLOAT32_OPS on float32 inputs, as CUDA autocast does: their inputs and outputs
    (kept for backward) then take float32's bytes, as on the GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_FLOAT32_OPS and torch.is_autocast_enabled("cpu"):
            def up(a):
                return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
            args, kwargs = tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class Footprint:
    """GPU memory of a run in bytes: a training step at `crop` px and a validation forward at `val_size` px, each
    fixed + per-sample x batch. The fixed parts hold weights, gradients, AdamW's moments and VGG (validation runs
    with the gradients and moments alive)."""
    train_fixed: int
    train_per_sample: int
    val_fixed: int
    val_per_sample: int
    crop: int
    val_size: int
    precision: str

    def bytes_for(self, batch, val_batch=None):
        """Peak bytes of training at `batch` with validation at `val_batch` (None: the same batch)."""
        val_batch = batch if val_batch is None else val_batch
        return max(self.train_fixed + batch * self.train_per_sample, self.val_fixed + val_batch * self.val_per_sample)


def precision_name(amp_dtype):
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]


def _build(model_name, model_config, loss_args, amp_dtype, policy=None):
    """Model, criterion (random VGG: the same shapes and bytes as ImageNet's; the loss flags resolved for this model
    as training resolves them) and AdamW, inside the fake mode. policy: CudaAutocastPolicy, also entered where a time
    series network recomputes a date chunk in the backward pass."""
    model = net_CR_temporal.create_model(model_name, **model_config)
    if policy is not None and hasattr(model, "recompute_context"):
        model.recompute_context = policy
    with warnings.catch_warnings():  # the random-VGG warning is for training runs, not for a count
        warnings.simplefilter("ignore")
        criterion = losses.build_criterion(SimpleNamespace(**{**vars(loss_args), "vgg_weights": "random"}),
                                           vgg_dtype=amp_dtype, model=model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, criterion, optimizer


def _train_step(model, criterion, optimizer, n, size, amp_dtype):
    """training.train_step's arithmetic on fake inputs: forward, the terms it enables, backward, clip, step; a time
    series network (input_t > 1) takes (n, T, C, size, size) and its loss reads the base as the cloudy image."""
    dates = _dates(model, n)
    cloudy, target = torch.empty(*dates, 13, size, size), torch.empty(n, 13, size, size)
    sar, mask = torch.empty(*dates, 2, size, size), torch.empty(n, 1, size, size)
    with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        prediction, aux = model(cloudy, sar, return_aux=True)
    total, _ = criterion(prediction, target, net_CR_temporal.loss_reference(cloudy, aux), cloud_mask=mask,
                         confidence_target=mask if "confidence" in criterion.weights else None,
                         aux=aux, date_confidence_target=torch.empty(*dates, 1, size, size)
                         if "date_confidence" in criterion.weights else None)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()


def _dates(model, n):
    """The leading dimensions of a batch of n samples: (n,), or (n, T) for a time series network."""
    t = net_CR_temporal.input_t_of(model)
    return (n,) if t == 1 else (n, t)


def _peaks(model_name, model_config, loss_args, n, crop, val_size, amp_dtype, cuda_autocast):
    """(training peak, validation peak) in bytes at batch n. Two steps: AdamW makes its moments in the first, so the
    second holds everything a step in the middle of training holds."""
    policy = CudaAutocastPolicy() if cuda_autocast else contextlib.nullcontext()
    with FakeTensorMode(), LiveMemory() as memory, policy:
        model, criterion, optimizer = _build(model_name, model_config, loss_args, amp_dtype,
                                             CudaAutocastPolicy if cuda_autocast else None)
        for _ in range(2):
            _train_step(model, criterion, optimizer, n, crop, amp_dtype)
        train_peak = memory.peak
        memory.reset_peak()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            model(torch.empty(*_dates(model, n), 13, val_size, val_size),
                  torch.empty(*_dates(model, n), 2, val_size, val_size))
        return train_peak, memory.peak


def footprint(model_name, model_config, loss_args, crop, val_size, amp_dtype, cuda_autocast=True):
    """Footprint of training `model_name(**model_config)` with the loss flags in `loss_args` (an argparse namespace,
    or losses.loss_options as a SimpleNamespace) at `crop` px, validating at `val_size` px, under autocast at
    amp_dtype (None: float32). Counted at batch 1 and 2; takes seconds per batch size at 256 px. cuda_autocast=False
    leaves CPU autocast's op lists as they are (what the count would be without CudaAutocastPolicy)."""
    (t1, v1), (t2, v2) = (_peaks(model_name, model_config, loss_args, n, crop, val_size, amp_dtype, cuda_autocast)
                          for n in (1, 2))
    return Footprint(train_fixed=2 * t1 - t2, train_per_sample=t2 - t1, val_fixed=2 * v1 - v2,
                     val_per_sample=v2 - v1, crop=crop, val_size=val_size, precision=precision_name(amp_dtype))


def largest_batch(need, free_bytes, margin=BATCH_MARGIN, val_batch=None, limit=None):
    """The largest batch whose training and validation peaks fit (1 - margin) x free_bytes (validation at val_batch,
    None: the same batch), at most `limit`; None when not even one sample fits."""
    budget = (1 - margin) * free_bytes
    batch = math.floor((budget - need.train_fixed) / need.train_per_sample)
    if val_batch is None:
        batch = min(batch, math.floor((budget - need.val_fixed) / max(need.val_per_sample, 1)))
    elif need.val_fixed + val_batch * need.val_per_sample > budget:
        return None
    batch = batch if limit is None else min(batch, limit)
    return batch if batch >= 1 else None


# ----------------------------------------------------------------------------- the GPUs' peak compute, for MFU
# Dense peak TFLOP/s by card (name as torch.cuda.get_device_name reports it; the first entry whose key is in the name
# wins, so "A100" comes before "A10" and "H100 PCIe" before "H100"): the 16-bit figure is the tensor cores' fp16 (and
# bf16 where the card has it: compute capability 8.0 on) with sparsity left out, fp32 the CUDA cores'. None: the card
# has no such units (bf16 on Pascal, Volta and Turing). Each row names its source; "checked" names the copy of the
# figure read for this table.
GPU_PEAK_TFLOPS = (
    # key, fp16, bf16, fp32, source
    ("H200", 989, 989, 67, "NVIDIA H200 datasheet (1,979 sparse); checked: the H100 SXM table at glennklockwood.com"
                           "/garden/processors/h100 (FP16/BF16 matrix 989.4, FP32 66.9), the same die"),
    ("H100 PCIe", 756, 756, 51, "NVIDIA H100 datasheet, PCIe column (1,513 sparse); not checked here"),
    ("H100", 989, 989, 67, "NVIDIA H100 datasheet, SXM column (1,979 sparse); checked: "
                           "glennklockwood.com/garden/processors/h100 (989.4 dense, FP32 66.9)"),
    ("A100", 312, 312, 19.5, "NVIDIA A100 datasheet (624 sparse); checked: hmc-tech.com's L4 vs A100 page "
                             "(311.87 dense tensor, FP32 19.49)"),
    ("A10", 125, 125, 31.2, "NVIDIA A10 datasheet (250 sparse); not checked here"),
    ("L4", 121, 121, 30.3, "NVIDIA L4 datasheet (242 sparse, as quoted at grokipedia.com/page/NVIDIA_L4_vs_L40S); "
                           "hmc-tech.com computes 125.3 dense and 31.3 FP32 from a higher boost clock"),
    ("V100-SXM2", 125, None, 15.7, "NVIDIA V100 datasheet, SXM2 column; checked: developer.nvidia.com, "
                                   "'Programming Tensor Cores in CUDA 9' (up to 125 tensor TFLOPS)"),
    ("V100", 112, None, 14, "NVIDIA V100 datasheet, PCIe column; not checked here"),
    ("T4", 65, None, 8.1, "NVIDIA T4 datasheet; checked: NVIDIA's announcement as reported at geektopia.es "
                          "(65 mixed precision, 8.1 FP32) and sysrqmts.com (65.13 / 8.141)"),
    ("P100", 18.7, None, 9.3, "NVIDIA Tesla P100 PCIe datasheet (no tensor cores: fp16 at twice fp32); sysrqmts.com "
                              "computes 19.05 / 9.53 from the 1,329 MHz boost clock"),
)


def peak_tflops(device_name, precision):
    """(dense peak TFLOP/s of the card at precision 'fp16' | 'bf16' | 'fp32', its source) or (None, why)."""
    for key, fp16, bf16, fp32, source in GPU_PEAK_TFLOPS:
        if key in device_name:
            value = {"fp16": fp16, "bf16": bf16, "fp32": fp32}[precision]
            return (value, source) if value else (None, f"{key} has no {precision} units")
    return None, f"no peak table entry for {device_name!r}"
