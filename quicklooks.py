"""Quicklook PNGs of evaluated patches and the calibration plot of the predicted uncertainty: everything test_CR.py
draws with matplotlib (imported only where a PNG is asked for).

    save_quicklook("png/NAME.png", cloudy, sar, prediction, target, confidence, title="NAME", uncertainty=std)
    quicklook_layout(h, w)                       # where each panel lies in that PNG
    save_calibration_plot("calibration.png", summary["uncertainty"])
"""
import math
from pathlib import Path

import numpy as np

import bands
import files

QUICKLOOK_PANELS = ("cloudy input", "SAR (VV, VH, mean)", "prediction", "target (cloud-free)", "cloud confidence")
UNCERTAINTY_PANEL = "uncertainty (std, band mean)"  # a sixth panel, for models that predict an uncertainty
QUICKLOOK_MIN_SIDE = 256  # smaller patches are enlarged by a whole factor (nearest neighbour) to at least this
QUICKLOOK_CMAP = "magma"  # perceptually uniform, dark = clear, bright = cloudy
UNCERTAINTY_CMAP = "viridis"  # another map than the confidence's, so the two panels are not read as one quantity
# One fixed colour scale for the std in every quicklook (like the RGB stretch): 0 .. 0.05 reflectance, about the RMSE
# of a cloudy input (26.8 dB on the synthetic test split is 0.046), so clear pixels stay dark and clouds light up.
QUICKLOOK_STD_MAX = 0.05
QUICKLOOK_DPI = 100
_QL_MARGIN, _QL_GAP, _QL_TOP, _QL_BAR = 12, 12, 56, 88  # px: border, between panels, title + labels, colour bar


def quicklook_layout(height, width, uncertainty=False):
    """Pixel layout of the quicklook of an (height, width) image: {"scale", "size": (H, W) of the PNG,
    "panels": [(top, left)] per QUICKLOOK_PANELS entry (and UNCERTAINTY_PANEL with uncertainty=True),
    "colorbar": (top, left, height, width) of the confidence's colour bar, "colorbars": every colour bar}. Panel k
    holds the image enlarged `scale` times: PNG rows top..top+scale*height, columns left..left+scale*width."""
    scale = max(1, math.ceil(QUICKLOOK_MIN_SIDE / max(height, width)))
    ph, pw = height * scale, width * scale
    lefts = [_QL_MARGIN + k * (pw + _QL_GAP) for k in range(len(QUICKLOOK_PANELS))]
    bars = [lefts[-1] + pw + _QL_GAP]
    if uncertainty:  # after the confidence's colour bar: the std panel and its own bar
        lefts.append(bars[0] + _QL_BAR)
        bars.append(lefts[-1] + pw + _QL_GAP)
    colorbars = [(_QL_TOP, left, ph, 14) for left in bars]
    return {"scale": scale, "size": (_QL_TOP + ph + _QL_MARGIN, bars[-1] + _QL_BAR),
            "panels": [(_QL_TOP, left) for left in lefts], "colorbar": colorbars[0], "colorbars": colorbars}


def _quicklook_images(cloudy, sar, prediction, target, confidence, uncertainty):
    """(H,W,3) float arrays of the quicklook's panels, in QUICKLOOK_PANELS order (then the uncertainty's)."""
    from matplotlib import colormaps

    images = [bands.s2_to_rgb(cloudy), bands.s2_to_rgb(cloudy) if sar is None else bands.sar_to_rgb(sar),
              bands.s2_to_rgb(prediction), bands.s2_to_rgb(target)]
    images = [img.float().cpu().permute(1, 2, 0).numpy() for img in images]
    if sar is None:  # evaluated without radar: a grey panel
        images[1] = np.full_like(images[0], 0.85)
    images.append(np.full_like(images[0], 0.85) if confidence is None
                  else colormaps[QUICKLOOK_CMAP](confidence[0].float().clamp(0, 1).cpu().numpy())[..., :3])
    if uncertainty is not None:
        std = (uncertainty[0].float().cpu().numpy() / QUICKLOOK_STD_MAX).clip(0, 1)
        images.append(colormaps[UNCERTAINTY_CMAP](std)[..., :3])
    return images


