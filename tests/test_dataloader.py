"""dataloader.py: list formats, layouts, normalisation, errors, crops, cloud masks, scan, synthetic data."""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
import scipy.ndimage
import scipy.signal
import torch
from geotiff import write_geotiff
from rasterio.transform import from_origin

import bands
import cloud_masks
import clouds
import datalist
import dataloader as D
import files
import rasters
import scanning
import splits
import synthetic_sets

# ----------------------------------------------------------------------------------------------- helpers

def _write(path, data, transform=from_origin(500000, 5600000, 10, 10), crs="EPSG:32631"):
    """A GeoTIFF; crs=None writes one without georeferencing."""
    return write_geotiff(path, data, crs, transform)


def _official_name(triplet, mod):
    """(region-season, scene, patch) of a triplet -> official file name of modality mod."""
    roi, scene = scanning.scene_of(triplet)
    patch = Path(triplet.s2_cloudy).stem.rsplit("_p", 1)[1]
    return f"{roi}_{mod}_{scene}_p{patch}.tif"


def _three_layouts(src_root, triplet, tmp_path):
    """Copy one triplet into a GLF-CR 5-column tree, a Kaggle 7-column list and a triple-nested tree found by
    scan. Returns [(root, triplets)] for the three."""
    files = [src_root / p for p in (triplet.s1, triplet.s2_cloudfree, triplet.s2_cloudy)]
    roi, scene = scanning.scene_of(triplet)
    # 5 columns: same file name in three folders.
    five = tmp_path / "five"
    for folder, f in zip(("s1", "s2_cloudfree", "s2_cloudy"), files):
        (five / folder).mkdir(parents=True)
        shutil.copy(f, five / folder / "patch.tif")
    (five / "data.csv").write_text("1,s1,s2_cloudfree,s2_cloudy,patch.tif\n")
    # 7 columns, with header, written by write_data_list.
    seven = tmp_path / "seven.csv"
    # absolute paths, root "/"
    datalist.write_data_list(seven, [datalist.Triplet(1, *(str(f.resolve()) for f in files))])
    # Kaggle triple nesting, found by scan.
    nested = tmp_path / "nested"
    for mod, f in zip(("s1", "s2", "s2_cloudy"), files):
        d = nested / f"{roi}_{mod}" / f"{roi}_{mod}" / f"{roi}_{mod}" / f"{mod}_{scene}"
        d.mkdir(parents=True)
        shutil.copy(f, d / _official_name(triplet, mod))
    scanned, unpartnered = scanning.scan_layout(nested)
    assert len(scanned) == 1 and unpartnered == []
    return [(five, datalist.read_data_list(five / "data.csv")), (Path("/"), datalist.read_data_list(seven)),
            (nested, scanned)]


@pytest.fixture(scope="module")
def synth(synthetic_dataset):
    root, csv_path = synthetic_dataset
    return root, datalist.read_data_list(csv_path)


# ----------------------------------------------------------------------------------------------- real sample

def test_real_sample_shapes_dtypes_ranges(real_sample_dir):
    triplets = datalist.read_data_list(real_sample_dir / "data.csv")
    sample = D.SEN12MSCRDataset(triplets, real_sample_dir)[0]
    assert sample["cloudy_data"].shape == sample["cloudfree_data"].shape == (13, 256, 256)
    assert sample["SAR_data"].shape == (2, 256, 256) and sample["cloud_mask"].shape == (1, 256, 256)
    for key in ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask"):
        assert sample[key].dtype == torch.float32
        assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0, key
    assert sample["file_name"] == "ROIs2017_winter_112_p797.tif"
    # Values are the published convention, checked against the raw files.
    with rasterio.open(real_sample_dir / "s2_cloudfree" / "ROIs2017_winter_112_p797.tif") as src:
        raw_s2 = src.read().astype(np.float32)
    with rasterio.open(real_sample_dir / "s1" / "ROIs2017_winter_112_p797.tif") as src:
        raw_s1 = src.read().astype(np.float32)
    np.testing.assert_allclose(sample["cloudfree_data"].numpy(), np.clip(raw_s2, 0, 10000) / 10000, atol=1e-6)
    np.testing.assert_allclose(sample["SAR_data"][1].numpy(), (np.clip(raw_s1[1], -32.5, 0) + 32.5) / 32.5,
                               atol=1e-6)


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_five_seven_and_scanned_layouts_give_identical_tensors(source, synth, request, tmp_path):
    if source == "real":
        root = request.getfixturevalue("real_sample_dir")
        # The real sample is in the 5-column layout; give it official names first.
        t = datalist.read_data_list(root / "data.csv")[0]
        official = tmp_path / "official"
        triplet = datalist.Triplet(1, *(f"{m}/ROIs2017_winter_{m}_112_p797.tif" for m in ("s1", "s2", "s2_cloudy")))
        for rel, src in zip((triplet.s1, triplet.s2_cloudfree, triplet.s2_cloudy), (t.s1, t.s2_cloudfree, t.s2_cloudy)):
            (official / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / src, official / rel)
        root = official
    else:
        root, triplets = synth
        triplet = triplets[6]  # the patch with a NaN block in S1
    outs = [D.SEN12MSCRDataset(ts, r, crop_size=32)[0] for r, ts in _three_layouts(root, triplet, tmp_path)]
    for key in ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask", "window"):
        assert torch.equal(outs[0][key], outs[1][key]) and torch.equal(outs[0][key], outs[2][key]), key


# ----------------------------------------------------------------------------------------------- list files

def test_header_optional_and_tab_separated(tmp_path):
    rows = [["1", "a", "b", "c", "x.tif"], ["3", "a", "b", "c", "y.tif"]]
    with_header = tmp_path / "h.csv"
    with_header.write_text("split,s1_folder,s2_cloudfree_folder,s2_cloudy_folder,filename\n"
                           + "".join(",".join(r) + "\n" for r in rows))
    no_header = tmp_path / "n.csv"
    no_header.write_text("\n".join(",".join(r) for r in rows) + "\n\n")
    tsv = tmp_path / "t.csv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    expect = [datalist.Triplet(1, "a/x.tif", "b/x.tif", "c/x.tif"),
              datalist.Triplet(3, "a/y.tif", "b/y.tif", "c/y.tif")]
    for p in (with_header, no_header, tsv):
        assert datalist.read_data_list(p) == expect
    train, val, test = D.get_train_val_test_filelists(no_header)
    assert (len(train), len(val), len(test)) == (1, 0, 1)
    # 7 columns round trip through write_data_list (header) and back.
    seven = datalist.write_data_list(tmp_path / "seven.csv", expect)
    assert datalist.read_data_list(seven) == expect
    assert next(csv.reader(open(seven))) == list(datalist.KAGGLE_HEADER)


