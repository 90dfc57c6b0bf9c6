"""test_CR.py: evaluation scores equal metrics.py on the saved predictions, GeoTIFF georeferencing survives,
whole-scene tiling covers everything without seams, bad inputs give named errors."""
import contextlib
import csv
import json
import math

import numpy as np
import pytest
import rasterio
import torch
import torch.nn as nn
from PIL import Image
from rasterio.transform import from_origin

import dataloader
import metrics
import synthetic
import test_CR
import train_CR_kaggle as train

CROP = 48  # evaluation crop: the 64 px synthetic patches give a window offset of 8 px, so georef is non-trivial


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_dataset, tmp_path_factory):
    """A freshly trained (1 epoch, 32 px crops, no VGG) checkpoint of the default CrossAttention network."""
    root, csv_path = synthetic_dataset
    save_dir = tmp_path_factory.mktemp("eval_ckpt")
    argv = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
            str(save_dir), "--experiment_name", "tiny", "--max_epochs", "1", "--batch_sz", "2", "--load_size", "64",
            "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0", "--vgg_weights", "random",
            "--perceptual_weight", "0", "--amp", "off", "--warmup_epochs", "0.5", "--num_quicklooks", "0"]
    assert train.main(argv) == 0
    return save_dir / "tiny" / "last.pth"


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, synthetic_dataset, tmp_path_factory):
    """One evaluation run of the test split with every output switched on; batch 3 over 4 images, so the
    last batch is a partial one."""
    root, csv_path = synthetic_dataset
    results = tmp_path_factory.mktemp("eval_results")
    test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(csv_path),
                  "--input_data_folder", str(root), "--split", "test", "--results_dir", str(results),
                  "--save_geotiff", "--save_png", "--batch_sz", "3", "--crop_size", str(CROP), "--amp", "off",
                  "--num_workers", "0", "--device", "cpu"])
    rows = list(csv.DictReader(open(results / "metrics.csv")))
    summary = json.loads((results / "summary.json").read_text())
    dataset = dataloader.SEN12MSCRDataset(dataloader.select_split(dataloader.read_data_list(csv_path), "test"),
                                          root, crop_size=CROP, augment=False, cloud_detector="rule")
    samples = {s["file_name"]: s for s in (dataset[i] for i in range(len(dataset)))}
    return results, rows, summary, samples


def _close(a, b, rel=1e-5, abs_=1e-6):
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _read_prediction(path):
    with rasterio.open(path) as src:
        return torch.from_numpy(src.read().astype(np.float32) / dataloader.S2_SCALE)[None]


def test_every_flag_has_help():
    for action in test_CR.build_parser()._actions:
        assert action.help, f"flag {action.option_strings} has no help string"


def test_csv_equals_metrics_on_saved_geotiffs(evaluated):
    results, rows, _, samples = evaluated
    assert len(rows) == len(samples) == 4
    assert list(rows[0]) == test_CR.CSV_COLUMNS
    for row in rows:
        s = samples[row["file_name"]]
        target, mask = s["cloudfree_data"][None], s["cloud_mask"][None]
        # The saved product, reloaded: the scores were computed on exactly these values (the clamping rule).
        preds = {"model": _read_prediction(results / "geotiff" / (row["file_name"][:-4] + ".tif")),
                 "identity": s["cloudy_data"][None]}
        for who, pred in preds.items():
            halves = metrics.masked_metrics(pred, target, mask, threshold=0.2)
            expected = {"all": metrics.compute_metrics(pred, target), **halves}
            for region in test_CR.REGIONS:
                for m in metrics.METRIC_NAMES:
                    got = float(row[test_CR.column(who, region, m)])
                    want = float(expected[region][m][0])
                    assert _close(got, want), (row["file_name"], who, region, m, got, want)
        cover = float((mask >= 0.2).float().mean()) * 100
        assert _close(float(row["cloud_cover"]), cover)
    # The synthetic test split mixes clear and cloudy patches, so both halves are exercised.
    covers = [float(r["cloud_cover"]) for r in rows]
    assert min(covers) < 10 and max(covers) > 30


