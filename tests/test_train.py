"""train_CR_kaggle.py end to end on tiny synthetic data (crops of 32 px, 1-2 epochs)."""
import argparse
import csv
import dataclasses
import math
import os
import shlex
import socket
import subprocess
import sys
import typing
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import files
import losses
import runtime
import train_CR_kaggle as train
import training
import training_setup

ROOT = Path(__file__).resolve().parents[1]

# The design's command, flag for flag, with the data and run paths swapped for test fixtures.
DESIGN_FLAGS = (
    "--model_name CrossAttention --max_epochs 30 --batch_sz 6 --lr 1e-4 --weight_decay 1e-5 "
    "--lr_scheduler plateau --lr_patience 5 --early_stop_patience 10 --grad_clip 1.0 --warmup_epochs 2 "
    "--use_cross_attn --use_fft_loss --fft_weight 0.3 --use_gradient_loss --gradient_weight 0.2 "
    "--use_contrastive_loss --contrastive_weight 0.1 --perceptual_weight 0.5 --l1_weight 1.0 "
    "--use_cloud_focused_loss --cloud_weight_factor 2.5 --experiment_name glf_cr_enhanced_v3 "
    "--train_from_scratch"
).split() + ["--notes", "Enhanced: Spectral attention + cloud-aware weighting + focused loss"]


def tiny(csv_path, root, save_dir, *extra, epochs=1):
    """Flags for a seconds-long run; later flags override earlier ones (argparse keeps the last)."""
    return [*DESIGN_FLAGS, "--data_list_filepath", str(csv_path), "--input_data_folder", str(root),
            "--save_model_dir", str(save_dir), "--max_epochs", str(epochs), "--batch_sz", "2",
            "--load_size", "64", "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0",
            "--vgg_weights", "random", "--amp", "off", "--warmup_epochs", "0.5", "--num_quicklooks", "2",
            *extra]


def test_design_command_parses_unchanged():
    args = train.build_parser().parse_args(DESIGN_FLAGS + [
        "--data_list_filepath", "/kaggle/working/data.csv", "--input_data_folder", "/kaggle/input/image1",
        "--save_model_dir", "/kaggle/working/checkpoints"])
    assert args.use_cross_attn and args.use_cloud_focused_loss and args.cloud_weight_factor == 2.5
    assert args.batch_sz == 6 and args.lr_scheduler == "plateau" and args.warmup_epochs == 2


@pytest.mark.slow
def test_full_design_flags_train_end_to_end(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    for name in ("last.pth", "best.pth", "history.csv", "args.json"):
        assert (run / name).is_file(), name
    ckpt = runtime.load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == "CrossAttention"
    assert ckpt["args"]["notes"].startswith("Enhanced")
    model = runtime.build_model_from_checkpoint(ckpt)  # no architecture flags needed
    assert asdict(model.config) == ckpt["model_config"]
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 1 and float(rows[0]["val_PSNR"]) > 0

    # TensorBoard: read the scalars back with tensorboard's own event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/psnr", "train/samples_per_s", "val/PSNR",
                "val/SSIM", "val/SAM", "val/MAE", "val/RMSE", "train/loss_cloud_focused", "train/loss_perceptual",
                "train/loss_fft", "train/loss_gradient", "train/loss_contrastive"}
    assert expected <= tags, expected - tags
    assert acc.Tags()["images"], "no quicklook image logged"


