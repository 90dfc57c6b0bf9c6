"""Sentinel-2 products (issue 29): one band table for L1C (13 bands) and L2A (12, no B10), the radiometric offset
removed per file (its metadata, else --s2_offset), L2A synthetic data, training and evaluation with
--s2_product L2A, and a checkpoint that refuses the other product's files in one line naming both."""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import bands
import clouds
import datalist
import dataloader
import files
import net_CR_CrossAttention
import rasters
import runtime
import synthetic_sets
import test_CR

ROOT = Path(__file__).resolve().parents[1]
L2A = bands.S2_PRODUCTS["L2A"]


def _write(path, data, tags=None, band_tags=None, offsets=None, scales=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32631", transform=from_origin(600000, 5700000, 10, 10)) as dst:
        dst.write(data)
        dst.update_tags(**(tags or {}))
        for band, value in enumerate(band_tags or (), start=1):
            dst.update_tags(band, BOA_ADD_OFFSET=str(value))
        if offsets is not None:
            dst.offsets, dst.scales = offsets, scales
    return path


def test_the_band_table_of_each_product():
    assert bands.s2_bands("L1C") == bands.S2_BANDS and len(bands.S2_BANDS) == 13
    assert L2A == tuple(b for b in bands.S2_BANDS if b != "B10") and len(L2A) == 12
    assert bands.s2_product_of_count(13) == "L1C" and bands.s2_product_of_count(12) == "L2A"
    assert bands.s2_product_of_count(4) is None
    for product in bands.S2_PRODUCTS:  # true colour is the same three indices in both
        index = bands.s2_band_index(product)
        assert (index["B4"], index["B3"], index["B2"]) == bands.RGB_BANDS
    assert bands.s2_band_index("L2A")["B11"] == 10 and bands.s2_band_index("L1C")["B11"] == 11
    with pytest.raises(ValueError, match="unknown Sentinel-2 product 'L3'"):
        bands.s2_bands("L3")


def test_the_offset_is_added_before_the_scaling():
    dn = np.array([[[0, 500, 1000, 1452, 11000, 12000]]], dtype=np.uint16)
    np.testing.assert_array_equal(bands.normalize_s2(dn), bands.normalize_s2(dn, 0))  # SEN12MS-CR: unchanged
    got = bands.normalize_s2(dn, -1000)
    np.testing.assert_allclose(got[0, 0], [0, 0, 0, 0.0452, 1.0, 1.0], atol=1e-7)  # ESA's example: 1452 -> 0.0452
    as_float = bands.normalize_s2(dn.astype(np.float32), np.array([-1000]))
    np.testing.assert_allclose(as_float, got, atol=1e-7)
    per_band = bands.normalize_s2(np.full((2, 1, 1), 3000, np.uint16), np.array([-1000, 0]))
    np.testing.assert_allclose(per_band[:, 0, 0], [0.2, 0.3], atol=1e-7)


def test_the_offset_of_a_file_comes_from_its_metadata(tmp_path):
    dn = np.full((12, 4, 4), 2000, np.uint16)
    cases = {
        "none": ({}, None, None, None, [7] * 12),  # the default (--s2_offset) where the file says nothing
        "dataset_tag": ({"BOA_ADD_OFFSET": "-1000"}, None, None, None, [-1000] * 12),
        "l1c_tag": ({"RADIO_ADD_OFFSET": "-1000"}, None, None, None, [-1000] * 12),
        "band_tags": ({}, [-1000] * 11 + [-900], None, None, [-1000] * 11 + [-900]),
        "gdal": ({}, None, [-0.1] * 12, [0.0001] * 12, [-1000] * 12),
    }
    for name, (tags, band_tags, offsets, scales, expected) in cases.items():
        path = _write(tmp_path / f"{name}.tif", dn, tags, band_tags, offsets, scales)
        with rasterio.open(path) as src:
            np.testing.assert_array_equal(rasters.s2_offset(src, default=7), expected, err_msg=name)
    bad = {"contradiction": ({"BOA_ADD_OFFSET": "-1000"}, None, [0.1] * 12, [0.0001] * 12, "GDAL's band offset"),
           "quantification": ({"BOA_QUANTIFICATION_VALUE": "1000"}, None, None, None, "x10000 only"),
           "not_a_number": ({"BOA_ADD_OFFSET": "minus"}, None, None, None, "is not a number")}
    for name, (tags, band_tags, offsets, scales, message) in bad.items():
        path = _write(tmp_path / f"{name}.tif", dn, tags, band_tags, offsets, scales)
        with rasterio.open(path) as src, pytest.raises(files.DataError, match=message) as e:
            rasters.s2_offset(src)
        assert str(path) in str(e.value)


def test_the_cloud_detectors_take_each_product_s_bands():
    rng = np.random.default_rng(0)
    l1c = rng.uniform(0, 0.6, (13, 24, 24)).astype(np.float32)
    l1c[bands.S2_BAND_INDEX["B10"]] = 0.0  # where B10 reads 0 (clear land, thick cloud) L2A scores as L1C
    l2a = np.delete(l1c, bands.S2_BAND_INDEX["B10"], axis=0)
    np.testing.assert_array_equal(clouds.rule_cloud_score(l2a), clouds.rule_cloud_score(l1c))
    np.testing.assert_array_equal(clouds.shadow_mask(l2a), clouds.shadow_mask(l1c))
    for detector in ("s2cloudless", "s2cloudless_prob"):
        with pytest.raises(ValueError, match="needs Sentinel-2 L1C .* on L2A use the rule detector"):
            clouds.cloud_score(l2a, detector)
    with pytest.raises(ValueError, match="13 \\(L1C\\) or 12 \\(L2A\\)"):
        clouds.rule_cloud_score(l1c[:5])


@pytest.fixture(scope="module")
def both_products(tmp_path_factory):
    """{product: (root, csv)}: the same 6 synthetic triplets of 32 px written as L1C and as L2A."""
    out = {}
    for product in bands.S2_PRODUCTS:
        root = tmp_path_factory.mktemp(f"synthetic_{product}")
        out[product] = root, synthetic_sets.make_synthetic_dataset(root, n=6, size=32, seed=3, s2_product=product)
    return out


def test_synthetic_l2a_is_l1c_without_b10_with_the_offset_recorded(both_products):
    (l1c_root, l1c_csv), (l2a_root, _) = both_products["L1C"], both_products["L2A"]
    t = datalist.read_data_list(l1c_csv)[0]
    with rasterio.open(l1c_root / t.s2_cloudy) as a, rasterio.open(l2a_root / t.s2_cloudy) as b:
        assert (a.count, b.count) == (13, 12)
        assert a.tags().get("BOA_ADD_OFFSET") is None and b.tags()["BOA_ADD_OFFSET"] == "-1000"
        assert b.descriptions == L2A
        dn_l1c, dn_l2a = a.read().astype(np.int32), b.read().astype(np.int32)
    np.testing.assert_array_equal(np.delete(dn_l1c, bands.S2_BAND_INDEX["B10"], axis=0) + 1000, dn_l2a)


def test_the_dataset_removes_the_offset_and_reads_the_product_s_bands(both_products):
    (l1c_root, l1c_csv), (l2a_root, _) = both_products["L1C"], both_products["L2A"]
    rows = datalist.read_data_list(l1c_csv)
    l1c = dataloader.SEN12MSCRDataset(rows, l1c_root, cloud_detector="none")[0]
    l2a = dataloader.SEN12MSCRDataset(rows, l2a_root, cloud_detector="rule", s2_product="L2A")[0]
    keep = [bands.S2_BAND_INDEX[b] for b in L2A]
    for key in ("cloudy_data", "cloudfree_data"):
        assert l2a[key].shape[0] == 12
        torch.testing.assert_close(l2a[key], l1c[key][keep], rtol=0, atol=0)
    # --s2_offset does not override a file's own offset
    again = dataloader.SEN12MSCRDataset(rows, l2a_root, cloud_detector="none", s2_product="L2A", s2_offset=-500)[0]
    torch.testing.assert_close(again["cloudy_data"], l2a["cloudy_data"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="s2cloudless needs Sentinel-2 L1C"):
        dataloader.SEN12MSCRDataset(rows, l2a_root, cloud_detector="s2cloudless", s2_product="L2A")


def test_a_file_of_the_other_product_is_refused_in_one_line_naming_both(both_products):
    (l2a_root, l2a_csv), (l1c_root, _) = both_products["L2A"], both_products["L1C"]
    rows = datalist.read_data_list(l2a_csv)
    with pytest.raises(files.DataError) as e:
        dataloader.SEN12MSCRDataset(rows, l2a_root, cloud_detector="none")[0]
    message = str(e.value)
    assert "\n" not in message and "expected 13 bands" not in message
    assert "12 bands, i.e. Sentinel-2 L2A" in message and "this run is L1C" in message
    assert message.endswith("pass --s2_product L2A")
    with pytest.raises(files.DataError, match="13 bands, i.e. Sentinel-2 L1C .* this run is L2A .* --s2_product L1C"):
        rasters.check_listed_files(rows, l1c_root, s2_product="L2A")


def untrained_checkpoint(path, s2_product, **config):
    """A checkpoint as train_CR_kaggle.py writes one (the keys runtime.load_checkpoint reads), of an untrained small
    network for s2_product's bands."""
    model = net_CR_CrossAttention.create_model("CrossAttention", in_optical=len(bands.s2_bands(s2_product)),
                                               widths=(16, 32, 64), heads=2, **config)
    runtime.save_checkpoint({"model": model.state_dict(), "model_name": "CrossAttention",
                             "model_config": asdict(model.config), "s2_product": s2_product}, path)
    return path


def test_checkpoints_know_their_product(tmp_path):
    ckpt = runtime.load_checkpoint(untrained_checkpoint(tmp_path / "l2a.pth", "L2A"))
    assert runtime.s2_product_of(ckpt) == "L2A"
    assert runtime.build_model_from_checkpoint(ckpt).in_optical == 12
    assert runtime.s2_product_of({"model_config": {}, "args": {}}) == "L1C"  # written before the choice existed
    with pytest.raises(runtime.CheckpointError, match="different Sentinel-2 products: a.pth \\(L1C\\), b.pth"):
        runtime.checkpoints_s2_product([{"s2_product": "L1C"}, {"s2_product": "L2A"}], ["a.pth", "b.pth"])


def _cli(*argv):
    return subprocess.run([sys.executable, "test_CR.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _error_line(done):
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _in_process_error(*argv):
    """test_CR.main's one error, as the script prints it after 'error: ' (runtime.run_cli)."""
    with pytest.raises(runtime.USER_ERRORS) as raised:
        test_CR.main([str(a) for a in argv])
    return "error: " + str(raised.value)


@pytest.mark.slow
def test_an_l1c_checkpoint_refuses_l2a_data_and_the_reverse(both_products, tmp_path):
    for ckpt_product, (root, csv_path), data_product in (("L1C", both_products["L2A"], "L2A"),
                                                          ("L2A", both_products["L1C"], "L1C")):
        ckpt = untrained_checkpoint(tmp_path / f"{ckpt_product}.pth", ckpt_product)
        evaluate = ("--checkpoint", ckpt, "--data_list_filepath", csv_path, "--input_data_folder", root, "--split",
                    "train", "--results_dir", tmp_path / "results", "--device", "cpu")
        # the script's one line once (a process of its own), the rest in this process
        line = _error_line(_cli(*evaluate)) if ckpt_product == "L1C" else _in_process_error(*evaluate)
        assert f"i.e. Sentinel-2 {data_product}" in line and f"this run is {ckpt_product}" in line, line
        assert f"trained on Sentinel-2 {ckpt_product}" in line and f"--s2_product {data_product}" in line, line
        t = datalist.read_data_list(csv_path)[0]
        line = _in_process_error("--predict", "--checkpoint", ckpt, "--cloudy", root / t.s2_cloudy, "--sar",
                                 root / t.s1, "--out", tmp_path / "out.tif", "--device", "cpu")
        assert f"i.e. Sentinel-2 {data_product}" in line and f"trained on Sentinel-2 {ckpt_product}" in line, line


@pytest.mark.slow
def test_l2a_trains_evaluates_and_predicts(both_products, tmp_path):
    import train_CR_kaggle as train

    root, csv_path = both_products["L2A"]
    argv = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
            str(tmp_path), "--experiment_name", "l2a", "--max_epochs", "1", "--batch_sz", "2", "--load_size", "32",
            "--crop_size", "16", "--val_crop_size", "32", "--num_workers", "0", "--vgg_weights", "random",
            "--perceptual_weight", "0", "--amp", "off", "--warmup_epochs", "0.5", "--num_quicklooks", "0",
            "--s2_product", "L2A", "--channels_last", "off"]
    assert train.main(argv) == 0
    ckpt_path = tmp_path / "l2a" / "last.pth"
    ckpt = runtime.load_checkpoint(ckpt_path)
    assert ckpt["s2_product"] == "L2A" and ckpt["model_config"]["in_optical"] == 12
    l1c_root, l1c_csv = both_products["L1C"]
    as_l1c = {str(csv_path): str(l1c_csv), str(root): str(l1c_root), "L2A": "L1C"}
    with pytest.raises(runtime.UsageError, match="trained on Sentinel-2 L2A, this run is --s2_product L1C"):
        train.main([as_l1c.get(a, a) for a in argv])  # resuming it on L1C data
    with pytest.raises(runtime.UsageError, match="s2cloudless with --s2_product L2A"):
        train.main(argv + ["--cloud_detector", "s2cloudless", "--experiment_name", "other"])

    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(ckpt_path), "--data_list_filepath", str(csv_path), "--input_data_folder", str(root),
        "--split", "train", "--results_dir", str(tmp_path / "results"), "--save_geotiff", "--num_workers", "0",
        "--device", "cpu", "--amp", "off"]))
    assert summary["s2_product"] == "L2A" and summary["s2_bands"] == list(L2A) and summary["s2_offset"] == 0
    saved = sorted((tmp_path / "results" / "geotiff").glob("*.tif"))
    with rasterio.open(saved[0]) as src:
        assert src.count == 12 and src.descriptions == L2A

    t = datalist.read_data_list(csv_path)[0]
    out = tmp_path / "scene.tif"
    assert test_CR.main(["--predict", "--checkpoint", str(ckpt_path), "--cloudy", str(root / t.s2_cloudy), "--sar",
                         str(root / t.s1), "--out", str(out), "--tile", "16", "--overlap", "4", "--device", "cpu",
                         "--amp", "off"]) == 0
    with rasterio.open(out) as src:
        assert src.count == 12 and src.descriptions == L2A and src.dtypes[0] == "uint16"
        assert not src.tags().get("BOA_ADD_OFFSET")  # the output is reflectance x10000, no offset
