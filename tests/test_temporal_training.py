"""Training, resuming and evaluating with --input_t 3 (issue 30), end to end through train_CR_kaggle.main and
test_CR.main. The time series data comes from the tsdata branch (dataloader.SEN12MSCRTSDataset); until it is merged
here, `series_data` serves items of exactly TS_CONTRACT.md's shapes from memory in its place."""
from types import SimpleNamespace

import pytest
import torch

import dataloader
import runtime
import test_CR
import train_CR_kaggle as train

T, SIZE = 3, 32


class ContractSeries(torch.utils.data.Dataset):
    """Items of the contract's keys and shapes: one ground per series, a cloud drawn per date (each pixel clear on at
    least one date), the target the ground."""

    def __init__(self, series, root, input_t=3, crop_size=None, load_size=None, augment=False, cloud_detector="rule",
                 cloud_threshold=0.2, **kwargs):
        self.series, self.input_t, self.size = series, input_t, crop_size or SIZE
        self.detector = cloud_detector

    def __len__(self):
        return len(self.series)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        t, s = self.input_t, self.size
        ground = torch.rand(13, s, s, generator=g) * 0.5
        cloud = (torch.rand(t, 1, s, s, generator=g) > 0.5).float()
        cloud[-1] *= 1 - cloud[:-1].prod(dim=0)  # the last date is clear wherever every other date is cloudy
        cloudy = ground * (1 - cloud) + 0.9 * cloud
        score = cloud if self.detector != "none" else torch.zeros_like(cloud)
        return {"cloudy_data": cloudy, "SAR_data": torch.rand(t, 2, s, s, generator=g), "cloud_mask": score,
                "cloud_binary": (score >= 0.2).float(), "cloudfree_data": ground,
                "cloud_truth": torch.cat([cloud, torch.zeros_like(cloud)], dim=1),
                "file_name": f"s2_{i}.tif", "cloudy_path": "unused.tif", "window": torch.tensor([0, 0, s, s]),
                "input_dates": "2018-01-01,2018-01-13,2018-01-25", "target_date": "2018-02-06"}


@pytest.fixture
def series_data(tmp_path, monkeypatch):
    """(root, list path) of 6 train, 2 val and 2 test series; their files exist (empty), the dataset is
    ContractSeries unless the real one is here."""
    root = tmp_path / "ts"
    splits = {0: 6, 1: 2, 2: 2}
    series = {k: [] for k in splits}
    for split, n in splits.items():
        for p in range(n):
            paths = {kind: tuple(f"ROIs1970/{split}/{kind.upper()}/{d}/{kind}_{p}_{d}.tif" for d in range(T + 1))
                     for kind in ("s1", "s2")}
            for rel in (*paths["s1"], *paths["s2"]):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"")
            series[split].append(SimpleNamespace(split=split, roi=f"ROIs1970/{split}", patch=p, **paths,
                                                 dates=tuple(f"2018-01-{1 + 12 * d:02d}" for d in range(T + 1))))
    list_path = tmp_path / "series.csv"
    list_path.write_text("stand-in\n")
    monkeypatch.setattr(dataloader, "get_ts_train_val_test", lambda path: (series[0], series[1], series[2]),
                        raising=False)
    monkeypatch.setattr(dataloader, "SEN12MSCRTSDataset", ContractSeries, raising=False)
    return root, list_path


def _train_flags(root, list_path, save_dir, epochs=1, *extra):
    return ["--data_list_filepath", str(list_path), "--input_data_folder", str(root), "--save_model_dir",
            str(save_dir), "--experiment_name", "ts", "--input_t", str(T), "--max_epochs", str(epochs),
            "--batch_sz", "2", "--crop_size", str(SIZE), "--val_crop_size", str(SIZE), "--load_size", str(SIZE),
            "--num_workers", "0", "--vgg_weights", "random", "--amp", "off", "--warmup_epochs", "0.5",
            "--num_quicklooks", "2", "--channels_last", "off", "--confidence_weight", "0.1", *extra]


@pytest.mark.slow
def test_train_resume_and_evaluate_three_dates(series_data, tmp_path):
    root, list_path = series_data
    save = tmp_path / "ckpt"
    assert train.main(_train_flags(root, list_path, save, 1, "--train_from_scratch")) == 0
    first = runtime.load_checkpoint(save / "ts" / "last.pth")
    assert first["model_config"]["input_t"] == T and first["epoch"] == 1
    model = runtime.build_model_from_checkpoint(first)
    assert model.input_t == T

    assert train.main(_train_flags(root, list_path, save, 2)) == 0  # resumes last.pth
    second = runtime.load_checkpoint(save / "ts" / "last.pth")
    assert second["epoch"] == 2 and second["global_step"] > first["global_step"]
    with pytest.raises(runtime.UsageError, match="--input_t 3"):  # resuming with another number of dates
        train.main([*_train_flags(root, list_path, save, 3), "--input_t", "2"])

    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(save / "ts" / "best.pth"), "--data_list_filepath", str(list_path),
        "--input_data_folder", str(root), "--results_dir", str(tmp_path / "res"), "--num_workers", "0",
        "--amp", "off", "--batch_sz", "2"]))
    assert summary["input_t"] == T and summary["n_images"] == 2
    assert summary["mean"]["model"]["all"]["PSNR"] > 0

    mosaic = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--baseline", "mosaic", "--input_t", str(T), "--data_list_filepath", str(list_path),
        "--input_data_folder", str(root), "--results_dir", str(tmp_path / "mosaic"), "--num_workers", "0"]))
    assert mosaic["model_name"] == "mosaic baseline" and mosaic["n_images"] == 2
    # the contract data's every pixel is clear on some date, which the detector (the true cloud map) finds: the
    # mosaic is the clear ground up to the uint16 grid
    assert mosaic["mean"]["model"]["all"]["PSNR"] > 80


def test_evaluation_flags_for_dates_are_checked_before_any_work(tmp_path):
    with pytest.raises(runtime.UsageError, match="--checkpoint"):
        test_CR.main(["--data_list_filepath", "x.csv", "--input_data_folder", str(tmp_path)])
    with pytest.raises(runtime.UsageError, match="--input_t N"):
        test_CR.main(["--baseline", "mosaic", "--data_list_filepath", "x.csv", "--input_data_folder", str(tmp_path),
                      "--results_dir", str(tmp_path / "r")])
