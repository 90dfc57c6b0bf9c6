"""Memory known before a run (sizing.py), --batch_sz auto and --dry_run: CUDA's facts (free memory, the card's name)
patched, the count left to decide."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny, torchrun_two_processes

import losses
import net_CR_CrossAttention
import runtime
import sizing
import train_CR_kaggle as train
import training
import training_setup

MEASURED_H100_EAGER_MIB = 24419  # BENCHMARKS.md, "GPU": default network, L1, bf16, 256 px, batch 32, eager


def l1_args():
    """The training flags of the H100 row's loss set: L1 alone (benchmark.py train's `l1` preset)."""
    return train.build_parser().parse_args(losses.preset_flags("l1"))


def test_the_count_runs_group_norm_in_float32_as_cuda_autocast_does():
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 2).dtype == torch.bfloat16  # CPU autocast leaves it in 16 bits
        with sizing.CudaAutocastPolicy():
            assert F.group_norm(x, 2).dtype == torch.float32
            assert F.conv2d(x, torch.randn(8, 8, 1, 1)).dtype == torch.bfloat16  # the low-precision list is CPU's own
    with sizing.CudaAutocastPolicy():
        assert F.group_norm(x, 2).dtype == torch.bfloat16  # outside autocast nothing changes


@pytest.mark.slow
def test_per_sample_memory_grows_with_the_pixels_and_shrinks_a_little_in_16_bits():
    fp32 = {size: sizing.footprint("CrossAttention", {}, l1_args(), size, size, None) for size in (32, 64)}
    assert 3.5 < fp32[64].train_per_sample / fp32[32].train_per_sample < 4.5
    half = sizing.footprint("CrossAttention", {}, l1_args(), 64, 64, torch.float16)
    # not one half: CUDA autocast keeps the normalisations in float32, and the network has one after every conv
    assert 0.5 < half.train_per_sample / fp32[64].train_per_sample < 0.95
    params = sum(p.numel() for p in net_CR_CrossAttention.create_model().parameters())
    # weights, gradients and AdamW's two moments, in float32
    assert 4 * 4 * params < fp32[32].train_fixed < 4 * 4 * params * 1.3


@pytest.mark.slow
def test_the_count_matches_the_h100_measurement():
    need = sizing.footprint("CrossAttention", {}, l1_args(), 256, 256, torch.bfloat16)
    estimate = need.bytes_for(32) / 2**20
    assert abs(estimate / MEASURED_H100_EAGER_MIB - 1) < 0.05, estimate


def test_largest_batch_keeps_the_margin_and_the_validation_peak():
    need = sizing.Footprint(train_fixed=1000, train_per_sample=100, val_fixed=1000, val_per_sample=50, crop=128,
                            val_size=256, precision="fp16")
    assert sizing.largest_batch(need, 2000, margin=0.0) == 10
    assert sizing.largest_batch(need, 2000, margin=0.15) == 7   # 1700 bytes usable
    assert sizing.largest_batch(need, 2000, margin=0.0, limit=4) == 4
    need.val_per_sample = 200
    assert sizing.largest_batch(need, 2000, margin=0.0) == 5    # validation is the tighter one now
    assert sizing.largest_batch(need, 2000, margin=0.0, val_batch=1) == 10
    assert sizing.largest_batch(need, 1050, margin=0.0) is None


@pytest.mark.parametrize("name, precision, peak", [
    ("Tesla T4", "fp16", 65), ("Tesla T4", "bf16", None), ("Tesla P100-PCIE-16GB", "fp32", 9.3),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A10", "bf16", 125), ("NVIDIA H100 80GB HBM3", "bf16", 989),
    ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H200", "fp16", 989), ("NVIDIA L4", "bf16", 121),
    ("Tesla V100-SXM2-16GB", "fp16", 125), ("Tesla V100-PCIE-16GB", "fp16", 112), ("Radeon", "fp16", None)])
def test_peak_table_names_the_card_and_its_source(name, precision, peak):
    value, source = sizing.peak_tflops(name, precision)
    assert value == peak and source


def cuda_run(monkeypatch, free_bytes, *flags):
    """A Run on 'cuda' (the model on CPU: the count never touches the device) with CUDA's answers patched: a T4."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 15_835_398_144))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    args = train.build_parser().parse_args(["--batch_sz", "auto", "--crop_size", "32", "--load_size", "32",
                                            "--perceptual_weight", "0", *flags])
    run = training.Run(args=args, argv=[], device=torch.device("cuda"), amp_dtype=torch.float16)
    run.model = net_CR_CrossAttention.create_model()
    training_setup.resolve_losses(args, run.model)
    return run


