"""The band table of SEN12MS-CR and the encodings every other module shares (numpy and torch only).

- S2_BANDS / S1_BANDS: band order of the files; RGB_BANDS: the true-colour bands by index.
- S2_PRODUCTS: the bands of each Sentinel-2 product a run can take (L1C: SEN12MS-CR's 13; L2A: 12, no B10), and
  s2_bands / s2_band_index / s2_product_of_count to ask it; every band index elsewhere comes from this table.
- normalize_s1 / normalize_s2: file values -> [0, 1] (DSen2-CR / GLF-CR convention, so scores compare).
- finish_s2 / denormalize_s2: a predicted image -> the uint16 x10000 grid the dataset's files use.
- s2_to_rgb / sar_to_rgb: the one fixed display stretch of every quicklook.

No rasterio, no scipy: losses.py imports this for RGB_BANDS without pulling in GeoTIFF I/O.
"""
import numpy as np
import torch

# Sentinel-2 L1C band order of SEN12MS-CR files (B8A after B8, B10 kept).
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_BAND_INDEX = {name: i for i, name in enumerate(S2_BANDS)}
RGB_BANDS = (S2_BAND_INDEX["B4"], S2_BAND_INDEX["B3"], S2_BAND_INDEX["B2"])  # (3, 2, 1): R, G, B
S1_BANDS = ("VV", "VH")

# The Sentinel-2 products a run can take (--s2_product), each its bands in file order. L2A (Sen2Cor surface
# reflectance) has no B10: the cirrus band carries no surface information and Sen2Cor does not deliver it. Removing
# B10 moves only B11 and B12 (B10 comes after every other band), so RGB_BANDS hold for both products.
S2_PRODUCTS = {"L1C": S2_BANDS, "L2A": tuple(b for b in S2_BANDS if b != "B10")}
DEFAULT_S2_PRODUCT = "L1C"  # SEN12MS-CR's
S2_PRODUCT_TEXT = {"L1C": "Level-1C top-of-atmosphere reflectance, 13 bands", "L2A": "Level-2A surface reflectance, "
                   "12 bands without B10"}

# DSen2-CR / GLF-CR normalisation, kept identical so scores compare with the published tables.
S1_CLIP_DB = {"VV": (-25.0, 0.0), "VH": (-32.5, 0.0)}
S2_SCALE = 10000.0



def s2_bands(product):
    """The band names of a Sentinel-2 product (S2_PRODUCTS) in file order; ValueError for an unknown product."""
    if product not in S2_PRODUCTS:
        raise ValueError(f"unknown Sentinel-2 product {product!r}; use one of {tuple(S2_PRODUCTS)}")
    return S2_PRODUCTS[product]


def s2_band_index(product):
    """{band name: index} of a product's files and tensors."""
    return {name: i for i, name in enumerate(s2_bands(product))}


def s2_product_of_count(count):
    """The product whose files have `count` bands (13: L1C, 12: L2A), or None."""
    return next((p for p, names in S2_PRODUCTS.items() if len(names) == count), None)


_S1_LOW = np.array([S1_CLIP_DB[b][0] for b in S1_BANDS], dtype=np.float32)[:, None, None]
_S1_HIGH = np.array([S1_CLIP_DB[b][1] for b in S1_BANDS], dtype=np.float32)[:, None, None]

# One fixed display stretch for every quicklook (TensorBoard, test_CR PNGs), so panels compare across images:
# land reflectance rarely exceeds 0.3, so 0..0.3 maps linearly to 0..1 and brighter clouds saturate white.
RGB_STRETCH_MAX = 0.3


def fill_nan_with_band_mean(x):
    """In place: NaN -> mean of the finite pixels of the same band; an all-NaN band becomes 0."""
    nan = np.isnan(x)
    if nan.any():
        counts = (~nan).sum(axis=(1, 2))
        sums = np.where(nan, 0, x).sum(axis=(1, 2), dtype=np.float64)
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0).astype(x.dtype)
        x[nan] = np.broadcast_to(means[:, None, None], x.shape)[nan]
    return x


def normalize_s1(arr):
    """(2,H,W) S1 backscatter in dB -> float32 [0,1]: VV clipped to [-25,0], VH to [-32.5,0]."""
    x = np.asarray(arr, dtype=np.float32)
    x = (np.clip(x, _S1_LOW, _S1_HIGH) - _S1_LOW) / (_S1_HIGH - _S1_LOW)  # np.clip keeps NaN as NaN
    return fill_nan_with_band_mean(x)


def s1_db_of(normalised):
    """Inverse of normalize_s1 for per-band values (C,) in [0,1] -> dB."""
    return (_S1_LOW[:, 0, 0] + np.asarray(normalised) * (_S1_HIGH - _S1_LOW)[:, 0, 0]).astype(np.float32)


def normalize_s2(arr, offset=0):
    """(C,H,W) S2 reflectance x10000 -> float32 [0,1] (clip to [0,10000], divide by 10000). offset: the file's
    radiometric offset in DN (RADIO_ADD_OFFSET / BOA_ADD_OFFSET, -1000 since processing baseline 04.00), a number or
    one per band, added first: reflectance = (DN + offset) / 10000. SEN12MS-CR's files have none (0)."""
    x = np.asarray(arr)
    offset = np.asarray(offset)
    if offset.any():
        offset = offset.reshape(-1, 1, 1) if offset.ndim else offset
        dtype = np.int32 if x.dtype.kind in "ui" else np.float32
        x = x.astype(dtype) + offset.astype(dtype)
    if x.dtype.kind in "ui":  # the files' uint16: clip in integers (cheap), no NaN possible
        return np.multiply(np.clip(x, 0, int(S2_SCALE)), np.float32(1.0 / S2_SCALE), dtype=np.float32)
    x = np.clip(x.astype(np.float32, copy=False), 0.0, S2_SCALE) * np.float32(1.0 / S2_SCALE)
    return fill_nan_with_band_mean(x)


def finish_s2(prediction):
    """The project's one rule for a predicted S2 image (N,C,H,W or C,H,W tensor): clamp to [0, 1] (no negative
    reflectance; the encoding tops out at 10000) and round to the uint16 x10000 grid of the dataset, i.e. exactly
    the values a saved GeoTIFF holds. Training validation, test_CR scores, GeoTIFFs and quicklooks all use it."""
    return torch.round(prediction.float().clamp(0.0, 1.0) * S2_SCALE) / S2_SCALE


def denormalize_s2(x):
    """[0,1] float array or tensor -> uint16 numpy reflectance x10000 (values outside [0,1] clipped)."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * S2_SCALE).astype(np.uint16)


def s2_to_rgb(x):
    """(N,C,H,W) or (C,H,W) tensor of either product in [0,1] -> RGB (B4,B3,B2) in [0,1] with the fixed stretch."""
    return (x[..., list(RGB_BANDS), :, :].float() / RGB_STRETCH_MAX).clamp(0, 1)


def sar_to_rgb(x):
    """(N,2,H,W) or (2,H,W) normalised SAR -> false colour (VV, VH, their mean) in [0,1]."""
    vv, vh = x[..., 0:1, :, :].float(), x[..., 1:2, :, :].float()
    return torch.cat([vv, vh, (vv + vh) / 2], dim=-3).clamp(0, 1)
