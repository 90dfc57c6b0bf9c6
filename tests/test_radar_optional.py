"""Radar optional (issue 29): --sar_dropout trains a share of the samples without radar, the network told so; one
checkpoint then evaluates (test_CR.py --no_sar) and predicts (--predict without --sar) with radar or without, and a
model that never trained without radar is warned about."""
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import rasterio
import torch

import net_CR_CrossAttention as net
import runtime
import test_CR
import train_CR_kaggle as train
import training_setup

SMALL = dict(widths=(8, 16, 32), heads=4)
OLD_CHECKPOINT = Path(__file__).resolve().parent / "data" / "checkpoint_before_sar_config.pth"


def _inputs(n=4, size=16):
    return torch.rand(n, 13, size, size), torch.rand(n, 2, size, size)


def test_no_dropout_is_todays_network():
    """Dropout 0 (the default) builds the same parameters from the same random stream, and its training forward
    draws nothing from it, so a run without dropout is today's run number for number."""
    torch.manual_seed(0)
    today = net.CloudRemovalCrossAttention(**SMALL)
    torch.manual_seed(0)
    dropout_0 = net.CloudRemovalCrossAttention(**SMALL, sar_dropout=0.0, sar_absent="skip")
    assert today.state_dict().keys() == dropout_0.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), dropout_0.state_dict().values()))
    optical, sar = _inputs()
    state = torch.get_rng_state()
    today.train()(optical, sar)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_absent_token_adds_one_learned_vector_per_level_and_skip_adds_nothing():
    base = net.count_parameters(net.CloudRemovalCrossAttention())
    assert net.count_parameters(net.CloudRemovalCrossAttention(sar_dropout=0.5)) - base == 64 + 128 + 256
    assert net.count_parameters(net.CloudRemovalCrossAttention(sar_dropout=0.5, sar_absent="skip")) == base
    with pytest.raises(ValueError, match="sar_dropout must lie in"):
        net.ModelConfig(sar_dropout=1.5)
    with pytest.raises(ValueError, match="sar_absent must be one of"):
        net.ModelConfig(sar_absent="zeros")


@pytest.mark.parametrize("absent", net.SAR_ABSENT)
def test_without_radar_the_radar_passed_does_not_matter_and_each_sample_stands_alone(absent):
    torch.manual_seed(0)
    model = net.CloudRemovalCrossAttention(**SMALL, sar_dropout=0.5, sar_absent=absent)
    with torch.no_grad():  # make the tokens non-zero, as training would
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    optical, sar = _inputs()
    with torch.no_grad():
        without = model(optical, None)
        assert torch.allclose(model(optical[1:2], None), without[1:2], atol=1e-6)  # no sample sees another
        assert (model(optical, sar) - without).abs().max() > 1e-3  # with radar the radar is used
        assert torch.equal(model(optical, sar), model(optical, sar))  # evaluation drops nothing


def test_training_drops_radar_per_sample_from_torchs_generator():
    torch.manual_seed(0)
    model = net.CloudRemovalCrossAttention(**SMALL, sar_dropout=0.5)
    with torch.no_grad():
        for t in model.absent_sar:
            t.add_(1.0)
    optical, sar = _inputs(n=16)
    model.eval()
    with torch.no_grad():
        with_radar, without = model(optical, sar), model(optical, None)
        model.train()  # GroupNorm has no running statistics: train and eval differ only by the dropout
        torch.manual_seed(1)
        first = model(optical, sar)
        torch.manual_seed(1)
        again = model(optical, sar)
    assert torch.equal(first, again)  # the seed decides which samples lose their radar
    dropped = [torch.allclose(first[i], without[i], atol=1e-5) for i in range(16)]
    kept = [torch.allclose(first[i], with_radar[i], atol=1e-5) for i in range(16)]
    assert all(d != k for d, k in zip(dropped, kept))  # each sample wholly one or the other
    assert 0 < sum(dropped) < 16  # per sample, not per batch
    torch.manual_seed(1)
    assert dropped == (torch.rand(16) < 0.5).tolist()  # drawn as torch.rand(N) >= p keeps a sample's radar


def test_a_checkpoint_from_before_the_dropout_loads_with_dropout_0():
    ckpt = runtime.load_checkpoint(OLD_CHECKPOINT)
    assert "sar_dropout" not in ckpt["model_config"]
    model, _ = runtime.load_model(OLD_CHECKPOINT, torch.device("cpu"))
    assert model.config.sar_dropout == 0.0 and model.absent_sar is None


