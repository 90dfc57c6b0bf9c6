"""Training, resuming, evaluating and predicting with --input_t 3 (issue 30), end to end through train_CR_kaggle.main
and test_CR.main on a tiny synthetic time series set (synthetic_sets.make_synthetic_ts_dataset)."""
import json

import pytest
import rasterio

import dataloader
import files
import runtime
import synthetic_sets
import test_CR
import train_CR_kaggle as train

T, SIZE = 3, 32


@pytest.fixture(scope="module")
def series_data(tmp_path_factory):
    """(root, list path) of 12 synthetic series of 4 dates, 32 px, split by region: 8 train, 2 val, 2 test."""
    root = tmp_path_factory.mktemp("ts")
    return root, synthetic_sets.make_synthetic_ts_dataset(root, 12, size=SIZE, seed=0, n_dates=T + 1, n_rois=6)


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

    assert train.main(_train_flags(root, list_path, save, 2, "--date_chunk", "0")) == 0  # resumes last.pth
    second = runtime.load_checkpoint(save / "ts" / "last.pth")
    assert second["epoch"] == 2 and second["global_step"] > first["global_step"]
    assert first["model_config"]["date_chunk"] == 1 and second["model_config"]["date_chunk"] == 0  # memory: the flag
    with pytest.raises(runtime.UsageError, match="--input_t 3"):  # resuming with another number of dates
        train.main([*_train_flags(root, list_path, save, 3), "--input_t", "2"])

    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(save / "ts" / "best.pth"), "--data_list_filepath", str(list_path),
        "--input_data_folder", str(root), "--results_dir", str(tmp_path / "res"), "--num_workers", "0",
        "--amp", "off", "--batch_sz", "2", "--save_confidence", "--save_png"]))  # input_t from the checkpoint
    assert summary["input_t"] == T and summary["n_images"] == 2
    assert summary["mean"]["model"]["all"]["PSNR"] > 0 and summary["truth_bins"] is not None
    per_date = sorted((tmp_path / "res" / "confidence").glob("*_dates.tif"))
    assert len(per_date) == 2 and len(list((tmp_path / "res" / "png").glob("*.png"))) == 2
    with rasterio.open(per_date[0]) as src:
        assert src.count == T and src.crs is not None

    mosaic = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--baseline", "mosaic", "--input_t", str(T), "--data_list_filepath", str(list_path),
        "--input_data_folder", str(root), "--results_dir", str(tmp_path / "mosaic"), "--num_workers", "0"]))
    assert mosaic["model_name"] == "mosaic baseline" and mosaic["n_images"] == 2
    # a series' identity column is its mosaic: the baseline scores the same as it, the network against it
    assert mosaic["mean"]["model"] == mosaic["mean"]["identity"] == summary["mean"]["identity"]


@pytest.mark.slow
def test_predict_a_stack_of_dates_with_its_uncertainty(series_data, tmp_path):
    root, list_path = series_data
    assert train.main(_train_flags(root, list_path, tmp_path, 1, "--train_from_scratch", "--use_uncertainty_head")) == 0
    ckpt = tmp_path / "ts" / "last.pth"
    test_series = dataloader.get_ts_train_val_test(list_path)[2][0]
    cloudy, sar = ([str(root / p) for p in paths[:T]] for paths in (test_series.s2, test_series.s1))
    out = tmp_path / "cloudfree.tif"
    test_CR.main(["--predict", "--checkpoint", str(ckpt), "--cloudy", *cloudy, "--sar", *sar, "--out", str(out),
                  "--tile", "16", "--overlap", "4", "--amp", "off", "--save_uncertainty"])
    with rasterio.open(out) as dst, rasterio.open(cloudy[0]) as src:
        assert dst.count == 13 and dst.shape == src.shape and dst.transform == src.transform
    with rasterio.open(test_CR.uncertainty_output_path(out)) as std:
        assert std.count == 13 and std.read().min() > 0
    with pytest.raises(runtime.UsageError, match="takes 3 date"):
        test_CR.main(["--predict", "--checkpoint", str(ckpt), "--cloudy", *cloudy[:2], "--sar", *sar[:2], "--out",
                      str(tmp_path / "two.tif")])


def test_evaluation_flags_for_dates_are_checked_before_any_work(tmp_path):
    with pytest.raises(runtime.UsageError, match="--checkpoint"):
        test_CR.main(["--data_list_filepath", "x.csv", "--input_data_folder", str(tmp_path)])
    with pytest.raises(runtime.UsageError, match="--input_t N"):
        test_CR.main(["--baseline", "mosaic", "--data_list_filepath", "x.csv", "--input_data_folder", str(tmp_path),
                      "--results_dir", str(tmp_path / "r")])


@pytest.mark.slow
def test_torchrun_two_processes_train_three_dates(series_data, tmp_path):
    """DDP (gloo on the CPU) with --input_t 3: both ranks step through the checkpointed date chunks together, rank 0
    alone writes the checkpoint, which holds input_t and no DDP prefix."""
    from test_train import torchrun_two_processes
    root, list_path = series_data
    proc = torchrun_two_processes([*_train_flags(root, list_path, tmp_path, 1, "--train_from_scratch"),
                                   "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: best validation PSNR") == 1
    ckpt = runtime.load_checkpoint(tmp_path / "ts" / "last.pth")
    assert ckpt["model_config"]["input_t"] == T and not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.slow
def test_a_coverage_cache_chooses_the_dates_of_an_evaluation(series_data, tmp_path):
    """The coverage computed once (`dataloader.py coverage`) is what --coverage_cache reads: the mosaic baseline scores
    the same as with coverage computed on the fly by the same detector (s2cloudless, the protocol's), the summary
    names the cache, and a cache that lacks a date of the split is refused in one error naming it."""
    root, list_path = series_data
    cache = tmp_path / "coverage.json"
    test_split = dataloader.get_ts_train_val_test(list_path)[2]
    assert dataloader.main(["coverage", "--data_list_filepath", str(list_path), "--input_data_folder", str(root),
                            "--out", str(cache), "--workers", "1"]) == 0

    def mosaic(results, *extra):
        return test_CR.main(["--baseline", "mosaic", "--input_t", str(T), "--data_list_filepath", str(list_path),
                             "--input_data_folder", str(root), "--results_dir", str(tmp_path / results),
                             "--num_workers", "0", "--device", "cpu", *extra])

    mosaic("cached", "--coverage_cache", str(cache))
    mosaic("on_the_fly")
    cached, on_the_fly = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("cached", "on_the_fly"))
    assert cached["coverage_cache"] == str(cache) and on_the_fly["coverage_cache"] is None
    assert cached["mean"]["model"]["all"]["PSNR"] == on_the_fly["mean"]["model"]["all"]["PSNR"]

    partial = json.loads(cache.read_text())
    dropped = test_split[0].s2[0]
    del partial["coverage"][dropped]
    cache.write_text(json.dumps(partial))
    with pytest.raises(files.DataError, match="no coverage of"):
        mosaic("partial", "--coverage_cache", str(cache))