def _colour_bar(fig, at, box, cmap, ticks, labels):
    """A vertical colour bar in the PNG pixel box (top, left, height, width), values 0..1 of cmap."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    top, left, height, width = box
    x, y = at(top + height, left)
    cax = fig.add_axes((x, y, width / fig.bbox.width, height / fig.bbox.height))
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[cmap]), cax=cax, ticks=ticks)
    cax.set_yticklabels(labels, fontsize=8)


def save_quicklook(path, cloudy, sar, prediction, target, confidence, title="", uncertainty=None):
    """One labelled PNG row cloudy | SAR | prediction | target | confidence (| uncertainty); (C,H,W) tensors in [0,1].
    RGB panels use the fixed stretch of bands.s2_to_rgb (reflectance 0-0.3) unresampled but for a whole-number
    enlargement, so panels compare across images; confidence is a heat map with its colour bar (0 clear .. 1
    cloudy); uncertainty, a (1,H,W) standard deviation, another with its own (0 .. QUICKLOOK_STD_MAX)."""
    from matplotlib.figure import Figure  # matplotlib only where a PNG is asked for

    layout = quicklook_layout(*cloudy.shape[-2:], uncertainty=uncertainty is not None)
    (fig_h, fig_w), scale = layout["size"], layout["scale"]
    images = _quicklook_images(cloudy, sar, prediction, target, confidence, uncertainty)
    fig = Figure(figsize=(fig_w / QUICKLOOK_DPI, fig_h / QUICKLOOK_DPI), dpi=QUICKLOOK_DPI, facecolor="white")
    at = lambda top, left: (left / fig_w, 1 - top / fig_h)  # PNG pixel -> figure fraction
    fig.text(*at(6, _QL_MARGIN), f"{title}   RGB = B4, B3, B2, reflectance 0-0.3", va="top", fontsize=10)
    for (top, left), label, img in zip(layout["panels"], QUICKLOOK_PANELS + (UNCERTAINTY_PANEL,), images):
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        fig.figimage(big, xo=left, yo=fig_h - top - big.shape[0], origin="upper")
        fig.text(*at(top - 5, left), label, va="bottom", fontsize=10, weight="bold")
    top, left, height, width = layout["colorbar"]
    if confidence is None:
        x, y = at(top + height / 2, layout["panels"][4][1] + 8)
        fig.text(x, y, "no confidence map:\nthis model predicts none", va="center", fontsize=9)
    else:
        _colour_bar(fig, at, layout["colorbar"], QUICKLOOK_CMAP, [0, 0.5, 1], ["0 clear", "0.5", "1 cloudy"])
    if uncertainty is not None:
        _colour_bar(fig, at, layout["colorbars"][1], UNCERTAINTY_CMAP, [0, 0.5, 1],
                    ["0", f"{QUICKLOOK_STD_MAX / 2:g}", f">= {QUICKLOOK_STD_MAX:g}"])
    with files.atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=QUICKLOOK_DPI)


CALIBRATION_COLOURS = {"all": "black", "cloudy": "tab:blue", "clear": "tab:orange"}


def save_calibration_plot(path, uncertainty):
    """PNG of the calibration over pixels: each UCE bin's RMSE against its root mean variance (the predicted
    uncertainty), per region, marker area by the bin's share of pixels, on log axes with the diagonal of a perfect
    calibration drawn. Returns the path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(5.5, 5), dpi=QUICKLOOK_DPI)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    points = []
    for region, colour in CALIBRATION_COLOURS.items():
        figures = uncertainty["regions"].get(region)
        if figures is None:
            continue
        bins = figures["pixel_bins"]
        kept = [(x, y, w) for x, y, w in zip(bins["rmv"], bins["rmse"], bins["weight"]) if x and y]
        points += kept
        ax.scatter([x for x, _, _ in kept], [y for _, y, _ in kept], s=[8 + 400 * w for _, _, w in kept],
                   color=colour, alpha=0.6, label=f"{region}: UCE {figures['uce_pixels']:.4f}")
    if points:
        lo, hi = min(min(x, y) for x, y, _ in points) / 1.5, max(max(x, y) for x, y, _ in points) * 1.5
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="perfect calibration")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    for axis in (ax.xaxis, ax.yaxis):  # 1-2-5 ticks in plain numbers: a decade or less is shown, often
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predicted uncertainty of the bin (root mean variance)")
    ax.set_ylabel("RMSE of the bin")
    ax.set_title(f"calibration over pixels, {uncertainty['source']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with files.atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
