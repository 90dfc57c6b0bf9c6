"""test_CR.py: evaluation scores equal metrics.py on the saved predictions, GeoTIFF georeferencing survives,
whole-scene tiling covers everything without seams, bad inputs give named errors."""
import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
import torch
import torch.nn as nn
from geotiff import write_geotiff
from PIL import Image
from rasterio.transform import from_origin

import bands
import datalist
import dataloader
import files
import inference
import metrics
import net_CR_CrossAttention
import quicklooks
import rasters
import runtime
import scanning
import scoring
import synthetic
import synthetic_sets
import test_CR
import train_CR_kaggle as train

CROP = 48  # evaluation crop: the 64 px synthetic patches give a window offset of 8 px, so georef is non-trivial


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_dataset, tmp_path_factory):
    """A freshly trained (1 epoch, 32 px crops, no VGG) checkpoint of the default CrossAttention network."""
    root, csv_path = synthetic_dataset
    save_dir = tmp_path_factory.mktemp("eval_ckpt")
    # --load_size left at its default (256) on 64 px patches: the whole raster is used, with one warning per dataset
    # (the design's Kaggle command on small synthetic patches).
    argv = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
            str(save_dir), "--experiment_name", "tiny", "--max_epochs", "1", "--batch_sz", "2",
            "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0", "--vgg_weights", "random",
            "--perceptual_weight", "0", "--amp", "off", "--warmup_epochs", "0.5", "--num_quicklooks", "0"]
    with pytest.warns(UserWarning, match="--load_size 256 is larger than the 64x64 rasters"):
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
    dataset = dataloader.SEN12MSCRDataset(datalist.select_split(datalist.read_data_list(csv_path), "test"),
                                          root, crop_size=CROP, augment=False, cloud_detector="rule")
    samples = {s["file_name"]: s for s in (dataset[i] for i in range(len(dataset)))}
    return results, rows, summary, samples


def _close(a, b, rel=1e-5, abs_=1e-6):
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _read_prediction(path):
    with rasterio.open(path) as src:
        return torch.from_numpy(src.read().astype(np.float32) / bands.S2_SCALE)[None]


def test_every_flag_has_help():
    for action in test_CR.build_parser()._actions:
        assert action.help, f"flag {action.option_strings} has no help string"


@pytest.mark.slow
def test_csv_equals_metrics_on_saved_geotiffs(evaluated):
    results, rows, _, samples = evaluated
    assert len(rows) == len(samples) == 4
    assert list(rows[0]) == scoring.CSV_COLUMNS
    for row in rows:
        s = samples[row["file_name"]]
        target, mask = s["cloudfree_data"][None], s["cloud_mask"][None]
        # The saved product, reloaded: the scores were computed on exactly these values (the clamping rule).
        preds = {"model": _read_prediction(results / "geotiff" / (row["file_name"][:-4] + ".tif")),
                 "identity": s["cloudy_data"][None]}
        for who, pred in preds.items():
            halves = metrics.masked_metrics(pred, target, mask, threshold=0.2)
            expected = {"all": metrics.compute_metrics(pred, target), **halves}
            for region in scoring.REGIONS:
                for m in metrics.METRIC_NAMES:
                    got = float(row[scoring.column(who, region, m)])
                    want = float(expected[region][m][0])
                    assert _close(got, want), (row["file_name"], who, region, m, got, want)
        cover = float((mask >= 0.2).float().mean()) * 100
        assert _close(float(row["cloud_cover"]), cover)
    # The synthetic test split mixes clear and cloudy patches, so both halves are exercised.
    covers = [float(r["cloud_cover"]) for r in rows]
    assert min(covers) < 10 and max(covers) > 30


@pytest.mark.slow
def test_summary_means_and_cloud_cover_bins(evaluated):
    _, rows, summary, _ = evaluated
    assert summary["n_images"] == len(rows) and summary["split"] == "test"
    for who in scoring.PREDICTORS:
        for region in scoring.REGIONS:
            for m in metrics.METRIC_NAMES:
                values = [float(r[scoring.column(who, region, m)]) for r in rows]
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


@pytest.mark.slow
def test_summary_records_the_split_rule_the_leak_check_and_the_cloud_mask(evaluated, synthetic_dataset):
    _, _, summary, _ = evaluated
    csv_path = synthetic_dataset[1]
    assert summary["split_rule"] == "by scene, not the published lists"
    check = summary["leak_check"]
    assert check["leak"] is False and check["data_list"] == str(csv_path)
    assert check["footprints"] == "12 headers read, 12 georeferenced"
    assert check["pairs"]["train-test"] == {"shared_scenes": [], "overlapping_patches": 0}
    assert summary["cloud_mask"] == {"detector": "rule", "score": "DSen2-CR rule cloud score (rule_cloud_score)",
                                     "binary": "score >= cloud_threshold", "cloud_threshold": 0.2,
                                     "computed": "on the fly"}