@pytest.mark.parametrize("bad_line, message", [
    ("1,a,b,c", "expected 5 columns"),
    ("7,a,b,c,x.tif", "split must be 1"),
    ("1,a,,c,x.tif", "empty folder or file name"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    p = tmp_path / "data.csv"
    p.write_text("split,a,b,c,name\n1,a,b,c,x.tif\n" + bad_line + "\n")
    with pytest.raises(files.DataError, match=message) as e:
        datalist.read_data_list(p)
    assert f"{p}:3" in str(e.value)


def test_empty_split_and_empty_list_are_clear_errors(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("1,a,b,c,x.tif\n")
    with pytest.raises(files.DataError, match=r"no rows with split 3 \(test\)") as e:
        datalist.select_split(datalist.read_data_list(p), "test", source=p)
    assert str(p) in str(e.value)
    with pytest.raises(files.DataError, match="empty"):
        D.SEN12MSCRDataset([], tmp_path)
    (tmp_path / "blank.csv").write_text("split,a,b,c,name\n")
    with pytest.raises(files.DataError, match="no data rows"):
        datalist.read_data_list(tmp_path / "blank.csv")


_FIVE = [datalist.Triplet(1, "a/x.tif", "b/x.tif", "c/x.tif"), datalist.Triplet(3, "a/y.tif", "b/y.tif", "c/y.tif")]


@pytest.mark.parametrize("name, data", [
    ("excel_bom_crlf.csv", "\ufeff1,a,b,c,x.tif\r\n3,a,b,c,y.tif\r\n".encode()),  # Excel's "CSV UTF-8"
    ("header_bom.csv", "\ufeffsplit,s1,s2,s2_cloudy,name\n1,a,b,c,x.tif\n3,a,b,c,y.tif\n".encode()),
    ("semicolon.csv", b"1;a;b;c;x.tif\n3;a;b;c;y.tif\n"),  # Excel where the decimal mark is a comma
    ("pandas_index.csv", b",split,s1,s2,s2_cloudy,name\n0,1,a,b,c,x.tif\n1,3,a,b,c,y.tif\n"),  # to_csv() as is
    ("words.tsv", b"train\ta\tb\tc\tx.tif\ntest\ta\tb\tc\ty.tif\n"),
])
def test_list_formats_users_save_are_read_as_what_they_are(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    assert datalist.read_data_list(tmp_path / name) == _FIVE  # a BOM used to turn the first row into a dropped header


@pytest.mark.parametrize("data, seen", [
    (b"PK\x03\x04rest of an xlsx", "is a ZIP archive or Excel workbook (save it as CSV)"),
    (b"\x1f\x8b\x08gzip", "is a gzip archive"),
    (b"II*\x00tiff", "is a TIFF image"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>",
     "is an HTML or XML page (a download that returned a web page?)"),
    (b'{"train": ["ROIs1158_spring_s1/s1_1"]}', "is a JSON file"),
])
def test_a_file_that_is_no_list_is_named_with_the_formats_read(tmp_path, data, seen):
    p = tmp_path / "data.csv"
    p.write_bytes(data)
    with pytest.raises(files.DataError) as e:
        datalist.read_data_list(p)
    assert str(e.value).startswith(f"data list {p} {seen}, not a list; read: GLF-CR 5 columns")


def test_a_plain_list_of_names_and_a_folder_are_named(tmp_path):
    names = tmp_path / "test.txt"  # a split file of patch names, as SEN12MS and many forks keep them
    names.write_text("ROIs1158_spring_s1_1_p30.tif\nROIs1158_spring_s1_1_p31.tif\n")
    with pytest.raises(files.DataError, match=rf"{names}:1: one name per line .*dataloader.py scan ROOT .*"
                                              rf"Read: GLF-CR 5 columns"):
        datalist.read_data_list(names)
    with pytest.raises(files.DataError, match=rf"data list {tmp_path} is a folder; .*scan {tmp_path} --out"):
        datalist.read_data_list(tmp_path)
    four = tmp_path / "four.csv"
    four.write_text("1,a/x.tif,b/x.tif,c/x.tif\n")
    with pytest.raises(files.DataError, match=rf"{four}:1: expected 5 columns .* got 4: .*; read: GLF-CR"):
        datalist.read_data_list(four)


@pytest.mark.parametrize("kind, cause", [("folder", "is a folder, not a GeoTIFF file"),
                                         ("empty", "the file is empty (0 bytes)"),
                                         ("html", "the file is a web page or JSON text, not a GeoTIFF")])
def test_a_listed_file_that_is_no_raster_names_its_cause(tmp_path, kind, cause):
    bad = tmp_path / "cloudy" / "p.tif"
    bad.parent.mkdir()
    if kind == "folder":
        bad.mkdir()
    else:
        bad.write_bytes(b"" if kind == "empty" else b"<html><body>404 Not Found</body></html>")
    with pytest.raises(files.DataError, match=re.escape(cause)) as e:
        rasters.open_raster(bad)
    assert str(bad) in str(e.value)


# ----------------------------------------------------------------------------------------------- bad files

def _corrupt(kind, root):
    """Break the cloud-free S2 file of a fresh triplet in one way; return (root, triplet, file named)."""
    s1 = np.full((2, 32, 32), -10, np.float32)
    s2 = np.full((13, 32, 32), 1000, np.uint16)
    t = datalist.Triplet(1, "s1/p.tif", "s2/p.tif", "cloudy/p.tif")
    _write(root / t.s1, s1)
    _write(root / t.s2_cloudy, s2)
    bad = root / t.s2_cloudfree
    if kind == "missing":
        pass
    elif kind == "unopenable":
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"this is not a GeoTIFF")
    elif kind == "band_count":
        _write(bad, s2[:3])
    elif kind == "size":
        _write(bad, np.full((13, 16, 32), 1000, np.uint16))
    return t, bad


@pytest.mark.parametrize("kind, message", [("missing", "file not found"), ("unopenable", "cannot open"),
                                           ("band_count", "expected 13 bands, found 3"), ("size", "differs")])
def test_bad_files_raise_data_error_naming_the_file(tmp_path, kind, message):
    t, bad = _corrupt(kind, tmp_path)
    with pytest.raises(files.DataError, match=message) as e:
        D.SEN12MSCRDataset([t], tmp_path)[0]
    assert str(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


def _triplet(root, s1=None, s1_crs="EPSG:32631", s1_transform=from_origin(500000, 5600000, 10, 10), s2=None,
             s2_crs="EPSG:32631", s2_transform=from_origin(500000, 5600000, 10, 10)):
    """Write one 32 px triplet under root (S1 with its own CRS/transform, both S2 with theirs); return it."""
    s1 = np.full((2, 32, 32), -10, np.float32) if s1 is None else s1
    s2 = np.full((13, 32, 32), 1000, np.uint16) if s2 is None else s2
    t = datalist.Triplet(1, "s1/p.tif", "s2/p.tif", "cloudy/p.tif")
    _write(root / t.s1, s1, s1_transform, s1_crs)
    for rel in (t.s2_cloudfree, t.s2_cloudy):
        _write(root / rel, s2, s2_transform, s2_crs)
    return t


@pytest.mark.parametrize("what, s1_georef", [
    ("CRS", {"s1_crs": "EPSG:32650"}),
    ("transform", {"s1_transform": from_origin(505000, 5600000, 10, 10)}),  # the same pixels 5 km east
])
def test_misaligned_s1_is_refused_naming_both_files(tmp_path, what, s1_georef):
    t = _triplet(tmp_path, **s1_georef)
    with pytest.raises(files.DataError, match="not on the same grid") as e:
        D.SEN12MSCRDataset([t], tmp_path)[0]
    message = str(e.value)
    assert what in message and str(tmp_path / t.s1) in message and str(tmp_path / t.s2_cloudy) in message
    if what == "CRS":
        assert "EPSG:32650" in message and "EPSG:32631" in message
    else:
        assert "505000.0" in message and "500000.0" in message


def test_errors_from_dataloader_workers_keep_only_the_message(tmp_path):
    t = _triplet(tmp_path, s1_crs="EPSG:32650")
    loader = torch.utils.data.DataLoader(D.SEN12MSCRDataset([t], tmp_path), num_workers=1)
    with pytest.raises(files.DataError) as e:
        next(iter(loader))
    assert str(e.value).startswith(f"{tmp_path / t.s1} and ") and "Traceback" not in str(e.value)
    assert "\n" not in str(e.value)


def test_rasters_without_georeferencing_load(tmp_path, synth):
    """Derived copies often lose CRS and transform: size is still checked, CRS/transform only where both have one."""
    root, triplets = synth
    src = triplets[0]
    data = [rasters.read_raster(root / rel, n) for rel, n in ((src.s1, 2), (src.s2_cloudfree, 13), (src.s2_cloudy, 13))]
    data = [data[0], *(d.astype(np.uint16) for d in data[1:])]
    t = datalist.Triplet(1, "s1/p.tif", "s2/p.tif", "cloudy/p.tif")
    for rel, d in zip((t.s1, t.s2_cloudfree, t.s2_cloudy), data):
        _write(tmp_path / "none" / rel, d, crs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NotGeoreferencedWarning either
        plain = D.SEN12MSCRDataset([t], tmp_path / "none", crop_size=32)[0]
    ref = D.SEN12MSCRDataset([src], root, crop_size=32)[0]
    for key in ("cloudy_data", "cloudfree_data", "SAR_data", "window"):
        assert torch.equal(plain[key], ref[key]), key
    # One georeferenced file and one without: nothing to compare, so it loads.
    mixed = _triplet(tmp_path / "mixed", s1_crs=None)
    assert D.SEN12MSCRDataset([mixed], tmp_path / "mixed")[0]["SAR_data"].shape == (2, 32, 32)
    # Size is checked whatever the georeferencing.
    small = _triplet(tmp_path / "small", s1=np.zeros((2, 16, 32), np.float32), s1_crs=None, s2_crs=None)
    with pytest.raises(files.DataError, match="size 16x32 differs from 32x32"):
        D.SEN12MSCRDataset([small], tmp_path / "small")[0]


def test_truncated_geotiff_error_keeps_gdals_reason(tmp_path):
    t = _triplet(tmp_path, s2=np.random.default_rng(0).integers(0, 5000, (13, 32, 32)).astype(np.uint16))
    cloudy = tmp_path / t.s2_cloudy
    cloudy.write_bytes(cloudy.read_bytes()[: cloudy.stat().st_size // 2])  # a download that stopped half-way
    # rasterio itself says only "Read failed. See previous exception for details."; GDAL's reason is kept. It reads
    # "Missing data for block" through the memory-mapped reads of the dataset, "TIFFReadEncodedStrip() failed"
    # through plain reads.
    with pytest.raises(files.DataError) as mapped:
        D.SEN12MSCRDataset([t], tmp_path)[0]
    with rasterio.open(cloudy) as src, pytest.raises(files.DataError) as plain:
        rasters.read_window(src, None)
    for e, reason in ((mapped, "Missing data for block"), (plain, "TIFFReadEncodedStrip() failed")):
        message = str(e.value)
        assert message.startswith(f"cannot read {cloudy}: ") and reason in message, message
        assert "See previous exception" not in message and "fetch it again" in message


def test_s2_already_scaled_to_float_reflectance_is_refused(tmp_path):
    scaled = np.full((13, 32, 32), 0.12, np.float32)
    scaled[:, :4] = 1.3  # a bright cloud
    t = _triplet(tmp_path / "float01", s2=scaled)
    with pytest.raises(files.DataError) as e:
        D.SEN12MSCRDataset([t], tmp_path / "float01")[0]
    message = str(e.value)
    assert str(tmp_path / "float01" / t.s2_cloudfree) in message
    assert ("expected reflectance x10000 (uint16" in message
            and "gdal_translate -ot UInt16 -scale 0 1 0 10000" in message)
    # Float files holding the x10000 encoding are fine (some tools write float32).
    ok = _triplet(tmp_path / "float10000", s2=scaled * 10000)
    assert D.SEN12MSCRDataset([ok], tmp_path / "float10000")[0]["cloudy_data"].max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- normalisation

def test_normalisation_convention_and_nan_fill():
    s1 = np.array([[[-30.0, -25.0], [-12.5, np.nan]], [[-40.0, -32.5], [0.0, 5.0]]], np.float32)
    out = bands.normalize_s1(s1)
    expect_vv = [0.0, 0.0, 0.5]
    np.testing.assert_allclose(out[0].ravel()[:3], expect_vv)
    assert out[0, 1, 1] == pytest.approx(np.mean(expect_vv))  # NaN -> mean of the band's valid pixels
    np.testing.assert_allclose(out[1].ravel(), [0, 0, 1, 1])
    s2 = np.array([[[0, 5000], [12000, 10000]]] * 13, np.float32)
    s2[5, 0, 0] = np.nan
    out = bands.normalize_s2(s2)
    assert out.dtype == np.float32 and out.max() == 1.0
    assert out[5, 0, 0] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out[0, 0, 1] == 0.5
    np.testing.assert_array_equal(bands.denormalize_s2(torch.from_numpy(out[:1])), [[[0, 5000], [10000, 10000]]])
    allnan = bands.normalize_s1(np.full((2, 2, 2), np.nan, np.float32))
    assert not np.isnan(allnan).any()


def test_nan_pixels_are_filled_with_the_band_mean_of_the_window(synth):
    root, triplets = synth
    t = triplets[6]  # make_synthetic_dataset puts a NaN block in the S1 corner of every 7th patch
    raw = rasters.read_raster(root / t.s1, 2)
    nan = np.isnan(raw[0])
    assert nan.sum() == 64
    sar = D.SEN12MSCRDataset([t], root)[0]["SAR_data"].numpy()
    assert not np.isnan(sar).any()
    valid = (np.clip(raw[0][~nan], -25, 0) + 25) / 25
    np.testing.assert_allclose(sar[0][nan], valid.mean(), atol=1e-6)
    np.testing.assert_allclose(sar[0][~nan], valid, atol=1e-6)


# ----------------------------------------------------------------------------------------------- crops

def test_crops_windows_and_georeference(synth, tmp_path):
    root, triplets = synth
    t = triplets[0]
    centre = D.SEN12MSCRDataset([t], root, crop_size=32)[0]
    assert centre["window"].tolist() == [16, 16, 32, 32]
    full = D.SEN12MSCRDataset([t], root)[0]
    assert torch.equal(full["cloudfree_data"][:, 16:48, 16:48], centre["cloudfree_data"])
    assert D.SEN12MSCRDataset([t], root, crop_size=16, load_size=32)[0]["window"].tolist() == [24, 24, 16, 16]
    torch.manual_seed(0)
    train = D.SEN12MSCRDataset([t], root, crop_size=32, augment=False, random_crop=True)
    windows = {tuple(train[0]["window"].tolist()) for _ in range(10)}
    assert len(windows) > 1
    for r, c, h, w in windows:
        assert 0 <= r <= 32 and 0 <= c <= 32 and (h, w) == (32, 32)
    # The window georeferences the crop: writing it and reading back keeps CRS, origin and values.
    crs, transform = rasters.raster_georef(root / t.s2_cloudy, window=centre["window"].tolist())
    full_crs, full_transform = rasters.raster_georef(root / t.s2_cloudy)
    assert crs == full_crs and transform.c == full_transform.c + 16 * 10 and transform.f == full_transform.f - 160
    out = rasters.write_s2_geotiff(tmp_path / "pred.tif", centre["cloudy_data"], crs, transform)
    with rasterio.open(out) as src:
        assert src.dtypes[0] == "uint16" and src.count == 13 and src.crs == crs and src.transform == transform
        np.testing.assert_array_equal(src.read(), bands.denormalize_s2(centre["cloudy_data"]))
    with pytest.raises(files.DataError, match="64x64 px, smaller than --crop_size 128; pass --crop_size 64 or less"):
        D.SEN12MSCRDataset([t], root, crop_size=128)[0]


def test_load_size_beyond_the_raster_takes_the_whole_raster_with_one_warning(synth):
    """The design's Kaggle command (--load_size 256 --crop_size 128, validation crop = load_size) on patches smaller
    than 256 px: training crops come from the whole raster, validation takes it whole; one warning per dataset."""
    root, triplets = synth  # 64 px patches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = D.SEN12MSCRDataset(triplets[:4], root, crop_size=32, load_size=256, augment=True)
        val = D.SEN12MSCRDataset(triplets[:4], root, crop_size=256, load_size=256)
        windows = [train[i]["window"].tolist() for i in range(4)] + [val[i]["window"].tolist() for i in range(4)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("--load_size 256 is larger than the 64x64 rasters" in m for m in messages)
    assert all(w[2:] == [32, 32] and 0 <= min(w[:2]) and max(w[:2]) <= 32 for w in windows[:4])
    assert windows[4:] == [[0, 0, 64, 64]] * 4
    # A crop that does not fit names the flag that set it, not load_size.
    with pytest.raises(files.DataError, match="smaller than --val_crop_size 128; pass --val_crop_size 64") as e, \
            pytest.warns(UserWarning, match="--load_size 256"):
        D.SEN12MSCRDataset(triplets[:1], root, crop_size=128, load_size=256, crop_flag="--val_crop_size")[0]
    assert "load_size" not in str(e.value)


def test_augmentation_is_identical_for_all_images(synth):
    root, triplets = synth
    t = triplets[3]
    plain = D.SEN12MSCRDataset([t], root)[0]
    keys = ("cloudy_data", "cloudfree_data", "SAR_data", "cloud_mask")
    seen = set()
    torch.manual_seed(1)
    aug = D.SEN12MSCRDataset([t], root, augment=True)
    for _ in range(12):
        s = aug[0]
        matches = [(k, f) for k in range(4) for f in (False, True)
                   if all(torch.equal(s[key], _dihedral(plain[key], k, f)) for key in keys)]
        assert matches, "the four images were not transformed identically"
        seen.add(matches[0])
    assert len(seen) > 2  # flips and rotations do happen


def _dihedral(x, k, flip):
    y = torch.rot90(x, k, dims=(1, 2))
    return torch.flip(y, dims=(2,)) if flip else y


def test_aligned_dataset_glf_cr_entry_point(synth):
    root, triplets = synth
    t = triplets[0]
    # Raw rows as GLF-CR's csv.reader returned them (7 columns here), opts with only some attributes.
    row = ["1", os.path.dirname(t.s1), os.path.dirname(t.s2_cloudfree), os.path.dirname(t.s2_cloudy),
           os.path.basename(t.s2_cloudfree), os.path.basename(t.s1), os.path.basename(t.s2_cloudy)]
    opts = argparse.Namespace(input_data_folder=str(root), crop_size=32, is_test=True)
    s = D.AlignedDataset(opts, [row])[0]
    ref = D.SEN12MSCRDataset([t], root, crop_size=32)[0]
    assert torch.equal(s["cloudy_data"], ref["cloudy_data"]) and torch.equal(s["cloud_mask"], ref["cloud_mask"])
    s = D.AlignedDataset(argparse.Namespace(input_data_folder=str(root), is_use_cloudmask=False), [t])[0]
    assert s["cloud_mask"].sum() == 0 and s["cloudy_data"].shape == (13, 64, 64)


# ----------------------------------------------------------------------------------------------- cloud masks

def _original_cloud_score(img10000):
    """Straight port of DSen2-CR's get_cloud_mask (reference: scipy.signal.convolve2d box, per-band ops)."""
    d = img10000 / 10000.0
    r = lambda x, lo, hi: (x - lo) / (hi - lo)
    score = np.ones(d.shape[1:], np.float32)
    score = np.minimum(score, r(d[1], 0.1, 0.5))
    score = np.minimum(score, r(d[0], 0.1, 0.3))
    score = np.minimum(score, r(d[0] + d[10], 0.15, 0.2))
    score = np.minimum(score, r(d[3] + d[2] + d[1], 0.2, 0.8))
    s, a = d[2] + d[11], d[2] - d[11]
    s[s == 0] = 0.001
    score = np.minimum(score, r(a / s, 0.8, 0.6))
    score = scipy.ndimage.grey_closing(score, size=(5, 5))
    score = scipy.signal.convolve2d(score, np.ones((7, 7)) / 49, mode="same")
    return np.clip(score, 0.00001, 1.0)


def _original_shadow(img10000):
    d = img10000 / 10000.0
    csi = (d[7] + d[11]) / 2
    t3 = csi.min() + 0.75 * (csi.mean() - csi.min())
    t4 = d[1].min() + 5 / 6 * (d[1].mean() - d[1].min())
    m = np.zeros(d.shape[1:], np.float32)
    m[(csi < t3) & (d[1] < t4)] = -1
    return scipy.signal.medfilt2d(m, 5) < 0


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_rule_detector_matches_the_original_algorithm(source, synth, request):
    if source == "real":
        sample = request.getfixturevalue("real_sample_dir")
        images = [rasters.read_raster(sample / "s2_cloudy" / "ROIs2017_winter_112_p797.tif", 13)]
    else:
        root, triplets = synth
        images = [rasters.read_raster(root / t.s2_cloudy, 13) for t in triplets[:5]]  # clear, haze, partial, overcast
    for raw in images:
        np.testing.assert_allclose(clouds.rule_cloud_score(bands.normalize_s2(raw)), _original_cloud_score(raw),
                                   atol=2e-6)
        np.testing.assert_array_equal(clouds.shadow_mask(bands.normalize_s2(raw)), _original_shadow(raw))
        cs = clouds.cloud_shadow_mask(bands.normalize_s2(raw), 0.2)
        assert set(np.unique(cs)) <= {-1, 0, 1}
        np.testing.assert_array_equal(cs == 1, _original_cloud_score(raw) >= 0.2)


def test_cloud_score_is_higher_on_cloudy_than_on_clear_synthetic_pixels(synth):
    root, triplets = synth
    ds = D.SEN12MSCRDataset(triplets, root)
    cloudy_scores, clear_scores = [], []
    for i in range(len(ds)):
        s = ds[i]
        opacity = (s["cloudy_data"] - s["cloudfree_data"]).mean(0)  # clouds brighten every visible band
        cloudy_scores.append(s["cloud_mask"][0][opacity > 0.2])
        clear_scores.append(s["cloud_mask"][0][opacity.abs() < 0.01])
    cloudy, clear = torch.cat(cloudy_scores), torch.cat(clear_scores)
    assert len(cloudy) > 1000 and len(clear) > 1000
    assert cloudy.mean() > 0.5 and clear.mean() < 0.1
    assert (cloudy >= 0.2).float().mean() > 0.9 and (clear >= 0.2).float().mean() < 0.1


@pytest.mark.slow
def test_s2cloudless_options(synth):
    root, triplets = synth
    for detector in ("s2cloudless", "s2cloudless_prob"):
        ds = D.SEN12MSCRDataset(triplets[:5], root, cloud_detector=detector)
        clear, overcast = ds[0]["cloud_mask"], ds[4]["cloud_mask"]  # regimes cycle: clear, haze, partial x2, overcast
        assert clear.shape == (1, 64, 64) and 0 <= clear.min() and overcast.max() <= 1
        assert overcast.mean() > clear.mean() + 0.3
    assert set(np.unique(ds[2]["cloud_mask"])) != {0.0, 1.0}  # the probability is soft; the mask below is binary
    assert set(np.unique(D.SEN12MSCRDataset(triplets[2:3], root, cloud_detector="s2cloudless")[0]["cloud_mask"])) \
        == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown cloud detector"):
        D.SEN12MSCRDataset(triplets, root, cloud_detector="magic")


def _package_detector():
    from s2cloudless import S2PixelCloudDetector
    return S2PixelCloudDetector(threshold=0.4, all_bands=True, average_over=4, dilation_size=2)


def _package_mask(raw):
    """s2cloudless's own binary mask with UnCRtainTS's settings and input (data/dataLoader.py, get_cloud_map)."""
    img = np.clip(raw.astype(np.float32), 0, 10000)
    return _package_detector().get_cloud_masks(np.moveaxis(img / 10000, 0, -1)[None, ...])[0]


@pytest.mark.slow
def test_s2cloudless_mask_is_the_packages_get_cloud_masks_on_the_real_sample(real_sample_dir, tmp_path):
    t = datalist.read_data_list(real_sample_dir / "data.csv")[0]
    mask = _package_mask(rasters.read_raster(real_sample_dir / t.s2_cloudy, 13))
    whole = D.SEN12MSCRDataset([t], real_sample_dir, cloud_detector="s2cloudless")[0]
    np.testing.assert_array_equal(whole["cloud_mask"][0].numpy(), mask)
    # precomputed
    stored = cloud_masks.write_cloud_mask(real_sample_dir / t.s2_cloudy, tmp_path / "mask.tif", "s2cloudless")
    np.testing.assert_array_equal(cloud_masks.read_mask(stored), mask)
    np.testing.assert_array_equal(whole["cloud_binary"][0].numpy(), mask)  # binary already: no threshold moves it
    prob = D.SEN12MSCRDataset([t], real_sample_dir, cloud_detector="s2cloudless_prob")[0]["cloud_mask"][0].numpy()
    np.testing.assert_array_equal(_package_detector().get_mask_from_prob(prob[None])[0], mask)
    # On this winter patch the raw probability >= 0.2 flags pixels where the averaged, thresholded mask flags none.
    assert mask.mean() == 0 and 0.1 < (prob >= 0.2).mean() < 0.2


@pytest.mark.slow
def test_s2cloudless_mask_of_a_crop_is_the_whole_rasters_mask_cropped(synth):
    root, triplets = synth
    torch.manual_seed(0)
    ds = D.SEN12MSCRDataset(triplets[:6], root, cloud_detector="s2cloudless", crop_size=20, random_crop=True)
    for i in range(len(ds)):
        mask = _package_mask(rasters.read_raster(root / triplets[i].s2_cloudy, 13))
        s = ds[i]
        r, c, h, w = s["window"].tolist()
        np.testing.assert_array_equal(s["cloud_mask"][0].numpy(), mask[r:r + h, c:c + w])
    assert 0 < np.mean([ds[i]["cloud_mask"].mean() for i in range(len(ds))]) < 1


@pytest.mark.parametrize("detector", [pytest.param("s2cloudless", marks=pytest.mark.slow),
                                      pytest.param("s2cloudless_prob", marks=pytest.mark.slow), "rule"])
def test_precomputed_masks_equal_the_detector_on_the_fly(synth, tmp_path, detector):
    root, triplets = synth
    triplets = triplets[:4]
    out = tmp_path / "masks"
    for t in triplets:  # what the masks command's workers do; make_cloud_masks then has nothing left but masks.json
        cloud_masks.write_cloud_mask(root / t.s2_cloudy, out / t.s2_cloudy, detector)
    assert cloud_masks.make_cloud_masks(triplets, root, out, detector, progress=False) == (0, 4)
    info = json.loads((out / cloud_masks.MASKS_INFO).read_text())
    assert info["detector"] == detector and info["settings"]["detector"] == detector
    for threshold in (0.2, 0.5):
        # A centred crop, the same window both ways; the rule detector, kept as published, runs on the crop it is
        # given, so its precomputed (whole-raster) score equals it on whole patches only.
        kw = {"crop_size": None if detector == "rule" else 24, "cloud_threshold": threshold}
        fly = D.SEN12MSCRDataset(triplets, root, cloud_detector=detector, **kw)
        stored = D.SEN12MSCRDataset(triplets, root, cloud_mask_dir=out, **kw)
        assert stored.cloud_detector == detector
        for i in range(len(triplets)):
            for key in ("cloud_mask", "cloud_binary"):
                assert torch.equal(fly[i][key], stored[i][key]), (detector, threshold, key)


def test_masks_of_the_old_rounded_encoding_are_refused(synth, tmp_path):
    root, triplets = synth
    (tmp_path / cloud_masks.MASKS_INFO).write_text(json.dumps({"detector": "s2cloudless",
                                                               "encoding": "uint8 soft score x255"}))
    with pytest.raises(files.DataError, match="rounding moves the threshold.*--detector s2cloudless_prob"):
        D.SEN12MSCRDataset(triplets, root, cloud_mask_dir=tmp_path)
    with pytest.raises(files.DataError, match="rounding moves the threshold"):
        cloud_masks.make_cloud_masks(triplets, root, tmp_path, "s2cloudless", progress=False)


def _copy_list(synth, tmp_path, n):
    """The first n triplets of the synthetic tree copied under tmp_path/data (files to break freely)."""
    root, triplets = synth
    for t in triplets[:n]:
        for rel in (t.s1, t.s2_cloudfree, t.s2_cloudy):
            (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, tmp_path / "data" / rel)
    return tmp_path / "data", triplets[:n]


def test_masks_with_a_bad_input_leave_nothing_behind(synth, tmp_path):
    root, triplets = _copy_list(synth, tmp_path, 4)
    (root / triplets[2].s2_cloudy).write_text("<html>expired link</html>")
    out = tmp_path / "new" / "masks"
    with pytest.raises(files.DataError, match=rf"{re.escape(str(root / triplets[2].s2_cloudy))} as a raster"):
        cloud_masks.make_cloud_masks(triplets, root, out, "rule", progress=False)
    assert not (tmp_path / "new").exists()  # headers are checked before anything is written
    # the folder is not locked to the detector of the failed run
    shutil.copy(synth[0] / triplets[2].s2_cloudy, root / triplets[2].s2_cloudy)
    assert cloud_masks.make_cloud_masks(triplets, root, out, "s2cloudless_prob", workers=1, progress=False) == (4, 0)
    assert json.loads((out / cloud_masks.MASKS_INFO).read_text())["detector"] == "s2cloudless_prob"


def test_masks_that_fail_part_way_keep_their_work_but_do_not_mark_the_folder_finished(synth, tmp_path, capsys):
    root, triplets = _copy_list(synth, tmp_path, 4)
    truncated = root / triplets[1].s2_cloudy  # the header reads, the pixels do not: found only while computing
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    out = tmp_path / "masks"
    argv = ["masks", "--data_list_filepath", str(datalist.write_data_list(tmp_path / "l.csv", triplets)),
            "--input_data_folder", str(root), "--out", str(out), "--detector", "rule", "--workers", "1"]
    assert D.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot read {truncated}: ") and "(1 of 4 masks not made; the 3 made are kept" in err
    assert not (out / cloud_masks.MASKS_INFO).exists() and (out / cloud_masks.MASKS_PARTIAL).is_file()
    assert sum(1 for t in triplets if (out / t.s2_cloudy).is_file()) == 3
    with pytest.raises(files.DataError, match="unfinished rule masks .no masks.json.; finish them"):
        D.SEN12MSCRDataset(triplets, root, cloud_mask_dir=out)
    with pytest.raises(files.DataError, match="holds unfinished rule masks; finish them with --detector rule"):
        cloud_masks.make_cloud_masks(triplets, root, out, "s2cloudless_prob", progress=False)
    shutil.copy(synth[0] / triplets[1].s2_cloudy, truncated)
    assert D.main(argv) == 0 and "(1 made, 3 already there)" in capsys.readouterr().out
    assert (out / cloud_masks.MASKS_INFO).is_file() and not (out / cloud_masks.MASKS_PARTIAL).exists()


# ----------------------------------------------------------------------------------------------- scan and split

def test_scan_matches_nested_layout_reports_orphans_and_splits_by_scene(synth, tmp_path, capsys):
    root, triplets = synth
    nested = tmp_path / "kaggle"
    for t in triplets:
        for _mod, rel in zip(("s1", "s2", "s2_cloudy"), (t.s1, t.s2_cloudfree, t.s2_cloudy)):
            top = Path(rel).parts[0]
            dst = nested / top / top / top / Path(rel).relative_to(top)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, dst)
    orphan = nested / "ROIs1158_spring_s1" / "s1_7" / "ROIs1158_spring_s1_7_p3.tif"
    orphan.parent.mkdir(parents=True)
    shutil.copy(root / triplets[0].s1, orphan)
    out = tmp_path / "scanned.csv"
    assert D.main(["scan", str(nested), "--out", str(out), "--val_frac", "0.3", "--test_frac", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "no partner:" in err and "ROIs1158_spring_s1_7_p3.tif" in err
    scanned = datalist.read_data_list(out)
    assert len(scanned) == len(triplets)
    assert {scanning.scene_of(t) for t in scanned} == {scanning.scene_of(t) for t in triplets}
    _assert_no_scene_in_two_splits(scanned)
    assert {t.split for t in scanned} == {1, 2, 3}
    # Paths in the CSV are relative to ROOT and load; the same seed gives the same CSV.
    assert D.SEN12MSCRDataset(scanned[:1], nested, crop_size=16)[0]["cloudy_data"].shape == (13, 16, 16)
    D.main(["scan", str(nested), "--out", str(tmp_path / "again.csv"), "--val_frac", "0.3", "--test_frac", "0.3"])
    assert (tmp_path / "again.csv").read_text() == out.read_text()


def test_scan_reports_files_without_partner(synth, tmp_path, capsys):
    root, triplets = synth
    t = triplets[0]
    for rel in (t.s1, t.s2_cloudfree):  # cloudy image missing
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    (tmp_path / "notes").mkdir()
    shutil.copy(root / t.s1, tmp_path / "notes" / "my_scene.tif")
    assert D.main(["scan", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2  # no complete triplet
    err = capsys.readouterr().err
    assert f"no partner: {t.s1}" in err and f"no partner: {t.s2_cloudfree}" in err
    assert f"not a SEN12MS-CR file name: {Path('notes', 'my_scene.tif')}" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}: no complete SEN12MS-CR triplets found among 3 .tif file(s); scan "
                           f"reads the official layout") and "GLF-CR's (folders s1/, s2_cloudfree/ or s2/" in last
    assert not (tmp_path / "x.csv").exists()


def test_scan_reads_glfcr_layout_like_the_real_sample(real_sample_dir, tmp_path, capsys):
    out = tmp_path / "scanned.csv"
    assert D.main(["scan", str(real_sample_dir), "--out", str(out)]) == 0
    assert "no partner" not in capsys.readouterr().err
    [t] = datalist.read_data_list(out)
    [listed] = datalist.read_data_list(real_sample_dir / "data.csv")  # the GLF-CR list shipped with it: the same files
    assert (t.s1, t.s2_cloudfree, t.s2_cloudy) == (listed.s1, listed.s2_cloudfree, listed.s2_cloudy)
    assert scanning.scene_of(t) == ("ROIs2017_winter", 112)
    assert scanning.official_patch(t) == (("ROIs2017_winter", 112), 797)


def test_scan_official_split_uses_the_published_scene_lists(synth, tmp_path, capsys):
    root, triplets = synth
    t = triplets[0]
    scenes = {("ROIs1158_spring", 106): 3, ("ROIs2017_winter", 63): 3, ("ROIs2017_winter", 22): 2,
              ("ROIs1970_fall", 65): 2, ("ROIs2017_winter", 5): 1, ("ROIs1868_summer", 139): 1}
    for (roi, scene) in scenes:
        for mod, rel in zip(("s1", "s2", "s2_cloudy"), (t.s1, t.s2_cloudfree, t.s2_cloudy)):
            for patch in (1, 2):
                dst = tmp_path / "data" / f"{roi}_{mod}" / f"{mod}_{scene}" / f"{roi}_{mod}_{scene}_p{patch}.tif"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / rel, dst)
    out = tmp_path / "official.csv"
    assert D.main(["scan", str(tmp_path / "data"), "--out", str(out), "--split", "official"]) == 0
    listed = datalist.read_data_list(out)
    assert len(listed) == 2 * len(scenes)
    assert {scanning.scene_of(x): x.split for x in listed} == scenes
    err = capsys.readouterr().err
    # The test scenes this partial copy lacks are named, in the published order.
    assert ("note: official test scenes not found under" in err and
            "ROIs1158_spring 123, 140, 31, 44; ROIs1868_summer 119, 73; ROIs1970_fall 139; ROIs2017_winter 108" in err)
    assert "ROIs2017_winter 107, 130, 84; ROIs1868_summer 19, 80, 127, 17; ROIs1158_spring 17" in err
    n_test = sum(len(v) for v in splits.OFFICIAL_TEST_SCENES.values())
    n_val = sum(len(v) for v in splits.OFFICIAL_VAL_SCENES.values())
    assert (n_test, n_val) == (10, 10)


def _assert_no_scene_in_two_splits(triplets):
    split_of = {}
    for t in triplets:
        scene = scanning.scene_of(t)
        assert split_of.setdefault(scene, t.split) == t.split, f"scene {scene} in two splits"


def test_split_by_scene_is_deterministic_and_scene_wise():
    triplets = [datalist.Triplet(0, f"s1/ROIs1970_fall_s1_{s}_p{p}.tif", f"s2/ROIs1970_fall_s2_{s}_p{p}.tif",
                          f"c/ROIs1970_fall_s2_cloudy_{s}_p{p}.tif") for s in range(30) for p in range(5)]
    a = scanning.split_by_scene(triplets, 0.2, 0.1, seed=3)
    assert a == scanning.split_by_scene(triplets, 0.2, 0.1, seed=3)
    assert a != scanning.split_by_scene(triplets, 0.2, 0.1, seed=4)
    _assert_no_scene_in_two_splits(a)
    n_scenes = {k: len({scanning.scene_of(t) for t in a if t.split == k}) for k in (1, 2, 3)}
    assert n_scenes == {1: 21, 2: 6, 3: 3}


# ----------------------------------------------------------------------------------------------- synthetic data

def test_synthetic_layout_dtypes_and_georeference(synth):
    root, triplets = synth
    assert len(triplets) == 12 and len({scanning.scene_of(t) for t in triplets}) == 3
    _assert_no_scene_in_two_splits(triplets)
    t = triplets[0]
    assert t.s1 == "ROIs2017_winter_s1/s1_100/ROIs2017_winter_s1_100_p1.tif"
    assert t.s2_cloudy == "ROIs2017_winter_s2_cloudy/s2_cloudy_100/ROIs2017_winter_s2_cloudy_100_p1.tif"
    for rel, count, dtype in ((t.s1, 2, "float32"), (t.s2_cloudfree, 13, "uint16"), (t.s2_cloudy, 13, "uint16")):
        with rasterio.open(root / rel) as src:
            assert (src.count, src.dtypes[0], src.shape) == (count, dtype, (64, 64))
            assert src.crs.to_epsg() == 32631 and src.transform.a == 10.0
    # Neighbouring patches of a scene overlap by half, as in the real dataset.
    a, b = (rasters.read_raster(root / triplets[i].s2_cloudfree, 13) for i in (0, 1))
    np.testing.assert_array_equal(a[:, :, 32:], b[:, :, :32])


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    paths = [synthetic_sets.make_synthetic_dataset(tmp_path / name, n=5, size=32, seed=seed)
             for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    assert torch.equal(before, torch.get_rng_state())  # the caller's torch RNG is left alone
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tif"))
    assert len(files) == 20  # S1, S2, cloudy S2 and the true cloud map of 5 patches
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    # every image differs with the seed; so do the true cloud maps, but for the all-zero map of a clear patch
    images = [f for f in files if "cloud_truth" not in str(f) or rasters.read_raster(tmp_path / "a" / f, 2).any()]
    differ = [(tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in images]
    assert all(same) and all(differ) and len(images) >= 18
    assert paths[0].read_text() == paths[1].read_text()


def test_sar_carries_the_land_cover_under_clouds(synth):
    """The cloud-free spectrum is predictable from (despeckled) SAR alone, as a model must learn to do: a cubic
    fit of VV, VH explains a large share of every band's variance, and nothing when the pixels are shuffled."""
    root, triplets = synth
    ds = D.SEN12MSCRDataset(triplets, root)
    features, targets = [], []
    for i in range(len(ds)):
        s = ds[i]
        vv, vh = scipy.ndimage.uniform_filter(s["SAR_data"].numpy(), (0, 5, 5)).reshape(2, -1)
        features.append(np.stack([np.ones_like(vv), vv, vh, vv * vv, vh * vh, vv * vh, vv ** 3, vh ** 3], 1))
        targets.append(s["cloudfree_data"].numpy().reshape(13, -1).T)
    x, y = np.concatenate(features), np.concatenate(targets)

    def r2(x, y):
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return 1 - (y - x @ coef).var(0) / y.var(0)

    assert r2(x, y).min() > 0.3 and r2(x, y).mean() > 0.5
    assert r2(x, y[np.random.default_rng(0).permutation(len(y))]).max() < 0.05


def test_cli_help_documents_every_flag(capsys):
    parser = D.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"synth", "scan", "check", "masks", "coverage"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.dest} has no help text"
    with pytest.raises(SystemExit) as e:
        D.main(["synth", "--help"])
    assert e.value.code == 0 and "--seed" in capsys.readouterr().out


def test_atomic_output_has_plain_file_permissions(tmp_path):
    import stat
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = files.write_text_atomic(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_help_shows_every_default():
    parser = D.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and not action.required and action.default is not argparse.SUPPRESS:
                assert f"(default: {action.default})" in text, (name, action.dest)


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["scan", "/no/such/folder", "--out", "x.csv"], "error: data root /no/such/folder: no such folder"),
    (["scan", "{tmp}", "--out", "x.csv"], "error: {tmp}: no complete SEN12MS-CR triplets found among 0 .tif file(s); "
                                          "scan reads " + scanning.LAYOUTS_READ),
    (["check", "{tmp}/x.csv", "--input_data_folder", "{tmp}"], "error: data list not found: {tmp}/x.csv"),
    (["check", "{tmp}", "--input_data_folder", "{tmp}"], "error: data list {tmp} is a folder; pass the CSV file (to "
                                                         "list a folder of GeoTIFFs: python dataloader.py scan {tmp} "
                                                         "--out data.csv)"),
])
def test_cli_user_errors_print_one_line_and_exit_2(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "dataloader.py", *argv], cwd=Path(D.__file__).parent,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [message.replace("{tmp}", str(tmp_path))]


def test_cli_bad_flags_are_argparse_errors(tmp_path, capsys):
    for argv, message in ((["--test_frac", "1.5"], "argument --test_frac: 1.5 is not in [0, 1)"),
                          (["--val_frac", "0.5", "--test_frac", "0.5"],
                           "--val_frac 0.5 + --test_frac 0.5 must be below 1")):
        with pytest.raises(SystemExit) as e:
            D.main(["scan", str(tmp_path), "--out", str(tmp_path / "x.csv"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