def test_summary_means_and_cloud_cover_bins(evaluated):
    _, rows, summary, _ = evaluated
    assert summary["n_images"] == len(rows) and summary["split"] == "test"
    for who in test_CR.PREDICTORS:
        for region in test_CR.REGIONS:
            for m in metrics.METRIC_NAMES:
                values = [float(r[test_CR.column(who, region, m)]) for r in rows]
                finite = [v for v in values if not math.isnan(v)]
                want = float(np.mean(finite)) if finite else None
                assert _close(summary["mean"][who][region][m], want), (who, region, m)
    bins = summary["cloud_cover_bins"]
    assert list(bins) == ["0-10", "10-30", "30-60", "60-100"]
    assert sum(b["n"] for b in bins.values()) == len(rows)
    for name, b in bins.items():
        lo, hi = (float(v) for v in name.split("-"))
        members = [r for r in rows if lo <= float(r["cloud_cover"]) < hi or float(r["cloud_cover"]) == hi == 100]
        assert b["n"] == len(members)
        if members:
            want = np.mean([float(r["model_PSNR"]) for r in members])
            assert _close(b["mean"]["model"]["all"]["PSNR"], want)


def test_geotiff_round_trip_keeps_georeferencing(evaluated):
    results, rows, _, samples = evaluated
    for row in rows:
        s = samples[row["file_name"]]
        crs, transform = dataloader.raster_georef(s["cloudy_path"], s["window"].tolist())
        with rasterio.open(results / "geotiff" / (row["file_name"][:-4] + ".tif")) as out, \
                rasterio.open(s["cloudy_path"]) as src:
            assert out.count == 13 and out.dtypes == ("uint16",) * 13
            assert (out.height, out.width) == (CROP, CROP)
            assert out.crs == src.crs == crs
            assert out.transform.almost_equals(transform)
            assert not out.transform.almost_equals(src.transform)  # the crop window, not the file's origin
            # Its pixels sit where the input's do: the window's first pixel centre maps to the same place.
            r0, c0 = s["window"][:2].tolist()
            assert out.xy(0, 0) == src.xy(r0, c0)


def test_png_quicklooks_use_the_fixed_stretch(evaluated):
    results, rows, _, samples = evaluated
    for row in rows:
        png = np.asarray(Image.open(results / "png" / (row["file_name"][:-4] + ".png")).convert("RGB"))
        assert png.shape == (CROP, 5 * CROP, 3)
        s = samples[row["file_name"]]
        pred = _read_prediction(results / "geotiff" / (row["file_name"][:-4] + ".tif"))[0]
        for k, img in ((0, dataloader.s2_to_rgb(s["cloudy_data"])), (2, dataloader.s2_to_rgb(pred)),
                       (3, dataloader.s2_to_rgb(s["cloudfree_data"]))):
            panel = png[:, k * CROP:(k + 1) * CROP].astype(np.float32) / 255
            assert np.abs(panel - img.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6, k


def test_real_sample_evaluates(real_sample_dir, tiny_checkpoint, tmp_path):
    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(real_sample_dir / "data.csv"),
        "--input_data_folder", str(real_sample_dir), "--split", "train", "--results_dir", str(tmp_path),
        "--amp", "off", "--num_workers", "0", "--device", "cpu", "--save_geotiff"]))
    assert summary["n_images"] == 1
    s = dataloader.SEN12MSCRDataset(dataloader.read_data_list(real_sample_dir / "data.csv"), real_sample_dir)[0]
    identity = metrics.compute_metrics(s["cloudy_data"][None], s["cloudfree_data"][None])
    assert _close(summary["mean"]["identity"]["all"]["PSNR"], float(identity["PSNR"][0]))
    assert all(math.isfinite(summary["mean"]["model"]["all"][m]) for m in metrics.METRIC_NAMES)
    with rasterio.open(tmp_path / "geotiff" / "ROIs2017_winter_112_p797.tif") as out:
        assert out.crs.to_epsg() == 32631 and (out.height, out.width) == (256, 256)


# ----------------------------------------------------------------------------- whole-scene prediction

SCENE_H, SCENE_W = 75, 100  # not a multiple of the 32 px tile in either direction