@pytest.mark.slow
def test_a_leaking_list_is_recorded_and_named(tiny_checkpoint, synthetic_dataset, tmp_path, capsys):
    root, csv_path = synthetic_dataset
    rows = datalist.read_data_list(csv_path)
    test_scene = scanning.scene_of(next(t for t in rows if t.split == 3))
    leaky = datalist.write_data_list(tmp_path / "leaky.csv", rows + [
        datalist.Triplet(1, t.s1, t.s2_cloudfree, t.s2_cloudy) for t in rows if scanning.scene_of(t) == test_scene])
    assert test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(leaky),
                         "--input_data_folder", str(root), "--results_dir", str(tmp_path / "r"), "--amp", "off",
                         "--num_workers", "0", "--crop_size", "16", "--cloud_detector", "s2cloudless"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    err = capsys.readouterr().err
    assert f"warning: {leaky} leaks: train and test share 1 scene" in err and "recorded in summary.json" in err
    check = summary["leak_check"]
    assert check["leak"] and check["pairs"]["train-test"]["shared_scenes"] == [f"{test_scene[0]} {test_scene[1]}"]
    assert check["pairs"]["train-test"]["overlapping_patches"] > 0 and not check["pairs"]["val-test"]["shared_scenes"]
    assert summary["split_rule"] == "scenes shared between splits (not by scene)"
    mask = summary["cloud_mask"]
    assert mask["detector"] == "s2cloudless" and mask["binary"] == "S2PixelCloudDetector.get_cloud_masks"
    assert (mask["threshold"], mask["average_over"], mask["dilation_size"], mask["all_bands"]) == (0.4, 4, 2, True)
    assert mask["cloud_threshold"] is None  # the mask is binary: --cloud_threshold does not move it


@pytest.mark.slow
def test_geotiff_round_trip_keeps_georeferencing(evaluated):
    results, rows, _, samples = evaluated
    for row in rows:
        s = samples[row["file_name"]]
        crs, transform = rasters.raster_georef(s["cloudy_path"], s["window"].tolist())
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


def _panel(png, layout, k, height, width):
    """Panel k of a quicklook PNG (as laid out by quicklooks.quicklook_layout), in [0, 1]."""
    top, left = layout["panels"][k]
    s = layout["scale"]
    return png[top:top + s * height, left:left + s * width].astype(np.float32) / 255


def _enlarged(img, scale):
    """(C,H,W) tensor -> (H*scale, W*scale, C) array, nearest neighbour (how quicklooks enlarge small patches)."""
    return np.repeat(np.repeat(img.permute(1, 2, 0).numpy(), scale, axis=0), scale, axis=1)


@pytest.mark.slow
def test_png_quicklooks_use_the_fixed_stretch(evaluated):
    results, rows, _, samples = evaluated
    layout = quicklooks.quicklook_layout(CROP, CROP)
    assert layout["scale"] == 6  # 48 px patches are enlarged to 288 px panels
    for row in rows:
        png = np.asarray(Image.open(results / "png" / (row["file_name"][:-4] + ".png")).convert("RGB"))
        assert png.shape == (*layout["size"], 3)
        s = samples[row["file_name"]]
        pred = _read_prediction(results / "geotiff" / (row["file_name"][:-4] + ".tif"))[0]
        for k, img in ((0, bands.s2_to_rgb(s["cloudy_data"])), (2, bands.s2_to_rgb(pred)),
                       (3, bands.s2_to_rgb(s["cloudfree_data"]))):
            panel = _panel(png, layout, k, CROP, CROP)
            assert np.abs(panel - _enlarged(img, 6)).max() <= 1 / 255 + 1e-6, k


