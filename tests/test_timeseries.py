"""SEN12MS-CR-TS: the time-series list, scanning the TS layout, the date samplers (the published one and the leak-free
default), the per-date coverage cache, SEN12MSCRTSDataset and the synthetic series."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from geotiff import write_geotiff

import cloud_masks
import dataloader
import date_sampling
import splits
import synthetic
import synthetic_sets
from datalist import TS_HEADER, TimeSeries, read_data_list, read_ts_list, write_ts_list
from files import DataError
from rasters import ts_truth_path
from scanning import scan_ts_folder, split_ts_official

ROOT = Path(__file__).resolve().parents[1]
N_DATES = 4


@pytest.fixture(scope="module")
def ts_tree(tmp_path_factory):
    """(root, csv) of 6 synthetic series of 4 dates, 32 px, in 3 ROIs."""
    root = tmp_path_factory.mktemp("sen12mscrts")
    return root, synthetic_sets.make_synthetic_ts_dataset(root, n=6, size=32, seed=0, n_dates=N_DATES)


def _series(**kw):
    base = dict(split=1, roi="ROIs1970/20", patch=12, t=(0, 1),
                s1=("a/S1/0/s1_0.tif", "a/S1/1/s1_1.tif"), s2=("a/S2/0/s2_0.tif", "a/S2/1/s2_1.tif"),
                dates=("2018-01-02", "2018-01-14"))
    return TimeSeries(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# The list

def test_ts_list_round_trip(tmp_path):
    series = [_series(), _series(split=3, roi="ROIs2017/8", patch=1, t=(3, 7))]
    path = write_ts_list(tmp_path / "ts.csv", series)
    assert read_ts_list(path) == series
    assert next(csv.reader(path.open())) == list(TS_HEADER)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic writer's temp file is gone


@pytest.mark.parametrize("row, message", [
    ("1,ROIs1970/20,12,0,2018-01-02,s1.tif", "expected 7 columns"),
    ("4,ROIs1970/20,12,0,2018-01-02,s1.tif,s2.tif", "split must be"),
    ("1,ROIs1970/20,twelve,0,2018-01-02,s1.tif,s2.tif", "whole numbers"),
    ("1,ROIs1970/20,12,0,02.01.2018,s1.tif,s2.tif", "YYYY-MM-DD"),
    ("1,ROIs1970/20,12,0,2018-01-02,,s2.tif", "empty"),
    ("2,ROIs1970/20,12,0,2018-01-02,s1.tif,s2.tif", "one split"),
    ("1,ROIs1970/20,12,0,2018-01-02,s1.tif,s2.tif", "in time order"),
    ("1,ROIs1970/20,12,5,2017-12-02,s1.tif,s2.tif", "before"),
])
def test_malformed_ts_row_names_the_line(tmp_path, row, message):
    path = tmp_path / "ts.csv"
    path.write_text(",".join(TS_HEADER) + "\n1,ROIs1970/20,12,0,2018-01-02,s1.tif,s2.tif\n" + row + "\n")
    with pytest.raises(DataError, match=message) as e:
        read_ts_list(path)
    assert f"{path}:3" in str(e.value)


def test_each_list_reader_refuses_the_other_format(tmp_path, synthetic_dataset, ts_tree):
    with pytest.raises(DataError, match="not a time-series list"):
        read_ts_list(synthetic_dataset[1])
    with pytest.raises(DataError, match="a time-series list"):
        read_data_list(ts_tree[1])


# ---------------------------------------------------------------------------------------------------------------
# Scanning the TS layout

def test_scan_reads_the_synthetic_tree_at_any_depth(ts_tree, tmp_path):
    root, csv_path = ts_tree
    nested = tmp_path / "download" / "SEN12MSCRTS"
    shutil.copytree(root / "ROIs1970", nested / "ROIs1970")
    series, incomplete, unrecognised = scan_ts_folder(tmp_path)
    listed = read_ts_list(csv_path)
    assert not incomplete and not unrecognised  # the true cloud maps are known side-cars
    assert [(s.roi, s.patch, s.dates, s.t) for s in series] == sorted((s.roi, s.patch, s.dates, s.t) for s in listed)
    assert all(p.startswith("download/SEN12MSCRTS/ROIs1970/") for s in series for p in s.s1 + s.s2)
    # the S2 date, not the S1 one (the synthetic S1 is acquired 0-2 days before)
    assert all(Path(p).name.split("_")[5] == d for s in series for p, d in zip(s.s2, s.dates))


def test_scan_names_incomplete_series_and_leaves_them_out(ts_tree, tmp_path):
    root, _ = ts_tree
    shutil.copytree(root / "ROIs1970", tmp_path / "ROIs1970")
    gone = next((tmp_path / "ROIs1970" / "200" / "S1" / "2").glob("*_patch_1.tif"))
    gone.unlink()
    (tmp_path / "ROIs1970" / "200" / "notes.tif").write_bytes(b"")
    series, incomplete, unrecognised = scan_ts_folder(tmp_path)
    assert incomplete == ["incomplete series ROIs1970/200 patch 1: no S1 at t=2 (of t=0..3; left out)"]
    assert ("ROIs1970/200", 1) not in {(s.roi, s.patch) for s in series} and len(series) == 5
    assert unrecognised == ["ROIs1970/200/notes.tif"]


def test_official_ts_split_is_the_published_lists():
    assert len(splits.OFFICIAL_TS_TEST_ROIS) == 13 and len(splits.OFFICIAL_TS_VAL_ROIS) == 5
    every = {f"{group}/{n}" for group, numbers in splits.OFFICIAL_TS_ROIS.items() for n in numbers}
    assert len(every) == 53 and set(splits.OFFICIAL_TS_TEST_ROIS + splits.OFFICIAL_TS_VAL_ROIS) <= every
    series = [_series(roi="ROIs1868/119"), _series(roi="ROIs2017/22"), _series(roi="ROIs1970/21")]
    split, missing = split_ts_official(series)
    assert [s.split for s in split] == [3, 2, 1]
    assert len(missing["test"]) == 12 and "ROIs1868/119" not in missing["test"] and len(missing["val"]) == 4


@pytest.mark.slow
def test_scan_command_writes_a_ts_list(ts_tree, tmp_path, capsys):
    root, csv_path = ts_tree
    out = tmp_path / "scan.csv"
    assert dataloader.main(["scan", str(root), "--out", str(out), "--split", "official"]) == 0
    run = capsys.readouterr()
    assert "6 time series of 4-4 dates in 3 ROIs" in run.out
    assert "official test ROIs not found" in run.err  # synthetic ROIs are none of the published ones
    assert {(s.roi, s.patch, s.s2) for s in read_ts_list(out)} == {(s.roi, s.patch, s.s2)
                                                                    for s in read_ts_list(csv_path)}
    assert {s.split for s in read_ts_list(out)} == {1}


# ---------------------------------------------------------------------------------------------------------------
# The samplers

def test_published_sampler_as_written():
    coverage = [0.5, 0.0, 0.3, 0.2, 0.9]
    # defaults min_cov 0, max_cov 1: every date qualifies, the inputs are dates 0..2, the target (1) among them
    choice = date_sampling.published_fixed_sampler(coverage, 3)
    assert choice == date_sampling.DateChoice((0, 1, 2), 1, True) and choice.target_is_input
    # a coverage window: the first three dates inside it, whatever the target is
    assert date_sampling.published_fixed_sampler(coverage, 3, 0.1, 0.95).inputs == (0, 2, 3)
    # too few dates inside it: the first three dates other than the target, coverage_match False
    assert date_sampling.published_fixed_sampler(coverage, 3, 0.4, 0.6) == date_sampling.DateChoice((0, 2, 3), 1,
                                                                                                     False)
    # the target not clear (coverage above 1e-3): coverage_match False
    assert not date_sampling.published_fixed_sampler([0.5, 0.01, 0.3, 0.2], 2).coverage_match
    assert date_sampling.published_fixed_sampler([0.5, 0.01, 0.3, 0.2], 2).target == 1


def test_leak_free_sampler_never_gives_the_target():
    coverage = [0.5, 0.0, 0.3, 0.2, 0.9]
    assert date_sampling.leak_free_sampler(coverage, 3) == date_sampling.DateChoice((0, 2, 3), 1, True)
    assert date_sampling.leak_free_sampler(coverage, 3, 0.1, 0.6).inputs == (0, 2, 3)
    assert date_sampling.leak_free_sampler(coverage, 3, 0.4, 0.6) == date_sampling.DateChoice((0, 2, 3), 1, False)
    assert date_sampling.leak_free_sampler([0.2, 0.0, 0.0, 0.5], 2).target == 1  # the earliest of equal minima
    rng = np.random.default_rng(0)
    for _ in range(300):
        coverage = rng.choice([0.0, 0.3, 1.0], size=int(rng.integers(4, 31)), p=[0.2, 0.4, 0.4])
        n = int(rng.integers(1, 4))
        free, published = (date_sampling.sample_dates(coverage, n, s) for s in ("leak_free", "published"))
        assert free.target not in free.inputs and len(free.inputs) == n and list(free.inputs) == sorted(free.inputs)
        assert coverage[free.target] == coverage[published.target] == coverage.min()
        # under the defaults the published inputs are the first n dates, so it leaks exactly when the target is early
        assert published.inputs == tuple(range(n)) and published.target_is_input == (published.target < n)
    with pytest.raises(ValueError, match="unknown sampler"):
        date_sampling.sample_dates([0.1, 0.2], 1, "random")


def test_published_leaks_counts_series_given_their_target():
    assert date_sampling.published_leaks([[0.0, 1, 1, 1], [1, 1, 1, 0.0], [1, 0.5, 0.0, 1, 1]], 3) == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# The dataset

def test_dataset_item_follows_the_contract(ts_tree):
    root, csv_path = ts_tree
    train, val, test = dataloader.get_ts_train_val_test(csv_path)
    assert train and val and test and all(isinstance(s, TimeSeries) for s in train + val + test)
    ds = dataloader.SEN12MSCRTSDataset(train + val + test, root, input_t=3, crop_size=16)
    item = ds[0]
    shapes = {k: tuple(v.shape) for k, v in item.items() if torch.is_tensor(v)}
    assert shapes == {"cloudy_data": (3, 13, 16, 16), "SAR_data": (3, 2, 16, 16), "cloud_mask": (3, 1, 16, 16),
                      "cloud_binary": (3, 1, 16, 16), "cloudfree_data": (13, 16, 16), "cloud_truth": (3, 2, 16, 16),
                      "window": (4,), "input_coverage": (3,)}
    assert all(item[k].dtype == torch.float32 for k in shapes if k != "window") and item["window"].dtype == torch.long
    assert 0 <= item["cloudy_data"].min() and item["cloudy_data"].max() <= 1
    assert torch.isfinite(item["SAR_data"]).all()
    choice, _ = ds.date_choice(0)
    s = ds.series[0]
    assert item["input_dates"] == ",".join(s.dates[t] for t in choice.inputs)
    assert item["target_date"] == s.dates[choice.target] and item["file_name"] == Path(s.s2[choice.target]).name
    assert item["cloudy_path"] == str((root / s.s2[choice.inputs[0]]).resolve())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["cloudy_data"].shape == (2, 3, 13, 16, 16) and len(batch["input_dates"]) == 2


def test_target_is_the_clear_date_and_never_an_input(ts_tree):
    """synth makes one date clear; the coverage rule picks it and the leak-free sampler keeps it out of the inputs."""
    root, csv_path = ts_tree
    series = read_ts_list(csv_path)
    ds = dataloader.SEN12MSCRTSDataset(series, root, input_t=3)
    for i, s in enumerate(series):
        truth = [rasterio.open(root / ts_truth_path(p)).read() for p in s.s2]
        clear = [t for t, cloud in enumerate(truth) if cloud.max() == 0]
        choice, coverage = ds.date_choice(i)
        assert clear == [choice.target] and coverage[choice.target] == 0.0
        assert choice.target not in choice.inputs and min(coverage[t] for t in choice.inputs) > 0
        assert (ds[i]["cloud_truth"].flatten(1).amax(1) > 0).all()  # every input date is clouded


def test_published_sampler_gives_the_target_when_it_is_early(ts_tree):
    root, csv_path = ts_tree
    series = read_ts_list(csv_path)
    ds = dataloader.SEN12MSCRTSDataset(series, root, input_t=3, sampler="published")
    early = [i for i in range(len(series)) if ds.date_choice(i)[0].target < 3]
    assert early  # seed 0 puts the clear date among the first three of most series
    for i in early:
        item = ds[i]
        assert item["target_date"] in item["input_dates"].split(",")
        t = item["input_dates"].split(",").index(item["target_date"])
        assert torch.equal(item["cloudy_data"][t], item["cloudfree_data"])  # the answer is in the input


def test_augment_turns_every_date_alike(ts_tree):
    root, csv_path = ts_tree
    series = read_ts_list(csv_path)[:1]
    plain = dataloader.SEN12MSCRTSDataset(series, root, input_t=2)[0]
    torch.manual_seed(3)
    turned = dataloader.SEN12MSCRTSDataset(series, root, input_t=2, augment=True, crop_size=32)[0]
    keys = ("cloudy_data", "SAR_data", "cloud_mask", "cloud_truth")
    for k in range(4):
        for flip in (False, True):
            def move(x, k=k, flip=flip):
                x = torch.rot90(x, k, dims=(-2, -1))
                return x.flip(-1) if flip else x
            if all(torch.equal(move(plain[key]), turned[key]) for key in keys) and \
                    torch.equal(move(plain["cloudfree_data"]), turned["cloudfree_data"]):
                return
    pytest.fail("no one rotation and flip maps every date of the plain item onto the augmented one")


def _copy_series(root, series, tmp_path):
    for p in series.s1 + series.s2 + tuple(ts_truth_path(p) for p in series.s2):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / p, tmp_path / p)
    return tmp_path


def test_bad_date_files_name_the_file(ts_tree, tmp_path):
    root, csv_path = ts_tree
    s = read_ts_list(csv_path)[0]
    tree = _copy_series(root, s, tmp_path)
    ds = dataloader.SEN12MSCRTSDataset([s], tree, input_t=3, coverage_detector="rule")
    choice, _ = ds.date_choice(0)
    bad = tree / s.s2[choice.inputs[1]]
    with rasterio.open(bad) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    write_geotiff(bad, data[:4], crs, transform)
    with pytest.raises(DataError, match=f"{bad}: expected 13 bands, found 4"):
        ds[0]
    write_geotiff(bad, (data / 10000).astype(np.float32), crs, transform)
    with pytest.raises(DataError, match=f"{bad}: Sentinel-2 values are float32"):
        ds[0]
    bad.unlink()
    with pytest.raises(DataError, match=f"file not found: {bad}"):
        ds[0]


def test_nan_radar_is_filled(ts_tree, tmp_path):
    root, csv_path = ts_tree
    s = read_ts_list(csv_path)[0]
    tree = _copy_series(root, s, tmp_path)
    for p in s.s1:
        with rasterio.open(tree / p) as src:
            data, crs, transform = src.read(), src.crs, src.transform
        data[:, :4, :4] = np.nan
        write_geotiff(tree / p, data, crs, transform)
    assert torch.isfinite(dataloader.SEN12MSCRTSDataset([s], tree, input_t=3)[0]["SAR_data"]).all()


def test_series_too_short_for_input_t_is_refused(ts_tree):
    root, csv_path = ts_tree
    with pytest.raises(DataError, match=f"needs at least {N_DATES + 1} dates per series"):
        dataloader.SEN12MSCRTSDataset(read_ts_list(csv_path), root, input_t=N_DATES)
    with pytest.raises(DataError, match="empty"):
        dataloader.SEN12MSCRTSDataset([], root)


# ---------------------------------------------------------------------------------------------------------------
# The coverage cache

def test_coverage_cache_is_made_once_and_names_its_detector(ts_tree, tmp_path):
    root, csv_path = ts_tree
    series = read_ts_list(csv_path)
    cache = tmp_path / "coverage.json"
    coverage, made, there = cloud_masks.make_coverage_cache(series[:2], root, cache, "rule", workers=1,
                                                            progress=False)
    assert (made, there) == (2 * N_DATES, 0) and json.loads(cache.read_text())["detector"] == "rule"
    coverage, made, there = cloud_masks.make_coverage_cache(series, root, cache, "rule", workers=1, progress=False)
    assert (made, there) == (4 * N_DATES, 2 * N_DATES) and len(coverage) == 6 * N_DATES
    on_the_fly = dataloader.SEN12MSCRTSDataset(series, root, input_t=3, coverage_detector="rule")
    cached = dataloader.SEN12MSCRTSDataset(series, root, input_t=3, coverage_cache=cache)
    assert cached.coverage_detector == "rule"
    for i in range(len(series)):
        assert cached.date_choice(i) == on_the_fly.date_choice(i)
    with pytest.raises(DataError, match="holds coverage by"):
        cloud_masks.make_coverage_cache(series, root, cache, "s2cloudless_prob", workers=1, progress=False)
    partial = tmp_path / "partial.json"
    cloud_masks.make_coverage_cache(series[:1], root, partial, "rule", workers=1, progress=False)
    with pytest.raises(DataError, match=f"{partial}: no coverage of .*run python dataloader.py coverage"):
        dataloader.SEN12MSCRTSDataset(series, root, coverage_cache=partial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coverage.json", "partial.json"]


def test_blank_date_counts_as_fully_cloudy(tmp_path):
    """As the published get_cloud_map: an all-zero image is 'cloudy' (coverage 1), so it is never the target."""
    path = write_geotiff(tmp_path / "blank.tif", np.zeros((13, 16, 16), np.uint16), None, None)
    assert cloud_masks.date_coverage(path, "rule") == 1.0


@pytest.mark.slow
def test_coverage_command_reports_the_published_leak(ts_tree, tmp_path, capsys):
    """s2cloudless (the protocol's detector) in worker processes, and the report of the published sampler's leak."""
    root, csv_path = ts_tree
    assert dataloader.main(["coverage", "--data_list_filepath", str(csv_path), "--input_data_folder", str(root),
                            "--out", str(tmp_path / "c.json"), "--workers", "2"]) == 0
    run = capsys.readouterr()
    series = read_ts_list(csv_path)
    coverage = json.loads((tmp_path / "c.json").read_text())["coverage"]
    for name, split in splits.SPLIT_IDS.items():
        rows = [[coverage[p] for p in s.s2] for s in series if s.split == split]
        count = sum(int(np.argmin(r)) < 3 for r in rows)
        assert f"{name}: the published fixed sampler (--input_t 3, min_cov 0.0, max_cov 1.0) gives the target as " \
               f"an input in {count} of {len(rows)} series" in run.out


# ---------------------------------------------------------------------------------------------------------------
# Synthetic series

def test_synthetic_series_share_one_ground_and_vary_by_date():
    (p,) = synthetic.generate_time_series(1, n_dates=5, size=32, seed=1, n_rois=1)
    assert p["s2"].shape == (5, 13, 32, 32) and p["s1"].shape == (5, 2, 32, 32) and p["opacity"].shape == (5, 32, 32)
    assert p["regimes"].count("clear") == 1 and p["regimes"][p["clear"]] == "clear"
    clear = p["s2"][p["clear"]]
    assert p["opacity"][p["clear"]].max() == 0
    cloudy = [t for t in range(5) if t != p["clear"]]
    assert all(p["opacity"][t].max() > 0 for t in cloudy)
    # where a date is clear of cloud and shadow, it is the clear date's ground up to a small per-band gain
    t = cloudy[0]
    free = (p["opacity"][t] == 0) & (p["shadow"][t] == 0)
    if free.any():
        ratio = p["s2"][t][:, free] / clear[:, free]
        assert np.allclose(ratio, ratio.mean(1, keepdims=True), rtol=1e-4) and np.abs(ratio - 1).max() < 0.15
    assert not np.allclose(p["s1"][0], p["s1"][1])  # speckle drawn per date
    assert list(p["dates"]) == sorted(p["dates"])
    assert next(synthetic.generate_time_series(1, n_dates=5, size=32, seed=1, n_rois=1))["regimes"] == p["regimes"]


@pytest.mark.slow
def test_synth_command_writes_time_series(tmp_path, capsys):
    assert dataloader.main(["synth", str(tmp_path), "--n", "3", "--size", "16", "--time_series", "3",
                            "--scenes", "1"]) == 0
    series = read_ts_list(tmp_path / "data.csv")
    assert len(series) == 3 and all(len(s.s2) == 3 for s in series)
    assert "wrote 3 synthetic time series of 3 dates" in capsys.readouterr().out


def test_leak_probability_of_the_published_sampler():
    """One clear date of 30 placed at random: the first three dates hold it 3 times in 30; more clear dates, more
    often (the earliest of them is the target)."""
    assert date_sampling.leak_probability(30, 1, 3) == pytest.approx(0.1)
    assert date_sampling.leak_probability(30, 3, 3) == pytest.approx(1 - (27 * 26 * 25) / (30 * 29 * 28))
    assert date_sampling.simulated_leak_rate(30, 1, 3, trials=4000) == pytest.approx(0.1, abs=0.015)
    assert date_sampling.simulated_leak_rate(30, 10, 3, trials=1000) > 0.5  # ten clear dates: most series leak


def test_coverage_of_a_missing_date_names_it_and_keeps_the_rest(ts_tree, tmp_path):
    root, csv_path = ts_tree
    s = read_ts_list(csv_path)[0]
    tree = _copy_series(root, s, tmp_path / "tree")
    (tree / s.s2[2]).unlink()
    cache = tmp_path / "coverage.json"
    with pytest.raises(DataError, match=f"file not found: {tree / s.s2[2]} .1 of {N_DATES} dates not done"):
        cloud_masks.make_coverage_cache([s], tree, cache, "rule", workers=1, progress=False)
    assert set(json.loads(cache.read_text())["coverage"]) == set(s.s2) - {s.s2[2]}


def test_scan_of_incomplete_series_only_says_so(ts_tree, tmp_path, capsys):
    root, csv_path = ts_tree
    s = read_ts_list(csv_path)[0]
    tree = _copy_series(root, s, tmp_path / "tree")
    (tree / s.s1[0]).unlink()
    assert dataloader.main(["scan", str(tree), "--out", str(tmp_path / "ts.csv")]) == 2
    err = capsys.readouterr().err
    assert f"incomplete series {s.roi} patch {s.patch}: no S1 at t=0" in err
    assert "error: " in err and "no complete SEN12MS-CR-TS series (1 incomplete)" in err
    assert not (tmp_path / "ts.csv").exists()
