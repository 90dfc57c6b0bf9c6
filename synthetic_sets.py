"""Synthetic SEN12MS-CR and SEN12MS-CR-TS written as the datasets ship them: GeoTIFFs in the official layouts, a
data list split by scene (or region), and each image's true cloud map. The scenes themselves come from synthetic.py
(numpy only); `python dataloader.py synth` is the command line.

    csv_path = make_synthetic_dataset("data/synthetic", n=80, size=64, seed=0)
    ts_csv = make_synthetic_ts_dataset("data/synthetic_ts", n=48, size=64, n_dates=4, seed=0)
"""
import os
from pathlib import Path

import numpy as np
from rasterio.transform import from_origin

import synthetic
from bands import DEFAULT_S2_PRODUCT, S2_PRODUCTS, denormalize_s2, s2_bands
from datalist import TimeSeries, Triplet, write_data_list, write_ts_list
from rasters import TRUTH_BANDS, truth_path, ts_truth_path, write_geotiff
from scanning import split_by_scene, split_ts_by_roi

# What `synth --s2_product L2A` writes as a processing baseline 04.00 product would: DN = 10000 x reflectance + 1000,
# the offset recorded under the L2A metadata key (rasters.S2_OFFSET_TAGS), so readers remove it per file.
SYNTHETIC_L2A_OFFSET = -1000


def _synthetic_s2(reflectance01, s2_product):
    """(uint16 DN, GeoTIFF tags, band descriptions) of a synthetic S2 image written as s2_product: L1C as SEN12MS-CR
    ships it (13 bands, no offset, no tags); L2A with its 12 bands and the baseline 04.00 offset."""
    dn = denormalize_s2(reflectance01)
    if s2_product == "L1C":
        return dn, {}, None
    names = s2_bands(s2_product)
    dn = dn[[S2_PRODUCTS["L1C"].index(b) for b in names]].astype(np.int32) - SYNTHETIC_L2A_OFFSET
    return dn.astype(np.uint16), {"BOA_ADD_OFFSET": str(SYNTHETIC_L2A_OFFSET), "PROCESSING_LEVEL": "Level-2A",
                                  "BOA_QUANTIFICATION_VALUE": "10000"}, names


def make_synthetic_dataset(out_dir, n, size=256, seed=0, n_scenes=None, roi="ROIs2017_winter",
                           val_frac=0.15, test_frac=0.15, s2_product=DEFAULT_S2_PRODUCT):
    """Write `n` synthetic triplets of `size` px in the official SEN12MS-CR layout under out_dir, plus
    out_dir/data.csv (7 columns, split by scene) and each patch's true cloud map (truth_path). Returns the CSV path.
    Deterministic for a seed. Georeferenced in UTM 31N at 10 m; S1 float32 dB (VV, VH); S2 uint16 reflectance
    x10000, 13 bands (s2_product "L2A": the 12 bands without B10, DN carrying the offset SYNTHETIC_L2A_OFFSET,
    recorded in the tag BOA_ADD_OFFSET, band names as descriptions; the same scenes, so the spectra stay the
    generator's, which are top-of-atmosphere-like)."""
    out_dir = Path(out_dir)
    s2_bands(s2_product)
    triplets = []
    for p in synthetic.generate_patches(n, size=size, seed=seed, n_scenes=n_scenes):
        scene, patch = p["scene"], p["patch"]
        transform = from_origin(*p["origin"], synthetic.PIXEL_M, synthetic.PIXEL_M)
        rel = {}
        for mod, data in (("s1", p["s1"]), ("s2", p["s2"]), ("s2_cloudy", p["cloudy"])):
            rel[mod] = os.path.join(f"{roi}_{mod}", f"{mod}_{scene}", f"{roi}_{mod}_{scene}_p{patch}.tif")
            if mod == "s1":
                write_geotiff(out_dir / rel[mod], data, synthetic.CRS, transform)
                continue
            dn, tags, names = _synthetic_s2(data, s2_product)
            write_geotiff(out_dir / rel[mod], dn, synthetic.CRS, transform, descriptions=names, tags=tags)
        write_geotiff(out_dir / truth_path(rel["s2_cloudy"]), np.stack([p["opacity"], p["shadow"]]), synthetic.CRS,
                       transform, descriptions=TRUTH_BANDS)
        triplets.append(Triplet(0, rel["s1"], rel["s2"], rel["s2_cloudy"]))
    triplets = split_by_scene(triplets, val_frac=val_frac, test_frac=test_frac, seed=seed)
    return write_data_list(out_dir / "data.csv", triplets)


def make_synthetic_ts_dataset(out_dir, n, size=256, seed=0, n_dates=4, n_rois=None, val_frac=0.15, test_frac=0.15):
    """Write `n` synthetic time series of `n_dates` dates (synthetic.generate_time_series: one ground per ROI, clouds,
    a radiometric change and speckle drawn per date, one clear date) in the SEN12MS-CR-TS layout under out_dir
    (ROIs1970/200/S1/0/s1_ROIs1970_200_ImgNo_0_<date>_patch_1.tif and S2/), each date's true cloud map
    (rasters.ts_truth_path), and out_dir/data.csv (datalist.TS_FORMAT, split by ROI). Returns the CSV path."""
    out_dir, series = Path(out_dir), []
    for p in synthetic.generate_time_series(n, n_dates=n_dates, size=size, seed=seed, n_rois=n_rois):
        group, number = "ROIs1970", str(200 + p["roi"])
        transform = from_origin(*p["origin"], synthetic.PIXEL_M, synthetic.PIXEL_M)
        paths = {"s1": [], "s2": []}
        for t in range(n_dates):
            for mod, data, date in (("s1", p["s1"][t], p["s1_dates"][t]), ("s2", denormalize_s2(p["s2"][t]),
                                                                           p["dates"][t])):
                rel = os.path.join(group, number, mod.upper(), str(t),
                                   f"{mod}_{group}_{number}_ImgNo_{t}_{date}_patch_{p['patch']}.tif")
                write_geotiff(out_dir / rel, data, synthetic.CRS, transform)
                paths[mod].append(rel)
            write_geotiff(out_dir / ts_truth_path(paths["s2"][-1]), np.stack([p["opacity"][t], p["shadow"][t]]),
                          synthetic.CRS, transform, descriptions=TRUTH_BANDS)
        series.append(TimeSeries(0, f"{group}/{number}", p["patch"], tuple(paths["s1"]), tuple(paths["s2"]),
                                 p["dates"], tuple(range(n_dates))))
    return write_ts_list(out_dir / "data.csv", split_ts_by_roi(series, val_frac, test_frac, seed))