def test_quicklook_labels_heat_map_and_colour_bar(tmp_path):
    from matplotlib import colormaps
    torch.manual_seed(0)
    h, w = 16, 24  # small and not square: enlarged 11 times to 176 x 264 px panels
    cloudy, target, pred, sar = torch.rand(13, h, w), torch.rand(13, h, w), torch.rand(13, h, w), torch.rand(2, h, w)
    confidence = torch.linspace(0, 1, w).expand(1, h, w)
    quicklooks.save_quicklook(tmp_path / "q.png", cloudy, sar, pred, target, confidence, title="patch_p1")
    quicklooks.save_quicklook(tmp_path / "none.png", cloudy, sar, pred, target, None)
    layout = quicklooks.quicklook_layout(h, w)
    assert layout["scale"] == 11 and [p.name for p in tmp_path.iterdir()] != []
    png = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    assert png.shape == (*layout["size"], 3)
    cmap = colormaps[quicklooks.QUICKLOOK_CMAP]
    heat = _panel(png, layout, 4, h, w)
    assert np.abs(heat - _enlarged(torch.from_numpy(cmap(confidence[0].numpy())[..., :3]).permute(2, 0, 1), 11)).max() \
        <= 1 / 255 + 1e-6
    assert np.abs(_panel(png, layout, 1, h, w) - _enlarged(bands.sar_to_rgb(sar), 11)).max() <= 1 / 255 + 1e-6
    # The colour bar runs from cmap(0) at the bottom to cmap(1) at the top.
    top, left, height, width = layout["colorbar"]
    bar = png[top + 2:top + height - 2, left + width // 2].astype(np.float32) / 255
    assert np.abs(bar[-1] - cmap(0.0)[:3]).max() < 0.03 and np.abs(bar[0] - cmap(1.0)[:3]).max() < 0.03
    # Every panel has a label above it (dark text pixels in the strip over the panel).
    for panel_top, panel_left in layout["panels"]:
        strip = png[panel_top - 22:panel_top - 2, panel_left:panel_left + 100]
        assert (strip.min(axis=2) < 100).sum() > 20
    # A model without a confidence map: the panel says so and no colour bar is drawn.
    plain = np.asarray(Image.open(tmp_path / "none.png").convert("RGB"))
    assert (plain[top:top + height, left:left + width] == 255).all()
    assert not (tmp_path / "none.png").with_suffix(".png.tmp").exists()


@pytest.mark.slow
def test_real_sample_evaluates(real_sample_dir, tiny_checkpoint, tmp_path):
    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(real_sample_dir / "data.csv"),
        "--input_data_folder", str(real_sample_dir), "--split", "train", "--results_dir", str(tmp_path),
        "--amp", "off", "--num_workers", "0", "--device", "cpu", "--save_geotiff"]))
    assert summary["n_images"] == 1
    s = dataloader.SEN12MSCRDataset(datalist.read_data_list(real_sample_dir / "data.csv"), real_sample_dir)[0]
    identity = metrics.compute_metrics(s["cloudy_data"][None], s["cloudfree_data"][None])
    assert _close(summary["mean"]["identity"]["all"]["PSNR"], float(identity["PSNR"][0]))
    assert all(math.isfinite(summary["mean"]["model"]["all"][m]) for m in metrics.METRIC_NAMES)
    with rasterio.open(tmp_path / "geotiff" / "ROIs2017_winter_112_p797.tif") as out:
        assert out.crs.to_epsg() == 32631 and (out.height, out.width) == (256, 256)


# ----------------------------------------------------------------------------- whole-scene prediction

SCENE_H, SCENE_W = 75, 100  # not a multiple of the 32 px tile in either direction


def _write(path, data, crs="EPSG:32631", transform=from_origin(600000.0, 5700000.0, 10.0, 10.0)):
    """A GeoTIFF; crs=None writes one without georeferencing."""
    return write_geotiff(path, data, crs, transform)


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
    return _write(d / "s2_cloudy.tif", bands.denormalize_s2(cloudy)), _write(d / "s1.tif", sar)


def _whole_image_prediction(model, cloudy_path, sar_path):
    cloudy = bands.normalize_s2(rasters.read_raster(cloudy_path, 13))
    sar = bands.normalize_s1(rasters.read_raster(sar_path, 2))
    pred, _ = inference.forward(model, torch.from_numpy(cloudy)[None], torch.from_numpy(sar)[None],
                              contextlib.nullcontext())
    return bands.denormalize_s2(pred[0]).astype(np.float32)