@pytest.mark.slow
def test_batch_sz_auto_on_a_gpu_takes_the_largest_batch_that_fits(monkeypatch):
    counted = {}
    count = sizing.footprint  # the real count, made once: every run below has the same network, losses and sizes

    def count_once(*args):
        return counted.setdefault("need", count(*args))
    monkeypatch.setattr(sizing, "footprint", count_once)
    probe = cuda_run(monkeypatch, 0)
    need = sizing.footprint("CrossAttention", {}, probe.args, 32, 32, torch.float16)
    just_enough = need.bytes_for(9) / (1 - sizing.BATCH_MARGIN) + 1
    batch, text = training_setup.resolve_batch(cuda_run(monkeypatch, just_enough), n_train=100)
    assert batch == 9
    assert text.startswith("batch 9 (auto: ") and "on Tesla T4" in text and "at 32 px fp16, 15 % margin" in text
    assert training_setup.resolve_batch(cuda_run(monkeypatch, just_enough - 2), 100)[0] == 8  # one byte short
    # no larger than the data
    assert training_setup.resolve_batch(cuda_run(monkeypatch, just_enough), n_train=5)[0] == 5
    with pytest.raises(runtime.UsageError, match="not even one sample fits"):
        training_setup.resolve_batch(cuda_run(monkeypatch, need.bytes_for(1) / 2), 100)


def test_batch_sz_takes_a_number_or_auto():
    assert train.build_parser().parse_args([]).batch_sz == 6  # the design's
    assert train.build_parser().parse_args(["--batch_sz", "3"]).batch_sz == 3
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--batch_sz", "many"])


@pytest.mark.slow
def test_batch_sz_auto_on_cpu_is_the_design_batch_and_args_json_keeps_the_number(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    run = training.setup(train.build_parser().parse_args(tiny(csv_path, root, tmp_path, "--batch_sz", "auto")))
    run.writer.close()
    assert run.args.batch_sz == run.train_loader.batch_size == training_setup.DESIGN_BATCH
    assert json.loads((run.dir / "args.json").read_text())["batch_sz"] == training_setup.DESIGN_BATCH
    assert run.batch_text == "batch 6 (auto: the design's batch on cpu, where memory is not the limit)"


PLAN_FIELDS = ("device", "compute capability", "model", "data", "precision", "compile", "layout", "batch", "speed",
               "peak memory", "FLOPs", "MFU", "epoch", "time limit")


def plan_of(stdout):
    lines = stdout[stdout.index("dry run: nothing written"):].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  "))


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(synthetic_dataset, tmp_path, capsys):
    root, csv_path = synthetic_dataset
    save_dir = tmp_path / "checkpoints"
    assert train.main(tiny(csv_path, root, save_dir, "--dry_run", "--time_limit", "0.05", "--amp", "auto")) == 0
    plan = plan_of(capsys.readouterr().out)
    assert tuple(plan) == PLAN_FIELDS
    assert plan["device"].startswith("cpu: ") and "CPU capability" in plan["compute capability"]
    assert plan["batch"] == "batch 2 (--batch_sz) per process, 1 process"
    assert float(plan["speed"].split()[0]) > 0 and "3 steps" in plan["speed"]
    assert "peak resident memory" in plan["peak memory"] and "counted for a GPU" in plan["peak memory"]
    assert plan["MFU"] == "no peak table for CPUs" and "VGG" in plan["FLOPs"]
    assert plan["time limit"].endswith("of the 1 epochs left fit --time_limit 0.05 h")
    assert not save_dir.exists()


@pytest.mark.slow
def test_dry_run_under_torchrun_prints_one_plan(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    flags = tiny(csv_path, root, tmp_path / "checkpoints", "--device", "cpu", "--perceptual_weight", "0", "--dry_run")
    flags.remove("--use_contrastive_loss")
    proc = torchrun_two_processes(flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("dry run: nothing written") == 1
    assert plan_of(proc.stdout)["batch"] == "batch 2 (--batch_sz) per process, 2 processes"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_the_count_matches_this_gpu(dtype):
    """On a GPU: the count of a step of the default network with the design's losses (random VGG) against
    torch.cuda.max_memory_allocated of the same step, batch 4 at 128 px; within 15 % (the margin)."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is emulated below compute capability 8.0")
    args = train.build_parser().parse_args(losses.preset_flags("design") + ["--vgg_weights", "random"])
    need = sizing.footprint("CrossAttention", {}, args, 128, 128, dtype)
    device = torch.device("cuda")
    model = net_CR_CrossAttention.create_model().to(device)
    criterion = losses.build_criterion(args, vgg_dtype=dtype, model=model.config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cloudy, target, sar = (torch.rand(4, c, 128, 128, device=device) for c in (13, 13, 2))
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            prediction, aux = model(cloudy, sar, return_aux=True)
        total, _ = criterion(prediction, target, cloudy, cloud_mask=cloudy[:, :1], confidence_target=cloudy[:, :1],
                             aux=aux)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    measured = torch.cuda.max_memory_allocated()  # the inputs are in both
    counted = need.train_fixed + 4 * need.train_per_sample
    assert abs(counted / measured - 1) < sizing.BATCH_MARGIN, (counted / 2**20, measured / 2**20)