def _write(path, data, crs="EPSG:32631", transform=from_origin(600000.0, 5700000.0, 10.0, 10.0)):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 75 x 100 px synthetic scene (cloudy S2 uint16 x10000, S1 dB with a NaN hole) in UTM 31N."""
    d = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(3)
    reflectance, backscatter = synthetic.land_cover_scene(rng, SCENE_H, SCENE_W)
    yy, xx = np.mgrid[:SCENE_H, :SCENE_W]
    cloud = np.exp(-(((yy - 30) / 18.0) ** 2 + ((xx - 55) / 25.0) ** 2))[None]  # one soft cloud blob
    cloudy = reflectance * (1 - cloud) + synthetic.CLOUD_SPECTRUM[:, None, None] * cloud
    sar = backscatter.copy()
    sar[:, 5:9, 70:80] = np.nan
    return _write(d / "s2_cloudy.tif", dataloader.denormalize_s2(cloudy)), _write(d / "s1.tif", sar)


def _whole_image_prediction(model, cloudy_path, sar_path):
    cloudy = dataloader.normalize_s2(dataloader.read_raster(cloudy_path, 13))
    sar = dataloader.normalize_s1(dataloader.read_raster(sar_path, 2))
    pred, _ = test_CR.forward(model, torch.from_numpy(cloudy)[None], torch.from_numpy(sar)[None], contextlib.nullcontext())
    return dataloader.denormalize_s2(pred[0]).astype(np.float32)


class Pointwise(nn.Module):
    """Per-pixel network (1x1 convolutions): any tiling must reproduce its whole-image output exactly, so
    this isolates the blending arithmetic (weights summing to one, full coverage) from the model's context."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(15, 16, 1), nn.Tanh(), nn.Conv2d(16, 13, 1))

    def forward(self, optical, sar, return_aux=False):
        pred = optical + 0.1 * self.net(torch.cat([optical, sar], 1))
        return (pred, {"confidence": None, "residual": pred - optical}) if return_aux else pred


@pytest.mark.parametrize("tile,overlap", [(32, 8), (32, 0), (40, 16)])
def test_tiling_reproduces_a_pointwise_model_exactly(scene, tmp_path, tile, overlap):
    model = Pointwise().eval()
    out = test_CR.predict_scene(model, *scene, tmp_path / "out.tif", tile=tile, overlap=overlap, batch_sz=2,
                                progress=False)
    with rasterio.open(out) as dst:
        tiled = dst.read().astype(np.float32)
    whole = _whole_image_prediction(model, *scene)
    assert tiled.shape == whole.shape == (13, SCENE_H, SCENE_W)
    # Equal up to one uint16 step: float32 blending of identical values rounds either way at most once.
    assert np.abs(tiled - whole).max() <= 1


def test_feather_weights_positive_and_tiles_cover_the_scene():
    for n, overlap in ((32, 8), (32, 0), (256, 32), (7, 3)):
        w = test_CR.feather(n, overlap)
        assert w.shape == (n,) and (w > 0).all() and w.max() == 1.0
        assert np.allclose(w, w[::-1])  # symmetric: both neighbours fade alike
    for length, tile, overlap in ((75, 32, 8), (100, 32, 8), (32, 32, 8), (20, 32, 8), (2048, 256, 32)):
        starts = test_CR.tile_starts(length, tile, overlap)
        side = min(tile, length)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + side] = True
        assert covered.all() and starts[-1] + side == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap at least `overlap`