class Pointwise(nn.Module):
    """Per-pixel network (1x1 convolutions): any tiling must reproduce its whole-image output exactly, so
    this isolates the blending arithmetic (weights summing to one, full coverage) from the model's context."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(15, 16, 1), nn.Tanh(), nn.Conv2d(16, 13, 1))

    def forward(self, optical, sar, return_aux=False):
        pred = optical + 0.1 * self.net(torch.cat([optical, sar], 1))
        return (pred, net_CR_CrossAttention.ModelOutputs(residual=pred - optical)) if return_aux else pred


@pytest.mark.parametrize("tile,overlap", [(32, 8), (32, 0), (40, 16)])
def test_tiling_reproduces_a_pointwise_model_exactly(scene, tmp_path, tile, overlap):
    model = Pointwise().eval()
    out = inference.predict_scene(model, *scene, tmp_path / "out.tif", tile=tile, overlap=overlap, batch_sz=2,
                                progress=False)
    with rasterio.open(out) as dst:
        tiled = dst.read().astype(np.float32)
    whole = _whole_image_prediction(model, *scene)
    assert tiled.shape == whole.shape == (13, SCENE_H, SCENE_W)
    # Equal up to one uint16 step: float32 blending of identical values rounds either way at most once.
    assert np.abs(tiled - whole).max() <= 1


def test_feather_weights_positive_and_tiles_cover_the_scene():
    for n, overlap in ((32, 8), (32, 0), (256, 32), (7, 3)):
        w = inference.feather(n, overlap)
        assert w.shape == (n,) and (w > 0).all() and w.max() == 1.0
        assert np.allclose(w, w[::-1])  # symmetric: both neighbours fade alike
    for length, tile, overlap in ((75, 32, 8), (100, 32, 8), (32, 32, 8), (20, 32, 8), (2048, 256, 32)):
        starts = inference.tile_starts(length, tile, overlap)
        side = min(tile, length)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + side] = True
        assert covered.all() and starts[-1] + side == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap at least `overlap`


@pytest.mark.slow
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
    model, _ = runtime.load_model(tiny_checkpoint, torch.device("cpu"))
    whole = _whole_image_prediction(model, *scene)
    diff = np.abs(tiled - whole) / bands.S2_SCALE
    # A 32 px tile gives the network less context than the whole scene, so outputs differ a little;
    # the design's residual is confidence-weighted and small, so the difference stays far below a visible step.
    # (measured: max 0.067, mean 0.0064 reflectance for this 1-epoch model on the measured land covers; it was
    # max 0.017, mean 0.0019 on the earlier synthetic spectra)
    assert diff.max() < 0.15 and diff.mean() < 0.015, (diff.max(), diff.mean())

    def seam(img, overlap):
        """Mean excess of the column-to-column jump at tile edges over the single-pass image's jump there."""
        edges = sorted({s + d for s in inference.tile_starts(SCENE_W, 32, overlap)[1:] for d in (0, overlap)})
        jump = lambda a: np.abs(np.diff(a, axis=2))[:, :, [e - 1 for e in edges]]
        return np.abs(jump(img) - jump(whole)).mean() / bands.S2_SCALE

    # No seam: feathered tiles jump at their edges as the single-pass prediction does, while hard stitching of the
    # same tiles (overlap 0) leaves a step several times larger (measured 0.0010 against 0.0081 with the plain
    # residual head; 0.0021 against 0.0149 with the affine head, the default since, whose 1-epoch model leans more
    # on each tile's context: the bound follows it, the ratio is what tells blending from stitching).
    hard = inference.predict_scene(model, *scene, tmp_path / "hard.tif", tile=32, overlap=0, progress=False)
    with rasterio.open(hard) as dst:
        stitched = dst.read().astype(np.float32)
    assert seam(tiled, 8) < 0.004 and seam(tiled, 8) < seam(stitched, 0) / 3, (seam(tiled, 8), seam(stitched, 0))


def test_mismatched_scene_inputs_name_both_files(scene, tmp_path):
    cloudy_path, sar_path = scene
    sar = rasters.read_raster(sar_path, 2)
    cases = {
        "size": _write(tmp_path / "s1_small.tif", sar[:, :70]),
        "CRS": _write(tmp_path / "s1_crs.tif", sar, crs="EPSG:32632"),
        "transform": _write(tmp_path / "s1_shift.tif", sar, transform=from_origin(600010.0, 5700000.0, 10.0, 10.0)),
        "bands": _write(tmp_path / "s1_bands.tif", sar[:1]),
    }
    for what, bad in cases.items():
        with pytest.raises(files.DataError) as e:
            inference.predict_scene(Pointwise(), cloudy_path, bad, tmp_path / "out.tif", tile=32, overlap=8,
                                  progress=False)
        assert str(bad) in str(e.value), what
        if what != "bands":
            assert what in str(e.value) and str(cloudy_path) in str(e.value)
    assert not (tmp_path / "out.tif").exists()
    with pytest.raises(ValueError, match="overlap"):
        inference.predict_scene(Pointwise(), cloudy_path, sar_path, tmp_path / "o.tif", tile=32, overlap=32)
    with pytest.raises(files.DataError, match="missing.tif"):
        inference.predict_scene(Pointwise(), tmp_path / "missing.tif", sar_path, tmp_path / "o.tif")


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.slow
def test_bad_checkpoints_name_the_file(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    common = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--results_dir",
              str(tmp_path / "r"), "--num_workers", "0"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other_arch = tmp_path / "dsen2cr_label.pth"
    ckpt = runtime.load_checkpoint(tiny_checkpoint)
    torch.save(dict(ckpt, model_name="DSen2CR", model_config={}), other_arch)  # CrossAttention weights
    not_ours = tmp_path / "state_dict_only.pth"
    torch.save(ckpt["model"], not_ours)
    for path in (tmp_path / "missing.pth", garbage, other_arch, not_ours):
        with pytest.raises(runtime.CheckpointError, match=str(path.name)):
            test_CR.main(["--checkpoint", str(path), *common])
    assert not (tmp_path / "r" / "metrics.csv").exists()


@pytest.mark.slow
def test_missing_arguments_are_named(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    with pytest.raises(runtime.UsageError, match="--data_list_filepath"):
        test_CR.main(["--checkpoint", str(tiny_checkpoint)])
    with pytest.raises(runtime.UsageError, match="--predict needs --out"):  # --sar is optional: without radar
        test_CR.main(["--predict", "--checkpoint", str(tiny_checkpoint), "--cloudy", "x.tif"])
    with pytest.raises(files.DataError, match="data.csv"):  # the synthetic list has no empty split; fake one
        bad_csv = tmp_path / "data.csv"
        bad_csv.write_text(open(csv_path).read().replace("\n3,", "\n1,"))
        test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(bad_csv),
                      "--input_data_folder", str(root), "--split", "test", "--results_dir", str(tmp_path)])



