"""train_CR_kaggle.py end to end on tiny synthetic data (crops of 32 px, 1-2 epochs)."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_CR_kaggle as train

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


def test_full_design_flags_train_end_to_end(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    for name in ("last.pth", "best.pth", "history.csv", "args.json"):
        assert (run / name).is_file(), name
    ckpt = train.load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == "CrossAttention"
    assert ckpt["args"]["notes"].startswith("Enhanced")
    model = train.build_model_from_checkpoint(ckpt)  # no architecture flags needed
    assert model.config == ckpt["model_config"]
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


def test_resume_continues_epoch_and_optimizer_state(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(tiny(csv_path, root, tmp_path, epochs=1)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    first = train.load_checkpoint(run / "last.pth")

    # Resume (no --train_from_scratch) to epoch 2, and check the state it starts from is the saved one.
    args = [a for a in tiny(csv_path, root, tmp_path, epochs=2) if a != "--train_from_scratch"]
    seen = {}
    real_load = train.load_checkpoint

    def spy(path, map_location="cpu"):
        seen["path"] = Path(path)
        return real_load(path, map_location)

    train.load_checkpoint = spy
    try:
        assert train.main(args) == 0
    finally:
        train.load_checkpoint = real_load
    assert seen["path"] == run / "last.pth"
    second = train.load_checkpoint(run / "last.pth")
    assert second["epoch"] == 2 and second["global_step"] > first["global_step"]
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    # The optimizer rebuilt from the checkpoint holds exactly the saved state.
    model = train.build_model_from_checkpoint(first)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    opt.load_state_dict(first["optimizer"])
    restored = opt.state_dict()
    for key, state in first["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][key][name]), torch.as_tensor(value))
    assert restored["param_groups"][0]["lr"] == first["optimizer"]["param_groups"][0]["lr"]


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
    train.atomic_torch_save({"model": {"w": torch.ones(3)}, "model_name": "x", "model_config": {}}, path)

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train.atomic_torch_save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(train.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"], "temp file left behind"


def test_corrupt_checkpoint_gives_named_error(tmp_path):
    bad = tmp_path / "last.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="last.pth"):
        train.load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(train.CheckpointError, match="not a checkpoint"):
        train.load_checkpoint(bad)


def test_bad_data_list_fails_before_training(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    broken = tmp_path / "broken.csv"
    lines = Path(csv_path).read_text().splitlines()
    broken.write_text("\n".join(lines[:3] + ["1,only,three"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.csv.*4|line 4"):
        train.main(tiny(broken, root, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pth"))

    no_val = tmp_path / "no_val.csv"
    no_val.write_text("\n".join(l for l in lines if not l.startswith("2,")) + "\n")
    with pytest.raises(ValueError, match=r"no_val\.csv.*split 2"):
        train.main(tiny(no_val, root, tmp_path / "out"))

    missing = tmp_path / "missing.csv"
    rows = Path(csv_path).read_text().splitlines()
    rows[-1] = rows[-1].replace(".tif", "_gone.tif")
    missing.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="_gone.tif"):
        train.main(tiny(missing, root, tmp_path / "out2"))


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


def test_torchrun_two_processes_gloo(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "train_CR_kaggle.py"),
           *tiny(csv_path, root, tmp_path, "--device", "cpu", "--perceptual_weight", "0")]
    cmd.remove("--use_contrastive_loss")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "glf_cr_enhanced_v3"
    files = sorted(p.name for p in run.iterdir())
    assert files == ["args.json", "best.pth", "history.csv", "last.pth", "tensorboard"], files
    assert len(list((run / "tensorboard").iterdir())) == 1, "only rank 0 may write TensorBoard events"
    assert proc.stdout.count("done: best validation PSNR") == 1
    ckpt = train.load_checkpoint(run / "last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])


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
    ckpt = train.load_checkpoint(last)
    assert 1 <= ckpt["epoch"] < 500
    assert not [p for p in last.parent.iterdir() if ".tmp" in p.name]


def test_confidence_weight_needs_a_confidence_map(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    with pytest.raises(SystemExit, match="confidence"):
        train.main(tiny(csv_path, root, tmp_path, "--no-use_cloud_predictor", "--confidence_weight", "0.1"))
    assert not list(tmp_path.rglob("*.pth"))