def test_predict_cli_with_checkpoint_has_no_seam(scene, tiny_checkpoint, tmp_path):
    out = tmp_path / "cloudfree.tif"
    assert test_CR.main(["--predict", "--checkpoint", str(tiny_checkpoint), "--cloudy", str(scene[0]),
                         "--sar", str(scene[1]), "--out", str(out), "--tile", "32", "--overlap", "8",
                         "--amp", "off", "--device", "cpu"]) == 0
    with rasterio.open(out) as dst, rasterio.open(scene[0]) as src:
        assert (dst.count, dst.height, dst.width) == (13, SCENE_H, SCENE_W) and dst.dtypes[0] == "uint16"
        assert dst.crs == src.crs and dst.transform == src.transform
        tiled = dst.read().astype(np.float32)
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind
    model, _ = test_CR.load_model(tiny_checkpoint, torch.device("cpu"))
    whole = _whole_image_prediction(model, *scene)
    diff = np.abs(tiled - whole) / dataloader.S2_SCALE
    # A 32 px tile gives the network less context than the whole scene, so outputs differ a little;
    # the design's residual is confidence-weighted and small, so the difference stays far below a visible step.
    # (measured: max 0.017, mean 0.0019 reflectance)
    assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max(), diff.mean())

    def seam(img, overlap):
        """Mean excess of the column-to-column jump at tile edges over the single-pass image's jump there."""
        edges = sorted({s + d for s in test_CR.tile_starts(SCENE_W, 32, overlap)[1:] for d in (0, overlap)})
        jump = lambda a: np.abs(np.diff(a, axis=2))[:, :, [e - 1 for e in edges]]
        return np.abs(jump(img) - jump(whole)).mean() / dataloader.S2_SCALE

    # No seam: feathered tiles jump at their edges as the single-pass prediction does (measured 0.0004), while
    # hard stitching of the same tiles (overlap 0) leaves a step ten times larger (measured 0.005).
    hard = test_CR.predict_scene(model, *scene, tmp_path / "hard.tif", tile=32, overlap=0, progress=False)
    with rasterio.open(hard) as dst:
        stitched = dst.read().astype(np.float32)
    assert seam(tiled, 8) < 0.002 and seam(tiled, 8) < seam(stitched, 0) / 3, (seam(tiled, 8), seam(stitched, 0))


def test_mismatched_scene_inputs_name_both_files(scene, tmp_path):
    cloudy_path, sar_path = scene
    sar = dataloader.read_raster(sar_path, 2)
    cases = {
        "size": _write(tmp_path / "s1_small.tif", sar[:, :70]),
        "CRS": _write(tmp_path / "s1_crs.tif", sar, crs="EPSG:32632"),
        "transform": _write(tmp_path / "s1_shift.tif", sar, transform=from_origin(600010.0, 5700000.0, 10.0, 10.0)),
        "bands": _write(tmp_path / "s1_bands.tif", sar[:1]),
    }
    for what, bad in cases.items():
        with pytest.raises(dataloader.DataError) as e:
            test_CR.predict_scene(Pointwise(), cloudy_path, bad, tmp_path / "out.tif", tile=32, overlap=8,
                                  progress=False)
        assert str(bad) in str(e.value), what
        if what != "bands":
            assert what in str(e.value) and str(cloudy_path) in str(e.value)
    assert not (tmp_path / "out.tif").exists()
    with pytest.raises(ValueError, match="overlap"):
        test_CR.predict_scene(Pointwise(), cloudy_path, sar_path, tmp_path / "o.tif", tile=32, overlap=32)
    with pytest.raises(dataloader.DataError, match="missing.tif"):
        test_CR.predict_scene(Pointwise(), tmp_path / "missing.tif", sar_path, tmp_path / "o.tif")


# ----------------------------------------------------------------------------- bad inputs

def test_bad_checkpoints_name_the_file(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    common = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--results_dir",
              str(tmp_path / "r"), "--num_workers", "0"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other_arch = tmp_path / "dsen2cr_label.pth"
    ckpt = train.load_checkpoint(tiny_checkpoint)
    torch.save(dict(ckpt, model_name="DSen2CR", model_config={}), other_arch)  # CrossAttention weights
    not_ours = tmp_path / "state_dict_only.pth"
    torch.save(ckpt["model"], not_ours)
    for path in (tmp_path / "missing.pth", garbage, other_arch, not_ours):
        with pytest.raises(train.CheckpointError, match=str(path.name)):
            test_CR.main(["--checkpoint", str(path), *common])
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_missing_arguments_are_named(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    with pytest.raises(SystemExit, match="--data_list_filepath"):
        test_CR.main(["--checkpoint", str(tiny_checkpoint)])
    with pytest.raises(SystemExit, match="--sar"):
        test_CR.main(["--predict", "--checkpoint", str(tiny_checkpoint), "--cloudy", "x.tif", "--out", "o.tif"])
    with pytest.raises(dataloader.DataError, match="data.csv"):  # the synthetic list has no empty split; fake one
        bad_csv = tmp_path / "data.csv"
        bad_csv.write_text(open(csv_path).read().replace("\n3,", "\n1,"))
        test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(bad_csv),
                      "--input_data_folder", str(root), "--split", "test", "--results_dir", str(tmp_path)])