# ----------------------------------------------------------------------------- the command line a user meets

ROOT = Path(test_CR.__file__).resolve().parent


def _cli(*argv):
    return subprocess.run([sys.executable, "test_CR.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(done):
    """The `error: ...` line of a run that must fail as a user error: exit 2, no traceback, one error line, last,
    after nothing but (possibly) the progress bar."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert all(line.startswith("evaluating ") for line in lines[:-1]), done.stderr
    return lines[-1]


def test_help_shows_every_default():
    parser = test_CR.build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and not action.required and action.default is not argparse.SUPPRESS:
            assert f"(default: {action.default})" in text, action.dest


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    ([], "error: pass --data_list_filepath and --input_data_folder to evaluate a list"),
    (["--data_list_filepath", "{csv}", "--input_data_folder", "{root}", "--crop_size", "128", "--load_size", "64"],
     "error: --crop_size 128 is larger than --load_size 64, the region it is cut from"),
    (["--data_list_filepath", "{csv}", "--input_data_folder", "{root}", "--is_use_cloudmask", "True",
      "--cloud_detector", "none"], "error: --is_use_cloudmask True asks for a cloud mask but --cloud_detector is none"),
    (["--batch_sz", "0"], "error: --batch_sz must be at least 1, got 0"),
    (["--data_list_filepath", "{csv}", "--input_data_folder", "{root}", "--cloud_threshold", "0"],
     "error: --cloud_threshold must be in (0, 1] (a cloud score is), got 0.0"),
    (["--data_list_filepath", "{csv}", "--input_data_folder", "{root}", "--results_dir", "{tmp}/r",
      "--checkpoint", "{tmp}/missing.pth"], "error: checkpoint not found: {tmp}/missing.pth"),
])
def test_cli_user_errors_are_one_line_and_exit_2(extra, message, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    fill = lambda text: (text.replace("{csv}", str(csv_path)).replace("{root}", str(root))
                         .replace("{tmp}", str(tmp_path)))
    done = _cli("--checkpoint", tmp_path / "unused.pth", *map(fill, extra))
    assert _one_line_error(done).startswith(fill(message))


@pytest.mark.slow
def test_unwritable_results_folder_fails_before_any_work(synthetic_dataset, scene, tmp_path):
    root, csv_path = synthetic_dataset
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where a folder is wanted: unwritable even for root
    # The checkpoint does not exist either: the folder is checked first, before any loading or scoring.
    done = _cli("--checkpoint", tmp_path / "missing.pth", "--data_list_filepath", csv_path, "--input_data_folder",
                root, "--results_dir", blocker / "results")
    assert _one_line_error(done).startswith(f"error: cannot write to --results_dir {blocker / 'results'}: ")
    done = _cli("--predict", "--checkpoint", tmp_path / "missing.pth", "--cloudy", scene[0], "--sar", scene[1],
                "--out", blocker / "out.tif")
    assert _one_line_error(done).startswith(f"error: cannot write to the folder of --out {blocker}: ")
    if os.geteuid() != 0:  # permission bits do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(runtime.UsageError, match="Permission denied"):
            test_CR.main(["--checkpoint", str(tmp_path / "missing.pth"), "--data_list_filepath", str(csv_path),
                          "--input_data_folder", str(root), "--results_dir", str(locked)])


def test_a_wrong_list_and_a_wrong_checkpoint_are_reported_together_and_leave_no_folder(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    results = tmp_path / "runs" / "results"
    base = ["--checkpoint", str(tmp_path / "missing.pth"), "--input_data_folder", str(root), "--results_dir",
            str(results), "--device", "cpu"]
    with pytest.raises(files.DataError) as e:
        test_CR.main(base + ["--data_list_filepath", str(tmp_path / "nope.csv")])
    assert str(e.value) == (f"data list not found: {tmp_path / 'nope.csv'}; also: checkpoint not found: "
                            f"{tmp_path / 'missing.pth'}")
    assert not (tmp_path / "runs").exists()  # the results folder is checked, then removed until the inputs are good
    # A listed file of the evaluated split that is no raster is found before the checkpoint is loaded
    data = tmp_path / "data"
    rows = datalist.read_data_list(csv_path)
    broken = next(t for t in rows if t.split == 3).s1
    for t in rows:
        for rel in (t.s1, t.s2_cloudfree, t.s2_cloudy):
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).write_bytes((root / rel).read_bytes() if rel != broken else b"")
    base[base.index("--input_data_folder") + 1] = str(data)
    with pytest.raises(files.DataError) as e:
        test_CR.main(base + ["--data_list_filepath", str(csv_path)])
    assert str(e.value) == (f"cannot open {data / broken} as a raster: the file is empty (0 bytes) (download the "
                            f"file again); also: checkpoint not found: {tmp_path / 'missing.pth'}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_split_not_evaluated_that_cannot_be_read_is_named_not_checked(tiny_checkpoint, synthetic_dataset, tmp_path,
                                                                        capsys):
    root, csv_path = synthetic_dataset
    rows = datalist.read_data_list(csv_path)
    train_only = tmp_path / "list.csv"  # a train row whose files are not there (evaluated elsewhere than trained)
    datalist.write_data_list(train_only, rows + [datalist.Triplet(1, "gone/s1.tif", "gone/s2.tif",
                                                                      "gone/cloudy.tif")])
    results = tmp_path / "r"
    test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(train_only),
                  "--input_data_folder", str(root), "--results_dir", str(results), "--amp", "off",
                  "--num_workers", "0", "--device", "cpu", "--crop_size", str(CROP)])
    err = capsys.readouterr().err
    assert (f"warning: leak check of {train_only} incomplete, train-val, train-test footprints not checked: 1 "
            f"triplet(s) of the train split not read (first: file not found: {root / 'gone/s1.tif'}) (recorded in "
            f"summary.json)") in err
    check = json.loads((results / "summary.json").read_text())["leak_check"]
    assert check["not_checked"] == ["train-val", "train-test"] and check["unread"].startswith("1 triplet(s) of the")


def _copy_with_s1(src_root, t, folder, **georef):
    """Absolute-path triplet: t's S2 files, and its S1 rewritten under folder with the given crs/transform."""
    with rasterio.open(src_root / t.s1) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    folder.mkdir(parents=True, exist_ok=True)
    s1 = _write(folder / Path(t.s1).name, data, crs=georef.get("crs", crs),
                transform=georef.get("transform", transform))
    return datalist.Triplet(3, str(s1), str(src_root / t.s2_cloudfree), str(src_root / t.s2_cloudy))


@pytest.mark.slow
def test_a_file_that_fails_mid_evaluation_stops_it_with_one_line_and_keeps_the_rows_so_far(tiny_checkpoint,
                                                                                         synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    test_rows = datalist.select_split(datalist.read_data_list(csv_path), "test")
    good = datalist.Triplet(3, *(str(root / p) for p in (test_rows[0].s1, test_rows[0].s2_cloudfree,
                                                           test_rows[0].s2_cloudy)))
    misaligned = _copy_with_s1(root, test_rows[1], tmp_path / "bad", crs="EPSG:32650")
    results = tmp_path / "results"
    run = lambda listed: _cli("--checkpoint", tiny_checkpoint, "--data_list_filepath", listed, "--input_data_folder",
                              "/", "--results_dir", results, "--batch_sz", "1", "--num_workers", "1", "--amp", "off",
                              "--device", "cpu")
    # A misaligned triplet shows in the headers: found before any work, no results folder made.
    error = _one_line_error(run(datalist.write_data_list(tmp_path / "misaligned.csv", [good, misaligned])))
    assert error.startswith(f"error: {misaligned.s1} and {misaligned.s2_cloudy} are not on the same grid: CRS "
                            f"EPSG:32650 vs EPSG:32631"), error
    assert not results.exists()
    # A truncated download's header reads and its pixels do not: found when its batch is read. Workers load the
    # data (the error crosses a process boundary) and the batch of one makes the good image complete first.
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(Path(root / test_rows[1].s2_cloudfree).read_bytes())
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    bad = datalist.Triplet(3, str(root / test_rows[1].s1), str(truncated), str(root / test_rows[1].s2_cloudy))
    error = _one_line_error(run(datalist.write_data_list(tmp_path / "only_bad.csv", [bad])))
    assert error.startswith(f"error: cannot read {truncated}: ") and not results.exists()  # no row: nothing kept
    error = _one_line_error(run(datalist.write_data_list(tmp_path / "data.csv", [good, bad])))
    assert error.startswith(f"error: cannot read {truncated}: "), error
    # The long-evaluation rule: rows are written as they are scored, so the finished image is kept.
    partial = list(csv.DictReader(open(results / test_CR.PARTIAL_CSV)))
    assert [r["file_name"] for r in partial] == [Path(good.s2_cloudy).name]
    assert math.isfinite(float(partial[0]["model_PSNR"])) and not (results / "metrics.csv").exists()


@pytest.fixture(scope="module")
def synthetic_256(tmp_path_factory):
    """Three 256 px synthetic triplets (SEN12MS-CR's patch size), one in the test split."""
    root = tmp_path_factory.mktemp("synthetic_256")
    return root, synthetic_sets.make_synthetic_dataset(root, n=3, size=256, seed=1)


@pytest.mark.slow
def test_protocols_full_and_glfcr(synthetic_256, tiny_checkpoint, tmp_path):
    root, csv_path = synthetic_256
    common = ["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(csv_path), "--input_data_folder",
              str(root), "--amp", "off", "--num_workers", "0", "--device", "cpu", "--save_geotiff"]
    run = lambda name, *flags: test_CR.evaluate(test_CR.build_parser().parse_args(
        common + ["--results_dir", str(tmp_path / name), *flags]))
    full, glfcr = run("full"), run("glfcr", "--protocol", "glfcr")
    copied = run("copied", "--load_size", "256", "--crop_size", "128")  # GLF-CR's command-line flags
    custom = run("custom", "--crop_size", "64")
    assert [s["protocol"] for s in (full, glfcr, copied, custom)] == ["full", "glfcr", "glfcr", "custom"]
    assert (full["load_size"], full["crop_size"], glfcr["load_size"], glfcr["crop_size"]) == (None, None, 256, 128)
    assert json.loads((tmp_path / "glfcr" / "summary.json").read_text())["protocol"] == "glfcr"
    assert copied["mean"] == glfcr["mean"] and full["mean"] != glfcr["mean"]
    # glfcr scores exactly the centred 128 px of the 256 px patch.
    t = datalist.select_split(datalist.read_data_list(csv_path), "test")[0]
    sample = dataloader.SEN12MSCRDataset([t], root)[0]
    centre = (slice(None), slice(None), slice(64, 192), slice(64, 192))
    identity = metrics.compute_metrics(sample["cloudy_data"][None][centre], sample["cloudfree_data"][None][centre])
    assert _close(glfcr["mean"]["identity"]["all"]["PSNR"], float(identity["PSNR"][0]))
    for name, side, offset in (("full", 256, 0), ("glfcr", 128, 64)):
        with rasterio.open(next((tmp_path / name / "geotiff").iterdir())) as out, \
                rasterio.open(root / t.s2_cloudy) as src:
            assert (out.height, out.width) == (side, side) and out.xy(0, 0) == src.xy(offset, offset)


@pytest.mark.slow
def test_save_first_bounds_the_saved_files_and_still_scores_every_image(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(csv_path),
                  "--input_data_folder", str(root), "--results_dir", str(tmp_path), "--save_geotiff", "--save_png",
                  "--save_confidence", "--save_first", "3", "--batch_sz", "2", "--crop_size", "32", "--amp", "off",
                  "--num_workers", "0", "--device", "cpu"])
    scored = [Path(r["file_name"]).stem for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert len(scored) == 4  # the limit crosses a batch boundary (batches of 2)
    for sub, ext in (("geotiff", ".tif"), ("png", ".png"), ("confidence", ".tif")):
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == sorted(f"{n}{ext}" for n in scored[:3]), sub
    done = _cli("--checkpoint", tiny_checkpoint, "--data_list_filepath", csv_path, "--input_data_folder", root,
                "--save_png", "--save_first", "-1")
    assert _one_line_error(done).startswith("error: --save_first must be 0 or more, got -1")


@pytest.mark.slow
def test_is_use_cloudmask_follows_glfcr(tiny_checkpoint, synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    parse = lambda *flags: test_CR.build_parser().parse_args(["--checkpoint", str(tiny_checkpoint), *flags])
    assert parse().is_use_cloudmask is None and parse("--is_use_cloudmask").is_use_cloudmask is True
    assert parse("--is_use_cloudmask", "false").is_use_cloudmask is False
    with pytest.raises(SystemExit):
        parse("--is_use_cloudmask", "maybe")
    summary = test_CR.evaluate(parse("--data_list_filepath", str(csv_path), "--input_data_folder", str(root),
                                     "--results_dir", str(tmp_path), "--is_use_cloudmask", "False", "--amp", "off",
                                     "--num_workers", "0", "--crop_size", "32"))
    assert summary["cloud_detector"] == "none" and summary["mean"]["model"]["cloudy"]["PSNR"] is None
    assert summary["cloud_cover_bins"]["0-10"]["n"] == summary["n_images"]


@pytest.mark.slow
def test_rasters_without_georeferencing_evaluate_and_predict(tiny_checkpoint, synthetic_dataset, scene, tmp_path):
    root, csv_path = synthetic_dataset
    plain = []
    for t in datalist.select_split(datalist.read_data_list(csv_path), "test")[:2]:
        paths = []
        for rel in (t.s1, t.s2_cloudfree, t.s2_cloudy):
            with rasterio.open(root / rel) as src:
                paths.append(str(_write(tmp_path / Path(rel).name, src.read(), crs=None)))
        plain.append(datalist.Triplet(3, *paths))
    listed = datalist.write_data_list(tmp_path / "plain.csv", plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rasterio.errors.NotGeoreferencedWarning)
        summary = test_CR.main(["--checkpoint", str(tiny_checkpoint), "--data_list_filepath", str(listed),
                                "--input_data_folder", "/", "--results_dir", str(tmp_path / "r"), "--save_geotiff",
                                "--amp", "off", "--num_workers", "0", "--crop_size", "32"])
    assert summary == 0
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert len(rows) == 2 and all(math.isfinite(float(r["model_PSNR"])) for r in rows)
    with rasterio.open(tmp_path / "r" / "geotiff" / (Path(plain[0].s2_cloudy).stem + ".tif")) as out:
        assert out.crs is None and out.count == 13 and (out.height, out.width) == (32, 32)
    cloudy, sar = (_write(tmp_path / f"scene_{i}.tif", rasters.read_raster(p, n).astype(dtype), crs=None)
                   for i, (p, n, dtype) in enumerate(((scene[0], 13, np.uint16), (scene[1], 2, np.float32))))
    out = inference.predict_scene(Pointwise(), cloudy, sar, tmp_path / "scene_out.tif", tile=32, overlap=8,
                                progress=False)
    with rasterio.open(out) as dst:
        assert dst.crs is None and (dst.height, dst.width) == (SCENE_H, SCENE_W)


@pytest.mark.slow
def test_predict_never_overwrites_an_input_and_asks_before_replacing_an_output(scene, tiny_checkpoint, tmp_path):
    cloudy, sar = scene
    before = cloudy.read_bytes()
    common = ["--predict", "--checkpoint", str(tiny_checkpoint), "--tile", "32", "--overlap", "8", "--amp", "off",
              "--device", "cpu"]
    same_file = cloudy.parent / ".." / cloudy.parent.name / cloudy.name  # another spelling of the input
    linked = tmp_path / "link_to_sar.tif"
    linked.symlink_to(sar)
    for out, flag in ((same_file, "--cloudy"), (linked, "--sar")):
        with pytest.raises(runtime.UsageError, match=f"is the {flag} input: writing there would destroy it"):
            test_CR.main(common + ["--cloudy", str(cloudy), "--sar", str(sar), "--out", str(out), "--overwrite"])
    assert cloudy.read_bytes() == before
    done = _cli(*common, "--cloudy", cloudy, "--sar", sar, "--out", cloudy)
    assert _one_line_error(done).startswith(f"error: --out {cloudy} is the --cloudy input")
    assert cloudy.read_bytes() == before
    out = tmp_path / "cloudfree.tif"
    out.write_bytes(b"an earlier result")
    with pytest.raises(runtime.UsageError, match="exists; pass --overwrite to replace it"):
        test_CR.main(common + ["--cloudy", str(cloudy), "--sar", str(sar), "--out", str(out)])
    assert out.read_bytes() == b"an earlier result"
    assert test_CR.main(common + ["--cloudy", str(cloudy), "--sar", str(sar), "--out", str(out), "--overwrite"]) == 0
    with rasterio.open(out) as dst:
        assert (dst.count, dst.height, dst.width) == (13, SCENE_H, SCENE_W)


def test_predict_refuses_s2_already_scaled_to_float_reflectance(scene, tmp_path):
    cloudy, sar = scene
    scaled = _write(tmp_path / "s2_float01.tif", rasters.read_raster(cloudy, 13) / bands.S2_SCALE)
    with pytest.raises(files.DataError, match=r"expected reflectance x10000 \(uint16") as e:
        inference.predict_scene(Pointwise(), scaled, sar, tmp_path / "out.tif", tile=32, overlap=8, progress=False)
    assert str(scaled) in str(e.value) and "gdal_translate" in str(e.value)
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.slow
def test_an_ensemble_of_one_checkpoint_twice_has_no_spread_and_still_writes_its_summary(tiny_checkpoint,
                                                                                       synthetic_dataset, tmp_path):
    """Members without a head that agree (best.pth = last.pth after one epoch): the predicted std is 0 everywhere,
    so ratios of stds have no value; the evaluation says so (None) instead of dividing by zero after scoring."""
    root, csv_path = synthetic_dataset
    assert test_CR.main(["--checkpoint", str(tiny_checkpoint), str(tiny_checkpoint), "--data_list_filepath",
                         str(csv_path), "--input_data_folder", str(root), "--split", "test", "--results_dir",
                         str(tmp_path / "r"), "--crop_size", str(CROP), "--amp", "off", "--num_workers", "0",
                         "--device", "cpu"]) == 0
    u = json.loads((tmp_path / "r" / "summary.json").read_text())["uncertainty"]
    assert u["epistemic_std"] == 0.0 and u["cloudy_clear_ratio"] is None
