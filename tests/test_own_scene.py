"""docs/data.md, "Your own scene", runs as written: its ```python blocks, one script, then its ```bash command, on
small stand-ins for a Copernicus download (a SAFE folder of JP2 bands at 10, 20 and 60 m with the product metadata's
offsets, and a Sentinel-1 GeoTIFF in dB on another CRS and grid), for an L1C and an L2A product, ending in a real
test_CR.py --predict with an untrained checkpoint of the product."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from test_l2a import untrained_checkpoint

import bands
import rasters
import test_CR

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "data.md"
TILE_ORIGIN = (600000.0, 5300040.0)  # UTM 32N, the corner of a Sentinel-2 tile
CRS = "EPSG:32632"
SIDE_M = 480  # 48 px at 10 m, 24 at 20 m, 8 at 60 m
NATIVE_M = {"B2": 10, "B3": 10, "B4": 10, "B8": 10, "B5": 20, "B6": 20, "B7": 20, "B8A": 20, "B11": 20, "B12": 20,
            "B1": 60, "B9": 60, "B10": 60}
OFFSET = -1000


def walkthrough():
    """(the section's ```python blocks joined, its ```bash command lines)."""
    text = PAGE.read_text()
    section = re.search(r"^## Your own scene\n(.*?)^## ", text, flags=re.DOTALL | re.MULTILINE).group(1)
    python = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    bash = re.findall(r"^```bash\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    return "\n".join(python), [line for block in bash for line in block.splitlines() if line.strip()]


def settings(code):
    """The values of the walk-through's first block (SAFE, S1_DB): the names the stand-ins must have."""
    values = {}
    exec(code.split("\n\n")[0], {}, values)  # the three assignments the reader edits
    return values


def _code(name):
    return name if name == "B8A" else f"B{int(name[1:]):02d}"


def write_safe(folder, product, reflectance):
    """A SAFE folder as Copernicus delivers it: MTD_MSIL1C/2A.xml with Spectral_Information and the offsets, and one
    JP2 per band at its native resolution (L2A: IMG_DATA/R10m|R20m|R60m/T.._B02_10m.jp2; L1C: IMG_DATA/T.._B02.jp2).
    reflectance: {band: (H,W) array at 10 m}; the coarse bands are its block means."""
    level = "2A" if product == "L2A" else "1C"
    granule = folder / "GRANULE" / f"L{level}_T32UNU_A032794_20230612T103631" / "IMG_DATA"
    ids = "\n".join(f'<Spectral_Information bandId="{i}" physicalBand="{b}"/>' for i, b in enumerate(bands.S2_BANDS))
    key, listing = (("BOA_ADD_OFFSET", "BOA_ADD_OFFSET_VALUES_LIST") if product == "L2A" else
                    ("RADIO_ADD_OFFSET", "Radiometric_Offset_List"))
    offsets = "\n".join(f'<{key} band_id="{i}">{OFFSET}</{key}>' for i in range(13))
    folder.mkdir(parents=True)
    (folder / f"MTD_MSIL{level}.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<n1:Level-{level}_User_Product '
        f'xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level}.xsd">\n<n1:General_Info>\n'
        f"<Product_Image_Characteristics>\n<QUANTIFICATION_VALUES_LIST><BOA_QUANTIFICATION_VALUE unit=\"none\">10000"
        f"</BOA_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>\n<{listing}>\n{offsets}\n</{listing}>\n"
        f"<Spectral_Information_List>\n{ids}\n</Spectral_Information_List>\n</Product_Image_Characteristics>\n"
        f"</n1:General_Info>\n</n1:Level-{level}_User_Product>\n")
    for name in bands.s2_bands(product):
        m = NATIVE_M[name]
        k = m // 10
        r = reflectance[name]
        coarse = r.reshape(r.shape[0] // k, k, r.shape[1] // k, k).mean(axis=(1, 3))
        dn = (np.round(coarse * 10000) - OFFSET).astype(np.uint16)[None]
        path = (granule / f"R{m}m" / f"T32UNU_20230612T103629_{_code(name)}_{m}m.jp2" if product == "L2A" else
                granule / f"T32UNU_20230612T103629_{_code(name)}.jp2")
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="JP2OpenJPEG", width=dn.shape[2], height=dn.shape[1], count=1,
                           dtype="uint16", crs=CRS, transform=from_origin(*TILE_ORIGIN, m, m), QUALITY=100,
                           REVERSIBLE="YES") as dst:
            dst.write(dn)


def write_s1(path):
    """VV, VH in dB on a geographic grid (EPSG:4326, about 8 m pixels) a little larger than the tile's corner."""
    west, south, east, north = transform_bounds(CRS, "EPSG:4326", TILE_ORIGIN[0], TILE_ORIGIN[1] - SIDE_M,
                                                TILE_ORIGIN[0] + SIDE_M, TILE_ORIGIN[1])
    pad, step = 0.001, 0.0001
    width, height = int((east - west + 2 * pad) / step), int((north - south + 2 * pad) / step)
    rng = np.random.default_rng(0)
    db = np.stack([rng.normal(-10, 1, (height, width)), rng.normal(-17, 1, (height, width))]).astype(np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=2, dtype="float32",
                       crs="EPSG:4326", transform=from_origin(west - pad, north + pad, step, step)) as dst:
        dst.write(db)


@pytest.mark.slow
@pytest.mark.parametrize("product", ["L2A", "L1C"])
def test_your_own_scene_runs_as_written(product, tmp_path, monkeypatch):
    code, commands = walkthrough()
    names = settings(code)
    assert "MSIL2A" in names["SAFE"]  # the page's example is L2A; the L1C run renames the product folder
    safe = names["SAFE"] if product == "L2A" else names["SAFE"].replace("MSIL2A", "MSIL1C")
    code = code.replace(names["SAFE"], safe)
    rng = np.random.default_rng(1)
    reflectance = {b: rng.uniform(0.02, 0.4, (48, 48)).astype(np.float32) for b in bands.S2_BANDS}
    write_safe(tmp_path / safe, product, reflectance)
    write_s1(tmp_path / names["S1_DB"])
    untrained_checkpoint(tmp_path / "checkpoints" / "my_run" / "best.pth", product)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    (tmp_path / "walkthrough.py").write_text(code)
    done = subprocess.run([sys.executable, "walkthrough.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{product} offsets: [{OFFSET}]" in done.stdout

    with rasterio.open(tmp_path / "s2_cloudy.tif") as src:
        assert src.count == len(bands.s2_bands(product)) and src.descriptions == bands.s2_bands(product)
        assert (src.crs, src.transform, src.shape) == (CRS, from_origin(*TILE_ORIGIN, 10, 10), (48, 48))
        np.testing.assert_array_equal(rasters.s2_offset(src), OFFSET)  # the offset travels with the file
        got = bands.normalize_s2(src.read(), rasters.s2_offset(src))
    index = bands.s2_band_index(product)
    np.testing.assert_allclose(got[index["B4"]], np.round(reflectance["B4"] * 10000) / 10000, atol=1e-6)  # 10 m
    block = got[index["B5"]].reshape(24, 2, 24, 2)  # a 20 m band: each 2x2 block one coarse pixel
    assert (block == block[:, :1, :, :1]).all()
    with rasterio.open(tmp_path / "s1_on_s2.tif") as src:
        assert (src.crs, src.transform, src.descriptions) == (CRS, from_origin(*TILE_ORIGIN, 10, 10), ("VV", "VH"))
        sar = src.read()
    assert np.isfinite(sar).all() and abs(np.nanmean(sar[0]) + 10) < 0.5 and abs(np.nanmean(sar[1]) + 17) < 0.5

    assert len(commands) == 1
    words = shlex.split(commands[0])
    assert words[:3] == ["python", "test_CR.py", "--predict"]
    monkeypatch.chdir(tmp_path)  # the command as written, from where the walkthrough left its files
    assert test_CR.main([*words[2:], "--device", "cpu"]) == 0  # in this process: the walkthrough above had its own
    with rasterio.open(tmp_path / "cloudfree.tif") as src:
        assert src.count == len(bands.s2_bands(product)) and src.descriptions == bands.s2_bands(product)
        assert (src.crs, src.transform, src.shape, src.dtypes[0]) == (CRS, from_origin(*TILE_ORIGIN, 10, 10),
                                                                      (48, 48), "uint16")