@pytest.mark.slow
def test_resume_continues_epoch_and_optimizer_state(synthetic_dataset, tmp_path, monkeypatch):
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path, epochs=1)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    first = runtime.load_checkpoint(run / "last.pth")
    assert first["channels_last"] in (True, False)  # the layout --channels_last auto chose, recorded
    # the resumed run keeps that layout without timing the two again
    monkeypatch.setattr(training_setup, "step_seconds",
                        lambda *a, **k: pytest.fail("the resumed run probed the layouts"))

    # Resume (no --train_from_scratch) to epoch 2, and check the state it starts from is the saved one.
    args = [a for a in tiny(csv_path, root, tmp_path, epochs=2) if a != "--train_from_scratch"]
    seen = {}
    real_load = runtime.load_checkpoint

    def spy(path, map_location="cpu"):
        seen["path"] = Path(path)
        return real_load(path, map_location)

    runtime.load_checkpoint = spy
    try:
        assert train.main(args) == 0
    finally:
        runtime.load_checkpoint = real_load
    assert seen["path"] == run / "last.pth"
    second = runtime.load_checkpoint(run / "last.pth")
    assert second["epoch"] == 2 and second["global_step"] > first["global_step"]
    assert second["channels_last"] == first["channels_last"]
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    # The optimizer rebuilt from the checkpoint holds exactly the saved state.
    model = runtime.build_model_from_checkpoint(first)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    opt.load_state_dict(first["optimizer"])
    restored = opt.state_dict()
    for key, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][key][name]), torch.as_tensor(value))
    assert restored["param_groups"][0]["lr"] == first["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.slow
def test_train_from_scratch_moves_old_run_aside(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path, "--max_epochs", "1")) == 0
    assert train.main(tiny(csv_path, root, tmp_path, "--max_epochs", "1")) == 0
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert "glf_cr_enhanced_v3" in kept and any(n.startswith("glf_cr_enhanced_v3.") for n in kept)
    old = next(p for p in tmp_path.iterdir() if p.name.startswith("glf_cr_enhanced_v3."))
    assert (old / "last.pth").is_file()


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    runtime.save_checkpoint({"model": {"w": torch.ones(3)}, "model_name": "x", "model_config": {}}, path)

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(runtime.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"], "temp file left behind"


def test_corrupt_checkpoint_gives_named_error(tmp_path):
    bad = tmp_path / "last.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(runtime.CheckpointError, match="last.pth"):
        runtime.load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(runtime.CheckpointError, match="not a checkpoint"):
        runtime.load_checkpoint(bad)


@pytest.mark.slow
def test_bad_data_list_fails_before_training(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    broken = tmp_path / "broken.csv"
    lines = Path(csv_path).read_text().splitlines()
    broken.write_text("\n".join(lines[:3] + ["1,only,three"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.csv.*4|line 4"):
        train.main(tiny(broken, root, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pth"))

    no_val = tmp_path / "no_val.csv"
    no_val.write_text("\n".join(line for line in lines if not line.startswith("2,")) + "\n")
    with pytest.raises(ValueError, match=r"no_val\.csv.*split 2"):
        train.main(tiny(no_val, root, tmp_path / "out"))

    missing = tmp_path / "missing.csv"
    rows = Path(csv_path).read_text().splitlines()
    rows[-1] = rows[-1].replace(".tif", "_gone.tif")
    missing.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="_gone.tif"):
        train.main(tiny(missing, root, tmp_path / "out2"))


@pytest.mark.slow
def test_non_finite_loss_skips_then_aborts(synthetic_dataset, tmp_path, monkeypatch):
    import losses
    root, csv_path = synthetic_dataset
    real_forward = losses.CRLoss.forward

    def nan_loss(self, *a, **k):
        total, terms = real_forward(self, *a, **k)
        return total * float("nan"), terms

    monkeypatch.setattr(losses.CRLoss, "forward", nan_loss)
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(FloatingPointError, match="consecutive"):
        train.main(tiny(csv_path, root, tmp_path, "--max_bad_steps", "2"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_processes(train_flags):
    """train_CR_kaggle.py under `torchrun --nproc_per_node=2` on this machine (gloo on CPU); the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "train_CR_kaggle.py"), *train_flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    flags = tiny(csv_path, root, tmp_path, "--device", "cpu", "--perceptual_weight", "0")
    flags.remove("--use_contrastive_loss")
    proc = torchrun_two_processes(flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "glf_cr_enhanced_v3"
    files = sorted(p.name for p in run.iterdir())
    assert files == ["args.json", "best.pth", "history.csv", "last.pth", "tensorboard"], files
    assert len(list((run / "tensorboard").iterdir())) == 1, "only rank 0 may write TensorBoard events"
    assert proc.stdout.count("done: best validation PSNR") == 1
    ckpt = runtime.load_checkpoint(run / "last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.slow
def test_sigterm_saves_resumable_checkpoint(synthetic_dataset, tmp_path):
    import signal
    import time
    root, csv_path = synthetic_dataset
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_CR_kaggle.py"),
                             *tiny(csv_path, root, tmp_path, "--perceptual_weight", "0", epochs=500)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "glf_cr_enhanced_v3" / "last.pth"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no epoch finished"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    assert "resumable checkpoint saved" in out
    ckpt = runtime.load_checkpoint(last)
    assert 1 <= ckpt["epoch"] < 500
    assert not [p for p in last.parent.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_confidence_weight_needs_a_confidence_map(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    with pytest.raises(runtime.UsageError, match="confidence"):
        train.main(tiny(csv_path, root, tmp_path, "--no-use_cloud_predictor", "--confidence_weight", "0.1"))
    assert not list(tmp_path.iterdir()), "a run that fails before its first step leaves no run folder"


# ----------------------------------------------------------------------------- the loop: device-side figures

def test_run_fields_are_typed():
    """Every field of training.Run names its type (resolvable: a misspelt name fails here), none just `object`."""
    from torch.utils.tensorboard import SummaryWriter  # imported by setup_logging only when a run logs
    hints = typing.get_type_hints(training.Run, localns={"SummaryWriter": SummaryWriter})
    assert set(hints) == {f.name for f in dataclasses.fields(training.Run)}
    untyped = {name for name, hint in hints.items() if hint is object or object in typing.get_args(hint)}
    assert not untyped, untyped
    assert typing.get_args(hints["criterion"]) == (losses.CRLoss, type(None))


def _setup(csv_path, root, save_dir, *extra):
    args = train.build_parser().parse_args(tiny(csv_path, root, save_dir, *extra))
    return training.setup(args)


def _close(run):
    if run.writer is not None:
        run.writer.close()


def test_uint16_batches_normalised_on_the_device_equal_the_float_path(synthetic_dataset):
    from torch.utils.data import default_collate

    import datalist
    import dataloader
    root, csv_path = synthetic_dataset
    rows = datalist.select_split(datalist.read_data_list(csv_path), "train")
    as_float, as_uint16 = (dataloader.SEN12MSCRDataset(rows, root, crop_size=32, load_size=64, s2_encoding=e)
                           for e in ("float", "uint16"))
    float_batch = default_collate([as_float[i] for i in range(3)])
    uint16_batch = default_collate([as_uint16[i] for i in range(3)])
    assert uint16_batch["cloudy_data"].dtype == torch.uint16 and uint16_batch["cloudfree_data"].dtype == torch.uint16
    on_device = training.to_device(uint16_batch, torch.device("cpu"))
    for key in training.BATCH_KEYS:  # bit for bit, the cloud mask included (computed in the worker from float S2)
        assert on_device[key].dtype == torch.float32 and torch.equal(on_device[key], float_batch[key]), key
    with pytest.raises(ValueError, match="s2_encoding"):
        dataloader.SEN12MSCRDataset(rows, root, s2_encoding="int8")


@pytest.mark.slow
def test_a_training_step_makes_no_host_read(synthetic_dataset, tmp_path, monkeypatch):
    """train_step leaves every figure on the device: any .item()/float()/bool()/tolist() in it would fail here."""
    root, csv_path = synthetic_dataset
    run = _setup(csv_path, root, tmp_path, "--amp", "bf16")
    batch = next(iter(run.train_loader))
    training.train_step(run, batch)  # first call outside the trap (lazy allocations)

    def host_read(*a, **k):
        raise AssertionError("host read inside train_step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    figures, skipped = training.train_step(run, batch)
    run.meter.add(figures, skipped)
    monkeypatch.undo()
    _close(run)
    read = run.meter.read()
    assert read["taken"] == 1 and read["skipped"] == 0 and math.isfinite(read["means"]["loss"])
    assert set(read["means"]) == {"loss", "psnr", "grad_norm", "cloud_focused", "perceptual", "fft", "gradient",
                                  "contrastive", "confidence", "residual"}


@pytest.mark.slow
def test_figures_are_read_every_log_every_steps(synthetic_dataset, tmp_path, monkeypatch):
    root, csv_path = synthetic_dataset
    run = _setup(csv_path, root, tmp_path, "--log_every", "2", "--batch_sz", "1", "--perceptual_weight", "0")
    reads = []
    real_read = training.StepMeter.read
    monkeypatch.setattr(training.StepMeter, "read", lambda self: reads.append(run.global_step) or real_read(self))
    stats = training.train_one_epoch(run, 0)
    _close(run)
    steps = len(run.train_loader)
    assert reads == sorted({*range(2, steps + 1, 2), steps}), (reads, steps)  # every 2 steps and at the end
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0


@pytest.mark.slow
def test_the_next_epochs_batches_are_requested_before_validation(synthetic_dataset, tmp_path, monkeypatch):
    """Creating the epoch's iterator sends the loader workers their first indices, so asking for it at the end of
    train_one_epoch lets them load while validation runs; the next epoch then uses that iterator."""
    root, csv_path = synthetic_dataset
    run = _setup(csv_path, root, tmp_path, "--perceptual_weight", "0", "--max_epochs", "2")
    requested = []
    real_start = training.start_epoch_batches
    monkeypatch.setattr(training, "start_epoch_batches",
                        lambda r, epoch: requested.append((epoch, r.global_step)) or real_start(r, epoch))
    steps = len(run.train_loader)
    training.train_one_epoch(run, 0)
    assert requested == [(0, 0), (1, steps)] and run.next_batches is not None
    training.validate(run)
    training.train_one_epoch(run, 1)
    _close(run)
    assert requested == [(0, 0), (1, steps)], "epoch 2 must use the iterator asked for before validation"
    assert run.global_step == 2 * steps and run.next_batches is None  # nothing asked for after the last epoch


@pytest.mark.slow
def test_a_non_finite_step_leaves_the_weights_alone(synthetic_dataset, tmp_path, monkeypatch):
    import losses
    root, csv_path = synthetic_dataset
    run = _setup(csv_path, root, tmp_path, "--perceptual_weight", "0")
    batch = next(iter(run.train_loader))
    real_forward = losses.CRLoss.forward
    calls = []

    def nan_first(self, *a, **k):
        total, terms = real_forward(self, *a, **k)
        calls.append(1)
        return (total * float("nan") if len(calls) == 1 else total), terms

    monkeypatch.setattr(losses.CRLoss, "forward", nan_first)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    figures, skipped = training.train_step(run, batch)
    assert skipped.item() == 1
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items()), "skipped step moved weights"
    training.train_step(run, batch)
    _close(run)
    assert not all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    steps = {float(s["step"]) for s in run.optimizer.state_dict()["state"].values()}
    assert steps == {1.0}, "the skipped step must not count in AdamW's bias correction"


def _fp16_flags(csv_path, root, save_dir, epochs):
    """The default network, the design's loss set (random VGG) and the uncertainty head, in fp16 autocast with a
    GradScaler (the T4's path) on 16 px crops; the layout pinned, so no fp16 timing probe runs at start-up."""
    import losses
    return tiny(csv_path, root, save_dir, *losses.preset_flags("design", vgg_weights="random"),
                "--use_uncertainty_head", "--amp", "fp16", "--channels_last", "on", "--crop_size", "16",
                "--val_crop_size", "16", epochs=epochs)


def _watch_scaler(monkeypatch):
    """[(loss was non-finite, scale after the step)] per optimizer step, and the scaler state a resumed run starts
    from: spies around the real optimizer_step and restore."""
    steps, restored = [], {}
    real_step, real_restore = training.optimizer_step, training_setup.restore

    def step(run, skip):
        real_step(run, skip)
        steps.append((skip.item(), run.scaler.get_scale()))

    def restore(run, ckpt):
        real_restore(run, ckpt)
        restored.update(run.scaler.state_dict())

    monkeypatch.setattr(training, "optimizer_step", step)
    monkeypatch.setattr(training_setup, "restore", restore)
    return steps, restored


def _calibration_then_clean(scales, start):
    """How many steps the scaler backed off from `start` before its first taken step; and that it never backed
    off after that (a back-off is a skipped step)."""
    backoffs = 0
    while backoffs < len(scales) and scales[backoffs] < (scales[backoffs - 1] if backoffs else start):
        backoffs += 1
    later = [start] + scales
    assert all(later[i + 1] >= later[i] for i in range(backoffs + 1, len(later) - 1)), scales
    return backoffs


@pytest.mark.slow
def test_fp16_with_a_grad_scaler_trains_the_default_network_and_resumes(synthetic_dataset, tmp_path, monkeypatch):
    """What --amp fp16 runs on a T4, trained on CPU: the GradScaler calibrates (backs off from its initial scale),
    then no step is skipped and every loss is finite; a resumed run starts from the saved scale and growth
    tracker, so it does not calibrate again."""
    import warnings
    root, csv_path = synthetic_dataset
    steps, restored = _watch_scaler(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(_fp16_flags(csv_path, root, tmp_path, epochs=3)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    first = runtime.load_checkpoint(run / "last.pth")
    assert first["args"]["amp"] == "fp16" and first["model_config"]["use_uncertainty_head"]
    init_scale = torch.amp.GradScaler("cpu").get_scale()
    assert _calibration_then_clean([s for _, s in steps], init_scale) >= 1, steps
    assert first["scaler"]["scale"] == steps[-1][1] < init_scale
    n_first = len(steps)

    resumed = [a for a in _fp16_flags(csv_path, root, tmp_path, epochs=5) if a != "--train_from_scratch"]
    with warnings.catch_warnings(record=True) as caught_resumed:
        warnings.simplefilter("always")
        assert train.main(resumed) == 0
    saved = {k: first["scaler"][k] for k in ("scale", "_growth_tracker")}
    assert {k: restored[k] for k in saved} == saved and saved["_growth_tracker"] > 0
    assert _calibration_then_clean([s for _, s in steps[n_first:]], saved["scale"]) == 0, steps  # no re-calibration
    assert all(skip == 0 for skip, _ in steps), steps  # every loss finite
    assert not [w for w in caught + caught_resumed if "non-finite" in str(w.message)]
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


# ----------------------------------------------------------------------------- device choices (mocked CUDA)

def test_distributed_backend_is_nccl_on_gpus_and_gloo_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_setup.distributed_backend("auto") == "nccl" and training_setup.distributed_backend("cuda") == "nccl"
    assert training_setup.distributed_backend("cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_setup.distributed_backend("auto") == "gloo"


@pytest.mark.slow
def test_compile_auto_is_on_for_cuda_and_off_on_cpu(synthetic_dataset, tmp_path, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert training_setup.resolve_compile("auto", cuda) and not training_setup.resolve_compile("auto", cpu)
    # Triton, torch.compile's GPU compiler, refuses GPUs older than capability 7.0, such as Kaggle's P100 (6.0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert not training_setup.resolve_compile("auto", cuda) and training_setup.resolve_compile("on", cuda)
    assert training_setup.resolve_compile("on", cpu) and not training_setup.resolve_compile("off", cuda)
    assert train.build_parser().parse_args(["--compile"]).compile == "on"  # the old bare flag still means on
    root, csv_path = synthetic_dataset
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **k: compiled.append(model) or model)
    for choice, expected in (("auto", 0), ("on", 1)):  # CPU here: auto leaves it off
        run = _setup(csv_path, root, tmp_path / choice, "--compile", choice)
        _close(run)
        assert len(compiled) == expected and run.compiled == bool(expected)
        assert not compiled or compiled[-1] is run.model


# ----------------------------------------------------------------------------- time limit

def test_next_epoch_fits_takes_the_longest_epoch_with_a_margin():
    assert training.next_epoch_fits(1000.0, [])  # nothing measured yet: try
    assert training.next_epoch_fits(1000.0, [300.0, 850.0, 500.0]) is False  # 1.25 x 850 > 1000
    assert training.next_epoch_fits(1000.0, [300.0, 790.0]) is True  # 1.25 x 790 = 987.5
    assert training.next_epoch_fits(1000.0, [300.0, 790.0], reserve=60.0) is False


def _history(run_dir):
    return [(int(r["epoch"]), float(r["lr"])) for r in csv.DictReader(open(run_dir / "history.csv"))]


@pytest.mark.slow
def test_time_limit_stop_then_resume_continues_the_schedule_exactly(synthetic_dataset, tmp_path, monkeypatch, capsys):
    root, csv_path = synthetic_dataset
    schedule = ["--lr_scheduler", "cosine", "--warmup_epochs", "1", "--early_stop_patience", "0", "--lr", "1e-3",
                "--perceptual_weight", "0"]
    assert train.main(tiny(csv_path, root, tmp_path / "whole", *schedule, epochs=3)) == 0
    uninterrupted = _history(tmp_path / "whole" / "glf_cr_enhanced_v3")

    verdicts = iter([False])  # the first end-of-epoch check says the next epoch would not fit, later ones that it does
    monkeypatch.setattr(training, "next_epoch_fits", lambda *a, **k: next(verdicts, True))
    argv = tiny(csv_path, root, tmp_path / "split", *schedule, "--time_limit", "11.5", epochs=3)
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped by --time_limit 11.5 h after 1 of 3 epochs" in out
    command = out.split("Resume with:\n", 1)[1].strip().splitlines()[0]
    resume_argv = shlex.split(command)[2:]  # python train_CR_kaggle.py ...
    assert "--train_from_scratch" not in resume_argv and "--time_limit" in resume_argv
    assert train.main(resume_argv) == 0
    assert _history(tmp_path / "split" / "glf_cr_enhanced_v3") == uninterrupted
    assert [e for e, _ in uninterrupted] == [1, 2, 3]


@pytest.mark.slow
def test_a_real_time_limit_stops_with_a_resumable_checkpoint(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_CR_kaggle.py"),
                           *tiny(csv_path, root, tmp_path, "--perceptual_weight", "0", "--time_limit", "0.004",
                                 epochs=500)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped by --time_limit 0.004 h after" in proc.stdout and "Resume with:" in proc.stdout
    ckpt = runtime.load_checkpoint(tmp_path / "glf_cr_enhanced_v3" / "last.pth")
    assert ckpt["epoch"] < 500


# ----------------------------------------------------------------------------- users first

def _cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train_CR_kaggle.py"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("hint:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_user_errors_print_one_line_and_exit_2(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    _one_error_line(_cli("--save_model_dir", str(tmp_path)))  # no data list
    # the same errors in this process (the script prints str(error) after "error: ", as the two calls here show)
    if not torch.cuda.is_available():  # a GPU flag on a machine without one (--amp fp16 now runs on CPU)
        with pytest.raises(runtime.UsageError):
            train.main(tiny(csv_path, root, tmp_path, "--device", "cuda"))
    with pytest.raises(files.DataError, match="no such folder") as raised:  # no data folder
        train.main(tiny(csv_path, tmp_path / "elsewhere", tmp_path))
    assert str(raised.value).startswith(f"--input_data_folder {tmp_path / 'elsewhere'}: no such folder")
    err = _one_error_line(_cli(*tiny(csv_path, root, tmp_path, "--vgg_weights", str(tmp_path / "vgg.pth"))))
    assert "hint: pass --vgg_weights PATH" in err
    assert not list(tmp_path.iterdir()), "nothing may be left behind by runs that never started"


@pytest.mark.slow
def test_offline_imagenet_vgg_error_has_no_download_line(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    offline = {"TORCH_HOME": str(tmp_path / "torch_home"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}  # a closed port: offline
    args = [a for a in tiny(csv_path, root, tmp_path / "out") if a != "random"]
    args[args.index("--vgg_weights")] = "--vgg_weights=imagenet"
    proc = _cli(*args, env=offline)
    err = _one_error_line(proc)
    assert "VGG19 ImageNet weights are not in the torch cache" in err and "hint:" in err
    assert "ownloading" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_help_shows_every_default():
    proc = _cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines; compare with the whitespace collapsed
    for action in train.build_parser()._actions:
        if action.default is argparse.SUPPRESS and action.dest != "help":
            # a loss flag: its default depends on the model (and a resumed run's checkpoint), said in words
            assert "default" in action.help and action.option_strings[0] in text, action.option_strings
        elif action.option_strings and action.dest != "help":
            assert f"(default: {action.default})" in text, action.option_strings


@pytest.mark.slow
def test_redirected_output_gets_one_line_per_epoch_and_one_vgg_warning(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    proc = _cli(*tiny(csv_path, root, tmp_path, epochs=2), env={"PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr + proc.stdout, "progress-bar redraws in a redirected log"
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(" s/epoch, " in line for line in epoch_lines) and epoch_lines[-1].endswith(" 0 s left")
    assert " s left" in epoch_lines[0] and "amp off (--amp off)" in proc.stdout  # the precision and why
    assert (proc.stdout + proc.stderr).count("VGG has random weights") == 1


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(synthetic_dataset, tmp_path):
    import datalist
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path, "--perceptual_weight", "0")) == 0  # an earlier, good run
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a GeoTIFF")
    rows = datalist.read_data_list(csv_path)
    broken = [datalist.Triplet(t.split, t.s1, t.s2_cloudfree, str(garbage)) if t.split == 1 else t for t in rows]
    broken_csv = datalist.write_data_list(tmp_path / "broken.csv", broken)
    with pytest.raises(files.DataError, match="garbage.tif"):  # the first batch cannot be read
        train.main(tiny(broken_csv, root, tmp_path, "--perceptual_weight", "0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.csv", "garbage.tif", "glf_cr_enhanced_v3"]
    assert runtime.load_checkpoint(tmp_path / "glf_cr_enhanced_v3" / "last.pth")["epoch"] == 1  # put back in place
    with pytest.raises(files.DataError, match="garbage.tif"):
        train.main(tiny(broken_csv, root, tmp_path / "fresh", "--perceptual_weight", "0"))
    assert not (tmp_path / "fresh").exists()


def test_the_demo_prints_an_evaluation_command_that_draws_quicklooks(tmp_path, capsys):
    for demo in (True, False):
        args = train.build_parser().parse_args(["--data_list_filepath", "d.csv", "--input_data_folder", "root"]
                                               + (["--demo"] if demo else []))
        args.experiment_name = "demo" if demo else args.experiment_name
        run = training.Run(args=args, argv=[], device=torch.device("cpu"), dir=tmp_path, best_psnr=30.0)
        assert train.finish(run) == 0
        command = capsys.readouterr().out.strip().splitlines()[-1].strip()
        assert command.startswith("python test_CR.py --checkpoint") and "--split test" in command
        assert ("--save_png" in command and "--results_dir results/demo" in command) == demo


@pytest.mark.slow
def test_a_run_in_process_gives_back_the_signal_handlers_and_a_second_signal_reaches_them(
        synthetic_dataset, tmp_path, monkeypatch):
    """A notebook cell or a test calling main() must get its handlers back; a second SIGTERM during the stop
    (e.g. while the checkpoint is written) goes to the previous handler, which for a script is the default: exit."""
    import signal
    root, csv_path = synthetic_dataset
    received = []
    previous_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        def epoch_that_gets_two_signals(run, epoch):
            os.kill(os.getpid(), signal.SIGTERM)  # first: the run's handler asks for a stop
            assert run.stop_signal == signal.SIGTERM and not received
            os.kill(os.getpid(), signal.SIGTERM)  # second: back to the handler that was there before
            assert received == [signal.SIGTERM]
            run.stop_requested = True
            return {"loss": 0.0, "psnr": 0.0, "samples_per_s": 0.0, "seconds": 0.0}

        monkeypatch.setattr(training, "train_one_epoch", epoch_that_gets_two_signals)
        assert train.main(tiny(csv_path, root, tmp_path, "--perceptual_weight", "0", epochs=3)) == 130
        assert signal.getsignal(signal.SIGINT) is previous_int
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert received == [signal.SIGTERM, signal.SIGTERM]  # ours again, not the run's
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def test_pace_gives_seconds_per_epoch_and_time_left():
    from types import SimpleNamespace
    run = SimpleNamespace(epoch_seconds=[100.0, 40.0, 50.0, 60.0], epochs_done=4, started=0.0,
                          args=SimpleNamespace(max_epochs=10, time_limit=None))
    assert training.pace(run) == "50 s/epoch, 5 min 00 s left"
    run.args.time_limit = 0.0  # a limit already reached caps the estimate
    assert training.pace(run).endswith("0 s left")
    assert training.format_duration(7300) == "2 h 01 min"


@pytest.mark.parametrize("channels_last_seconds, first_seconds, expected", [(0.5, 1.0, True), (1.0, 0.5, False)])
def test_channels_last_auto_keeps_the_layout_that_ran_faster(monkeypatch, channels_last_seconds, first_seconds,
                                                             expected):
    from types import SimpleNamespace

    import net_CR_CrossAttention as net
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4)
    timed = {True: channels_last_seconds, False: first_seconds}
    monkeypatch.setattr(training_setup, "step_seconds", lambda m, ctx, size, cl, repeats=2: timed[cl])
    args = SimpleNamespace(channels_last="auto", crop_size=32)
    on, text = training_setup.resolve_channels_last(args, model, runtime.autocast(torch.device("cpu"), None),
                                                    torch.device("cpu"), 1)
    assert on is expected and text.startswith(f"channels-last {'on' if expected else 'off'} (a step took")
    assert training_setup.resolve_channels_last(args, model, None, torch.device("cuda"), 1)[0] is False
    for choice in ("on", "off"):
        args.channels_last = choice
        assert training_setup.resolve_channels_last(args, model, None, torch.device("cpu"), 1)[0] is (choice == "on")


def test_channels_last_auto_keeps_the_layout_of_the_run_it_resumes(monkeypatch):
    from types import SimpleNamespace

    import net_CR_CrossAttention as net
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4)

    def no_probe(*a, **k):
        raise AssertionError("a resumed run with a recorded layout must not time the layouts again")
    monkeypatch.setattr(training_setup, "step_seconds", no_probe)
    args = SimpleNamespace(channels_last="auto", crop_size=32)
    for recorded in (True, False):
        on, text = training_setup.resolve_channels_last(args, model, None, torch.device("cpu"), 1, resumed=recorded)
        assert on is recorded and "the run resumed" in text
    args.channels_last = "off"  # an explicit flag still wins
    assert training_setup.resolve_channels_last(args, model, None, torch.device("cpu"), 1, resumed=True)[0] is False


def test_the_layout_probe_changes_neither_weights_nor_the_random_stream():
    import net_CR_CrossAttention as net
    torch.manual_seed(0)
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    training_setup.resolve_channels_last(__import__("types").SimpleNamespace(channels_last="auto", crop_size=32), model,
                                         runtime.autocast(torch.device("cpu"), None), torch.device("cpu"), 1)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_running_a_finished_experiment_again_says_so_and_a_larger_max_epochs_continues(synthetic_dataset, tmp_path):
    """What re-running a notebook cell does: the same command twice, then with --max_epochs raised."""
    root, csv_path = synthetic_dataset
    flags = [f for f in tiny(csv_path, root, tmp_path, "--perceptual_weight", "0") if f != "--train_from_scratch"]
    first = _cli(*flags)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _cli(*flags)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    best = tmp_path / "glf_cr_enhanced_v3" / "best.pth"
    assert "already finished" in again.stdout and f"best checkpoint: {best}" in again.stdout
    assert f"python test_CR.py --checkpoint {best}" in again.stdout
    more = _cli(*flags, "--max_epochs", "2")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resuming from" in more.stdout and "epoch 2/2" in more.stdout and "epoch 1/2" not in more.stdout
    assert runtime.load_checkpoint(tmp_path / "glf_cr_enhanced_v3" / "last.pth")["epoch"] == 2


@pytest.mark.slow
def test_the_demo_ends_by_its_time_budget_with_the_evaluation_command(tmp_path, monkeypatch, capsys):
    """A slow CPU gets through fewer of the demo's epochs, not a longer demo."""
    monkeypatch.setattr(train, "DEMO_DIR", tmp_path / "demo_data")
    monkeypatch.setattr(train, "DEMO_SAMPLES", 16)
    monkeypatch.setattr(training, "next_epoch_fits", lambda *a, **k: False)  # as if the budget were spent after one
    assert train.main(["--demo", "--save_model_dir", str(tmp_path / "ckpt"), "--vgg_weights", "random",
                       "--amp", "off", "--channels_last", "off"]) == 0
    out = capsys.readouterr().out
    assert "budget ended training after 1 of 24 epochs" in out and "Resume with" not in out
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith(f"python test_CR.py --checkpoint {tmp_path / 'ckpt' / 'demo' / 'best.pth'}")
    args = train.build_parser().parse_args(["--demo", "--vgg_weights", "random"])
    train.prepare_demo(args)
    assert args.time_limit == train.DEMO_MINUTES / 60 and args.crop_size == train.DEMO_CROP