def test_the_training_flag_is_the_model_configs_field():
    args = train.build_parser().parse_args(["--sar_dropout", "0.25", "--sar_absent", "skip"])
    assert (args.sar_dropout, args.sar_absent) == (0.25, "skip")
    defaults = train.build_parser().parse_args([])
    assert (defaults.sar_dropout, defaults.sar_absent) == (net.ModelConfig.sar_dropout, net.ModelConfig.sar_absent)
    for argv, message in ((["--sar_dropout", "1.5"], "sar_dropout must lie in"),
                          (["--sar_dropout", "0.5", "--model_name", "DSen2CR"], "needs --model_name CrossAttention")):
        with pytest.raises(runtime.UsageError, match=message):
            training_setup.build_model(train.build_parser().parse_args(argv), None, None, True)


def _checkpoint(path, **config):
    """A checkpoint in train_CR_kaggle.py's format of a small untrained network."""
    torch.manual_seed(0)
    model = net.CloudRemovalCrossAttention(**SMALL, **config)
    runtime.save_checkpoint({"model": model.state_dict(), "model_name": model.model_name,
                             "model_config": asdict(model.config)}, path)
    return path


@pytest.fixture
def without_radar(synthetic_dataset, tmp_path):
    """A copy of the synthetic data set with every Sentinel-1 file deleted."""
    root, csv_path = synthetic_dataset
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    for s1 in copy.rglob("*_s1_*"):
        if s1.is_file():
            s1.unlink()
    assert not [p for p in copy.rglob("*.tif") if "_s1_" in p.name]
    return copy, copy / csv_path.name


def _evaluate(checkpoint, data, results, *flags):
    root, csv_path = data
    return test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data_list_filepath", str(csv_path), "--input_data_folder", str(root),
        "--split", "test", "--results_dir", str(results), "--num_workers", "0", "--amp", "off", "--save_png",
        *flags]))


def test_no_sar_evaluates_without_any_radar_file(without_radar, tmp_path, capsys):
    dropout = _checkpoint(tmp_path / "dropout.pth", sar_dropout=0.5)
    summary = _evaluate(dropout, without_radar, tmp_path / "r", "--no_sar")
    assert summary["no_sar"] and summary["n_images"] > 0
    assert len(list((tmp_path / "r" / "png").glob("*.png"))) == summary["n_images"]
    assert "untested" not in capsys.readouterr().err
    never = _checkpoint(tmp_path / "never.pth")
    _evaluate(never, without_radar, tmp_path / "r2", "--no_sar")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "untested" in line]
    assert len(warnings) == 1 and "never trained without radar" in warnings[0]
    with pytest.raises(Exception, match="_s1_"):  # with radar asked for, the missing files are named
        _evaluate(dropout, without_radar, tmp_path / "r3")


def test_predict_without_sar(synthetic_dataset, tmp_path, capsys):
    root, _ = synthetic_dataset
    cloudy = next(p for p in root.rglob("*.tif") if "_s2_cloudy_" in p.name)
    common = ["--cloudy", str(cloudy), "--tile", "32", "--overlap", "8", "--amp", "off", "--device", "cpu"]
    dropout = _checkpoint(tmp_path / "dropout.pth", sar_dropout=0.5)
    out = tmp_path / "cloudfree.tif"
    assert test_CR.main(["--predict", "--checkpoint", str(dropout), "--out", str(out), *common]) == 0
    with rasterio.open(out) as dst, rasterio.open(cloudy) as src:
        assert (dst.count, dst.height, dst.width, dst.transform) == (13, src.height, src.width, src.transform)
    assert "untested" not in capsys.readouterr().err
    never = _checkpoint(tmp_path / "never.pth")
    assert test_CR.main(["--predict", "--checkpoint", str(never), "--out", str(tmp_path / "b.tif"), *common]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "untested" in line]
    with pytest.raises(runtime.UsageError, match="--no_sar and --sar contradict"):
        test_CR.main(["--predict", "--checkpoint", str(dropout), "--out", str(tmp_path / "c.tif"), "--no_sar",
                      "--sar", str(cloudy), *common])


@pytest.mark.slow
def test_a_run_with_sar_dropout_records_it_and_evaluates_both_ways(synthetic_dataset, without_radar, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
                       str(tmp_path), "--experiment_name", "d", "--max_epochs", "1", "--batch_sz", "2",
                       "--load_size", "64", "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0",
                       "--vgg_weights", "random", "--perceptual_weight", "0", "--amp", "off",
                       "--num_quicklooks", "0", "--sar_dropout", "0.5"]) == 0
    ckpt = runtime.load_checkpoint(tmp_path / "d" / "last.pth")
    assert ckpt["model_config"]["sar_dropout"] == 0.5 and ckpt["model_config"]["sar_absent"] == "token"
    with_radar = _evaluate(tmp_path / "d" / "last.pth", synthetic_dataset, tmp_path / "r1")
    without = _evaluate(tmp_path / "d" / "last.pth", without_radar, tmp_path / "r2", "--no_sar")
    assert not with_radar["no_sar"] and without["no_sar"]
    assert with_radar["mean"]["model"]["all"]["PSNR"] != without["mean"]["model"]["all"]["PSNR"]
