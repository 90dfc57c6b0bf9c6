"""benchmark.py times the product: training.train_step on batches put on the device by its to_device, with the
loss presets of losses.py; every learn variant is flags the training script accepts."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import bench_learn
import bench_loop
import bench_step
import losses
import net_CR_CrossAttention as net
import train_CR_kaggle
import training

ROOT = Path(__file__).resolve().parents[1]


def _losses_of(flags):
    """The losses the training script builds its criterion from, given these flags, for the default model."""
    args = train_CR_kaggle.build_parser().parse_args(flags)
    return losses.resolve(losses.given_flags(args), net.ModelConfig()), args.vgg_weights


@pytest.mark.parametrize("variant", list(bench_learn.LEARN_VARIANTS))
def test_every_learn_variant_is_flags_the_training_script_accepts(variant):
    for vgg_weights in (None, "vgg19.pth"):
        flags = bench_learn._learn_loss_flags(variant, vgg_weights) + bench_learn.learn_variant_flags(variant)
        train_CR_kaggle.build_parser().parse_args(flags)  # an unknown flag exits here


def test_learn_runs_train_in_one_fixed_memory_layout():
    """Under bf16 the layout changes the arithmetic; a learn run must not leave it to --channels_last auto's timing."""
    parser = argparse.ArgumentParser()
    bench_learn._add_learn_args(parser)
    args = bench_learn.resolve_learn_setting(parser.parse_args([]))
    parsed = train_CR_kaggle.build_parser().parse_args(
        bench_learn.learn_train_flags("full", 0, args, Path("data/data.csv"), Path("out")))
    assert parsed.channels_last == "on" and parsed.seed == 0 and parsed.crop_size == args.size
    args.extra = "--channels_last off"  # --extra still wins
    assert train_CR_kaggle.build_parser().parse_args(
        bench_learn.learn_train_flags("full", 0, args, Path("data/data.csv"), Path("out"))).channels_last == "off"


def test_learn_loss_sets_are_the_design_presets():
    full, _ = _losses_of(bench_learn._learn_loss_flags("full", None))
    assert full == losses.resolve(losses.loss_options("design_no_vgg"), net.ModelConfig())
    assert full.enabled == {"cloud_focused": 1.0, "fft": 0.3, "gradient": 0.2, "confidence": 0.5, "residual": 0.5}
    plain_l1, _ = _losses_of(bench_learn._learn_loss_flags("no_cloud_focused_loss", None))
    assert plain_l1.weights == {**full.weights, "cloud_focused": 0.0, "l1": 1.0}
    with_vgg, vgg_weights = _losses_of(bench_learn._learn_loss_flags("full", "vgg19.pth"))
    assert with_vgg == losses.resolve(losses.loss_options("design"), net.ModelConfig()) and vgg_weights == "vgg19.pth"
    design, _ = _losses_of(bench_learn._learn_loss_flags("design", None) + bench_learn.learn_variant_flags("design"))
    assert design.weights["confidence"] == design.weights["residual"] == 0  # the design's losses, nothing added


def test_timed_steps_are_the_training_step():
    """The bare step of `benchmark.py loop` (and the steps `loss` and `train` time) is training.train_step on
    a batch already on the device; it trains the model and leaves the loop's step count alone."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4)
    run = bench_step.step_run(model, losses.CRLoss(**losses.loss_options("l1")), device, "off", channels_last=False)
    batch = bench_step.random_batch(2, 16, device, channels_last=False)
    before = [p.detach().clone() for p in model.parameters()]
    with mock.patch.object(training, "train_step", wraps=training.train_step) as step:
        seconds = bench_loop._bare_steps(run, batch, 2, lambda: None)
    assert step.call_count == 2 and all(call.args == (run, batch) for call in step.call_args_list)
    assert seconds > 0 and run.global_step == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _run_benchmark(tmp_path, *argv):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "benchmark.py", *argv, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]  # stderr's end says why, which check=True would not show
    return json.loads(out.read_text())


@pytest.mark.slow
def test_loss_benchmark_times_the_presets_in_the_training_step(tmp_path):
    figures = _run_benchmark(tmp_path, "loss", "--size", "32", "--batch", "1", "--steps", "1", "--threads", "1")
    assert list(figures["step_s"]) == ["L1 only", "no VGG terms", "full, VGG fp32", "full, VGG AMP",
                                       "full, VGG AMP, NHWC"]
    assert all(t > 0 for t in figures["step_s"].values())


@pytest.mark.slow
def test_train_benchmark_times_the_training_step_in_a_fresh_process(tmp_path):
    figures = _run_benchmark(tmp_path, "train", "--device", "cpu", "--sizes", "32", "--batch", "1", "--precision",
                             "bf16", "fp16", "--attention", "fused", "--channels_last", "on", "--steps", "1",
                             "--threads", "1")
    assert [row["precision"] for row in figures["rows"]] == ["bf16", "fp16"]  # fp16 timed on CPU when asked for
    for row in figures["rows"]:
        assert "skipped" not in row, row["skipped"]
        assert row["samples_per_s"] > 0


def test_learn_rows_average_each_true_cloud_bin_over_seeds(capsys):
    def run(seed, clear, thin):
        figures = {"all": {"PSNR": 30.0, "SSIM": 0.9, "SAM": 5.0}, "cloudy": {"PSNR": 25.0}}
        return {"seed": seed, "train_s": 10.0, "model": figures, "identity": figures, "confidence": None,
                "clear_change": 0.0, "truth_bins": {
                    "clear": {"pixels": 100, "PSNR_model": clear, "PSNR_identity": 50.0},
                    "opacity 0.05-0.3": {"pixels": 0 if thin is None else 7, "PSNR_model": thin,
                                         "PSNR_identity": thin and 20.0}}}
    row = bench_learn._learn_row("full", [run(0, 40.0, 30.0), run(1, 42.0, 32.0)])
    assert row["truth_bins"] == {"clear": 41.0, "opacity 0.05-0.3": 31.0}
    assert bench_learn._learn_row("full", [run(0, 40.0, None)])["truth_bins"]["opacity 0.05-0.3"] is None
    # a run without true cloud maps (real data): no bins for the variant
    assert bench_learn._learn_row("full", [{**run(0, 40.0, 30.0), "truth_bins": None}])["truth_bins"] is None
    bench_learn._print_truth_bins([row], [run(0, 40.0, 30.0)])
    out = capsys.readouterr().out
    assert "41.00" in out and "31.00" in out and "50.00" in out and "PSNR by true cloud" in out
    # a first variant without true cloud maps (the time series' single-date list) beside one with them
    no_maps = bench_learn._learn_row("ts_1_date", [{**run(0, 40.0, 30.0), "truth_bins": None}])
    bench_learn._print_truth_bins([no_maps, row], [{**run(0, 40.0, 30.0), "truth_bins": None}, run(0, 40.0, 30.0)])
    out = capsys.readouterr().out
    assert "41.00" in out and "50.00" in out and "ts_1_date" not in out
