"""What training and evaluation share: device and precision, one autocast context, the checkpoint format and
its atomic save, and the flags both scripts take (SHARED_FLAGS, add_shared_flag).

    device = resolve_device("auto")
    amp_dtype, use_scaler = resolve_amp("auto", device)
    ctx = autocast(device, amp_dtype)          # built once; `with ctx:` around every forward pass
    model, ckpt = load_model("best.pth", device)

A checkpoint is a dict written by train_CR_kaggle.py: "model" (state_dict), "model_name" and "model_config"
(enough to rebuild the network with net_CR_CrossAttention.create_model), plus the training state (optimizer,
scheduler, scaler, epoch, best_psnr, early_stop_counter, global_step, args) and "s2_product", the Sentinel-2 product
it trained on (s2_product_of; L1C where absent). Imports the model, files.py (the atomic writer, DataError),
bands.py (the products), clouds.py (the detectors' names) and torch; never the GeoTIFF layer (dataloader.py) nor
the training script, so evaluation carries no DDP or VGG and loading a checkpoint no rasterio.
"""
import contextlib
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

import bands
import clouds
import date_sampling
import net_CR_CrossAttention
import net_CR_temporal
from files import DataError, atomic_output

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CHECKPOINT_KEYS = ("model", "model_name", "model_config")
# The flags train_CR_kaggle.py and test_CR.py both take, each defined once (argparse keywords): a script adds them
# with add_shared_flag, at its place in its --help, with a note on what the flag does there, and --load_size with
# the default its script documents. --batch_sz and --crop_size mean different things in the two and stay theirs.
SHARED_FLAGS = {
    "device": dict(default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'"),
    "amp": dict(default="auto", choices=list(AMP_CHOICES),
                help="mixed precision: auto = on CUDA bf16 where the card has bf16 units (compute capability "
                     ">= 8.0: A100, A10, L4, H100), else fp16 (T4, V100, P100; training adds a GradScaler), never "
                     "emulated bf16; on CPU bf16 where the CPU has native bf16 (AVX512-BF16 or AMX), else off "
                     "(float32), since emulated bf16 is several times slower than fp32. fp16 also runs on CPU, to "
                     "test the T4's path, with slow reference convolutions (BENCHMARKS.md, 'Model training step')"),
    "data_list_filepath": dict(default=None, help="CSV list of triplets (GLF-CR 5-column or Kaggle 7-column format)"),
    "input_data_folder": dict(default=None, help="root the CSV's folders are relative to"),
    "load_size": dict(type=int, default=256, help="GLF-CR's flag: side of the image region crops are taken from"),
    "cloud_detector": dict(default="rule", choices=list(clouds.CLOUD_DETECTORS),
                           help="cloud detector: rule (the DSen2-CR rules GLF-CR uses, a soft score), s2cloudless "
                                "(the binary mask UnCRtainTS computes, best precomputed), s2cloudless_prob (its raw "
                                "probability, soft) or none"),
    "cloud_mask_dir": dict(default=None, help="read the cloud masks precomputed by `python dataloader.py masks` from "
                                              "this folder instead of running --cloud_detector on every sample"),
    "num_workers": dict(type=int, default=2, help="data loading worker processes"),
    "s2_offset": dict(type=int, default=0,
                      help="radiometric offset in DN of Sentinel-2 files whose metadata carries none: reflectance = "
                           "(DN + offset) / 10000; -1000 for products of processing baseline 04.00 and later (sensed "
                           "from 25 January 2022, and reprocessed older ones), 0 for SEN12MS-CR (2018). A file's own "
                           "RADIO_ADD_OFFSET / BOA_ADD_OFFSET tag or GDAL band offset wins (docs/data.md, 'Your own "
                           "scene')"),
    "coverage_cache": dict(default=None,
                           help="several dates (--input_t > 1): each date's cloud coverage, computed once by "
                                "`python dataloader.py coverage` (it names its detector); without it every worker "
                                "computes the coverage of the series it reads (s2cloudless: slow on real data)"),
    "date_sampler": dict(default=date_sampling.DEFAULT_SAMPLER, choices=list(date_sampling.SAMPLERS),
                         help="several dates (--input_t > 1): which dates of a series are the inputs and which the "
                              "target (date_sampling.SAMPLERS): leak_free never gives the target as an input; "
                              "published is UnCRtainTS's fixed sampler as written"),
}
_SHARED = object()  # add_shared_flag's default: SHARED_FLAGS' own


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (unreadable, truncated, or not one of ours)."""


class UsageError(Exception):
    """Flags that cannot work together or a value that cannot be used; the message says which flag to change."""


USER_ERRORS = (DataError, CheckpointError, UsageError)


def check_together(*checks):
    """Run every check (a callable) and return their results; when user errors (USER_ERRORS) occur, raise one error
    of the first one's kind whose message names them all ("A; also: B"), so a wrong data list and a wrong
    checkpoint are reported in one go, whichever is checked first."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except USER_ERRORS as e:
            results.append(None)
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise type(errors[0])("; also: ".join(str(e) for e in errors)) from None
    return results


def run_cli(main, argv=None, user_errors=()):
    """Run a script's main(argv). An expected user error (bad data, checkpoint or flags; plus the script's own
    `user_errors`) prints one line `error: ...` to stderr and returns 2, no traceback; anything else keeps its
    traceback, because it is a bug to report."""
    try:
        return main(argv)
    except USER_ERRORS + tuple(user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_shared_flag(parser, name, note=None, default=_SHARED):
    """Add --name to an argparse parser or group as SHARED_FLAGS defines it; note: what it does in the calling
    script, appended to the shared help; default: the script's own, where its help says why (--load_size)."""
    spec = {**SHARED_FLAGS[name], **({} if default is _SHARED else {"default": default})}
    if note:
        spec["help"] = f"{spec['help']}; {note}"
    parser.add_argument(f"--{name}", **spec)


def resolve_device(arg="auto"):
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' -> torch.device; a missing GPU is a clear error."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), from torch's own cpuinfo queries.
    Without them torch emulates bf16 and a training step is several times slower than fp32 (BENCHMARKS.md,
    "Model training step"), so --amp auto must not pick it there. ATen must also dispatch its AVX512 kernels
    (ATEN_CPU_CAPABILITY=avx2 turns them off)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return any(getattr(torch.cpu, query, lambda: False)() for query in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


# fp16 on a CPU: without AVX512-FP16 or AMX-FP16 (most CPUs) oneDNN takes no fp16 convolutions and ATen runs its
# reference im2col kernels (aten::_slow_conv2d_*); its cost per step: BENCHMARKS.md, "Model training step".
CPU_FP16_COST = ("fp16 convolutions run ATen's slow reference kernels on a CPU (no oneDNN fp16 path): a training "
                 "step takes about 13x the CPU time of fp32 (BENCHMARKS.md, 'Model training step')")


def cuda_card(device):
    """(name, 'major.minor') of a CUDA device, from torch's device properties."""
    props = torch.cuda.get_device_properties(device)
    return props.name, f"{props.major}.{props.minor}"


def cuda_has_native_bf16(device):
    """Whether a CUDA device computes bf16 in hardware: what torch.cuda.is_bf16_supported(including_emulation=False)
    checks (ROCm, or compute capability 8.0 or more: A100, A10, L4, H100, H200), asked of `device` rather than of
    the current device. torch's default, including_emulation=True, says yes wherever a bf16 tensor can be made,
    which is every CUDA card, and a T4 or P100 then runs bf16 in fp32 units."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def auto_amp(device):
    """(what --amp auto means on this device, why): on CUDA bf16 where the card has bf16 units, fp16 with a
    GradScaler below (T4, V100, P100), never emulated bf16; on CPU bf16 where the CPU has native bf16, else fp32
    ("off")."""
    if device.type == "cuda":
        name, capability = cuda_card(device)
        if cuda_has_native_bf16(device):
            return "bf16", f"{name}, compute capability {capability}: native bf16"
        return "fp16", f"{name}, compute capability {capability}: no bf16 units, fp16 tensor cores; GradScaler on"
    if device.type == "cpu":
        return ("bf16", "CPU with native bf16") if cpu_has_native_bf16() else ("off", "CPU without native bf16")
    return "off", f"{device.type} device"


def resolve_amp(amp, device):
    """(autocast dtype or None, whether fp16 needs a GradScaler) for --amp auto|bf16|fp16|off (auto: auto_amp).
    fp16 runs on CPU too (torch has fp16 autocast and a GradScaler there): slowly, but it is how a machine
    without a GPU exercises a T4's path."""
    if amp == "auto":
        amp = auto_amp(device)[0]
    if amp == "off":
        return None, False
    return (torch.float16, True) if amp == "fp16" else (torch.bfloat16, False)


def amp_warning(chosen, device):
    """One line saying what a forced precision costs where the hardware lacks it (None where it is fine)."""
    if chosen == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return ("warning: --amp bf16 on a CPU without native bf16 (torch emulates it): the network runs several "
                "times slower than in fp32 here (BENCHMARKS.md, 'Model training step'); --amp auto picks fp32")
    if chosen == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        name, capability = cuda_card(device)
        return (f"warning: --amp bf16 on {name} (compute capability {capability}, no bf16 units: torch emulates "
                f"it): slow; --amp auto picks fp16 with a GradScaler")
    if chosen == "fp16" and device.type == "cpu":
        return f"warning: --amp fp16 on CPU: {CPU_FP16_COST}; use it to test the fp16 path, --amp auto to train"
    return None


def describe_amp(amp, device):
    """The precision a run uses and why, for its header line: 'amp off (CPU without native bf16)', 'amp fp16 (Tesla
    T4, compute capability 7.5: no bf16 units, fp16 tensor cores; GradScaler on)', 'amp bf16 (--amp bf16)'. Plus
    a warning line where a forced precision is emulated or slow on this hardware (else None)."""
    if amp == "auto":
        chosen, why = auto_amp(device)
    else:
        chosen, why = amp, f"--amp {amp}"
    return f"amp {chosen} ({why})", amp_warning(chosen, device)


def autocast(device, dtype):
    """The one autocast context of a run (reusable: `with ctx:` as often as needed); a null context for fp32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def amp_name(dtype):
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


def save_checkpoint(state, path):
    """Write to a temp file beside `path`, then rename: a kill at any moment leaves the old file intact."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint written by train_CR_kaggle.py; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of train_CR_kaggle.py (missing {', '.join(missing)})")
    return ckpt


def model_config_of(ckpt):
    """The constructor arguments a checkpoint's network was built with, from its stored dict: ModelConfig fields
    added after it was written take the value they had then (their `older` metadata; the SAR input mode, once kept
    only in the training args, from there)."""
    config, training_args = dict(ckpt["model_config"]), ckpt.get("args") or {}
    if ckpt["model_name"] == "CrossAttention":
        for f in net_CR_CrossAttention.flag_fields():
            older = f.metadata.get("older")
            if older == "args":
                config.setdefault(f.name, training_args.get(f.name, f.default))
            elif older is not None:
                config.setdefault(f.name, older)
    else:
        config.setdefault("sar_input", training_args.get("sar_input", "on"))
    return config


def s2_product_of(ckpt):
    """The Sentinel-2 product (bands.S2_PRODUCTS) a checkpoint was trained on: its "s2_product", else its training
    args', else L1C (checkpoints written before the choice existed trained on SEN12MS-CR)."""
    return ckpt.get("s2_product") or (ckpt.get("args") or {}).get("s2_product") or bands.DEFAULT_S2_PRODUCT


def checkpoints_s2_product(ckpts, paths):
    """The one product of one checkpoint or of an ensemble's; CheckpointError where members differ."""
    ckpts = ckpts if isinstance(ckpts, list) else [ckpts]
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    products = [s2_product_of(c) for c in ckpts]
    if len(set(products)) > 1:
        named = ", ".join(f"{p} ({product})" for p, product in zip(paths, products))
        raise CheckpointError(f"the ensemble's members were trained on different Sentinel-2 products: {named}")
    return products[0]


def untested_without_sar(model):
    """The warning line for a model run without radar that never trained without it (None where it did: trained
    with --sar_dropout, or with --sar_input zeros; an ensemble warns if any member never did)."""
    members = getattr(model, "members", [model])
    untested = [m for m in members if m.sar_input == "on" and not getattr(m.config, "sar_dropout", 0)]
    if not untested:
        return None
    return ("warning: no radar given, and this model never trained without radar (--sar_dropout 0): it sees zeros "
            "for the radar and its prediction is untested; train with --sar_dropout for a model that is")


def build_model_from_checkpoint(ckpt, path="<checkpoint>"):
    """Rebuild the network a checkpoint was trained with and load its weights."""
    try:
        model = net_CR_temporal.create_model(ckpt["model_name"], **model_config_of(ckpt))  # input_t > 1: a series
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not match model {ckpt.get('model_name')!r}: {e}") from e
    return model


def load_model(path, device):
    """(model in eval mode on device, checkpoint dict); CheckpointError naming the file on any problem."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model = build_model_from_checkpoint(ckpt, path)
    return model.to(device).eval(), ckpt


def load_models(paths, device):
    """One checkpoint: (its model, its checkpoint dict), as load_model. Several: (an Ensemble of
    their models, [checkpoint dicts]): the mean prediction and the members' spread (docs/uncertainty.md)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1:
        return load_model(paths[0], device)
    loaded = [load_model(path, device) for path in paths]
    return Ensemble([m for m, _ in loaded]).eval(), [c for _, c in loaded]


class Ensemble(nn.Module):
    """Several trained networks as one: the mean of their predictions, and the parts of its uncertainty.

    forward(optical, sar, return_aux=True) -> (mean prediction, ModelOutputs) with log_variance the log of the members'
    mean predicted variance (the aleatoric part; None unless every member has an uncertainty head),
    epistemic_variance the variance of the members' predictions around their mean (their spread), confidence the
    mean confidence map (None unless every member has one) and members their number. The predictive variance of the
    mixture is the sum of the two parts (Lakshminarayanan et al., NeurIPS 2017; UnCRtainTS's
    model/ensemble_reconstruct.py combines its members the same way).
    """

    model_name = "Ensemble"

    def __init__(self, members):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        dates = {net_CR_temporal.input_t_of(m) for m in members}
        if len(dates) > 1:
            raise ValueError(f"an ensemble's members must take the same number of dates, got input_t {sorted(dates)}")
        self.input_t = dates.pop()
        self.sar_input = ",".join(sorted({m.sar_input for m in members}))
        self.config = {"members": [asdict(m.config) for m in members], "sar_input": self.sar_input}

    def forward(self, optical, sar, return_aux=False):
        outputs = [m(optical, sar, return_aux=True) for m in self.members]
        with torch.autocast(device_type=optical.device.type, enabled=False):
            predictions = torch.stack([p.float() for p, _ in outputs])
            prediction = predictions.mean(0)
            if not return_aux:
                return prediction
            stacked = {}
            for key in ("confidence", "log_variance"):
                parts = [getattr(a, key) for _, a in outputs]
                stacked[key] = None if any(p is None for p in parts) else torch.stack([p.float() for p in parts])
            confidence, log_variance = stacked["confidence"], stacked["log_variance"]
            confidence = None if confidence is None else confidence.mean(0)
            if log_variance is not None:  # log of the mean variance, without leaving log space
                log_variance = torch.logsumexp(log_variance, 0) - math.log(len(outputs))
        return prediction, net_CR_CrossAttention.ModelOutputs(
            confidence=confidence, log_variance=log_variance,
            epistemic_variance=predictions.var(0, unbiased=False), members=len(outputs))
