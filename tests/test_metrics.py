"""metrics.py against independent implementations (scikit-image, torchmetrics, float64 numpy) on the
real SEN12MS-CR sample and on random data; plus the conventions metrics.py documents (PSNR cap, SAM of
zero spectra, masks, empty masks, autocast, GLF-CR window centre)."""
import math

import numpy as np
import pytest
import rasterio
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import (
    spectral_angle_mapper,
    structural_similarity_index_measure,
)

import metrics

PAD = 5  # half of the 11 px SSIM window: beyond it the zero padding no longer reaches the map


def _load_s2(path):
    # Read directly with rasterio (not dataloader.py) so this test depends on metrics.py alone;
    # the normalisation is the project's: reflectance / 10000 clipped to [0, 1].
    with rasterio.open(path) as src:
        arr = src.read().astype(np.float32)
    return torch.from_numpy(np.clip(arr / 10000.0, 0.0, 1.0))[None]


@pytest.fixture(scope="module")
def real_pair(real_sample_dir):
    name = "ROIs2017_winter_112_p797.tif"
    cloudy = _load_s2(real_sample_dir / "s2_cloudy" / name)
    cloudfree = _load_s2(real_sample_dir / "s2_cloudfree" / name)
    assert cloudy.shape == cloudfree.shape == (1, 13, 256, 256)
    return cloudy, cloudfree


def _random_pair(n=3, c=13, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, c, size, size, generator=g)
    # Correlated prediction, so SSIM/SAM sit in a realistic range, not at the noise floor.
    pred = (target + 0.1 * torch.randn(n, c, size, size, generator=g)).clamp(0, 1)
    return pred, target


def _skimage_reference(pred, target):
    """Per-image PSNR, interior SSIM, MAE, RMSE in float64 numpy/scikit-image, and SAM in float64."""
    out = {k: [] for k in metrics.METRIC_NAMES}
    for p, t in zip(pred.double().numpy(), target.double().numpy()):
        out["PSNR"].append(peak_signal_noise_ratio(t, p, data_range=1.0))
        # skimage reflect-pads but averages only the interior (it crops 5 px): a padding-free SSIM.
        out["SSIM"].append(structural_similarity(t, p, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1.0, channel_axis=0))
        out["MAE"].append(np.abs(p - t).mean())
        out["RMSE"].append(np.sqrt(((p - t) ** 2).mean()))
        cos = (p * t).sum(0) / (np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0))
        out["SAM"].append(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())
    return {k: np.array(v) for k, v in out.items()}


# Tolerances: ours runs in float32, the references in float64.
TOL = {"PSNR": 1e-4, "SSIM": 2e-5, "SAM": 1e-3, "MAE": 1e-6, "RMSE": 1e-6}


def _check_against_references(pred, target):
    ref = _skimage_reference(pred, target)
    ours = metrics.compute_metrics(pred, target)
    for key in ("PSNR", "SAM", "MAE", "RMSE"):
        np.testing.assert_allclose(ours[key].numpy(), ref[key], rtol=0, atol=TOL[key], err_msg=key)
    # SSIM: skimage averages the padding-free map, which is our padding="valid" mode ...
    valid = metrics.ssim_map(pred, target, padding="valid").mean(dim=(1, 2, 3))
    np.testing.assert_allclose(valid.numpy(), ref["SSIM"], rtol=0, atol=TOL["SSIM"])
    # ... and equals the interior of our zero-padded GLF-CR map.
    interior = metrics.ssim_map(pred, target)[..., PAD:-PAD, PAD:-PAD].mean(dim=(1, 2, 3))
    np.testing.assert_allclose(interior.numpy(), ref["SSIM"], rtol=0, atol=TOL["SSIM"])

    # torchmetrics (1.9) reflect-pads and averages its whole map, so compare the maps' interiors.
    _, tm_map = structural_similarity_index_measure(
        pred.double(), target.double(), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0,
        reduction="none", return_full_image=True)
    ours_map = metrics.ssim_map(pred, target)
    # Per pixel, float32 cancellation in E[x^2] - mu^2 reaches ~1.2e-4 on the real sample (measured
    # against a float64 run); the means above agree to 1e-7, so the map tolerance is looser.
    np.testing.assert_allclose(ours_map[..., PAD:-PAD, PAD:-PAD].numpy(),
                               tm_map[..., PAD:-PAD, PAD:-PAD].float().numpy(), rtol=0, atol=3e-4)
    tm_sam = spectral_angle_mapper(pred.double(), target.double(), reduction="none")  # radians, (N,H,W)
    np.testing.assert_allclose(ours["SAM"].numpy(), np.degrees(tm_sam.mean(dim=(1, 2)).numpy()),
                               rtol=0, atol=TOL["SAM"])
    # The GLF-CR protocol includes the zero-padded border, so it must differ from the interior mean.
    assert not torch.allclose(ours["SSIM"], interior, atol=1e-6)
    return ours


@pytest.mark.slow
def test_real_sample_against_skimage_and_torchmetrics(real_pair):
    cloudy, cloudfree = real_pair
    ours = _check_against_references(cloudy, cloudfree)
    # Sanity on the scale: a hazy scene vs its clear date is neither identical nor noise.
    assert 10 < ours["PSNR"].item() < 40 and 0.3 < ours["SSIM"].item() < 0.95


def test_random_data_against_skimage_and_torchmetrics():
    pred, target = _random_pair()
    _check_against_references(pred, target)


def _glfcr_reference_ssim(img1, img2):
    """GLF-CR's SSIM formula re-derived here (window centred at window_size / 2, zero padding 5)."""
    size, sigma = 11, 1.5
    g = torch.tensor([math.exp(-(x - size / 2) ** 2 / (2 * sigma ** 2)) for x in range(size)], dtype=torch.float64)
    g = g / g.sum()
    c = img1.shape[1]
    w = torch.outer(g, g).expand(c, 1, size, size)
    img1, img2 = img1.double(), img2.double()

    def blur(x):
        return torch.nn.functional.conv2d(x, w, padding=size // 2, groups=c)

    mu1, mu2 = blur(img1), blur(img2)
    s1 = blur(img1 * img1) - mu1 ** 2
    s2 = blur(img2 * img2) - mu2 ** 2
    s12 = blur(img1 * img2) - mu1 * mu2
    m = ((2 * mu1 * mu2 + 1e-4) * (2 * s12 + 9e-4)) / ((mu1 ** 2 + mu2 ** 2 + 1e-4) * (s1 + s2 + 9e-4))
    return m.mean(dim=(1, 2, 3))


def test_glfcr_window_option_reproduces_glfcr():
    pred, target = _random_pair(n=2, size=32, seed=3)
    np.testing.assert_allclose(metrics.ssim(pred, target, glfcr_window=True).numpy(),
                               _glfcr_reference_ssim(pred, target).numpy(), rtol=0, atol=1e-6)
    w = metrics.gaussian_window(glfcr_window=True)
    assert torch.allclose(w[5, 5], w[6, 6])  # peak between pixels 5 and 6, i.e. centred at 5.5
    w = metrics.gaussian_window()
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.isclose(w.sum(), torch.tensor(1.0))


def test_glfcr_window_difference(real_pair):
    """The bounds documented in metrics.py and the README for centred vs GLF-CR window."""
    cloudy, cloudfree = real_pair
    real_diff = (metrics.ssim(cloudy, cloudfree) - metrics.ssim(cloudy, cloudfree, glfcr_window=True)).abs().item()
    assert 1e-6 < real_diff < 2e-4
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 13, 64, 64, generator=g)
    y = torch.rand(2, 13, 64, 64, generator=g)
    rand_diff = (metrics.ssim(x, y) - metrics.ssim(x, y, glfcr_window=True)).abs().max().item()
    assert 1e-5 < rand_diff < 2e-3
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noise_diff = (metrics.ssim(noisy, x) - metrics.ssim(noisy, x, glfcr_window=True)).abs().max().item()
    assert noise_diff < 5e-5


def test_identical_images_psnr_capped_and_perfect_scores():
    _, target = _random_pair(n=2, size=32)
    scores = metrics.compute_metrics(target, target.clone())
    assert torch.equal(scores["PSNR"], torch.full((2,), metrics.PSNR_CAP))
    assert metrics.PSNR(target, target) == 100.0  # GLF-CR returns 100 for mse == 0
    assert torch.allclose(scores["SSIM"], torch.ones(2), atol=1e-6)
    assert torch.all(scores["SAM"] < 1e-3)  # float32 acos would give ~0.02 deg here
    assert torch.equal(scores["MAE"], torch.zeros(2)) and torch.equal(scores["RMSE"], torch.zeros(2))
    # Rounding-level error (MSE 1e-14) still reports the cap, never more than 100 dB.
    near = target + 1e-7
    assert metrics.psnr(near, target).max().item() == metrics.PSNR_CAP
    # A real error is not capped: MSE 1e-4 -> exactly 40 dB.
    assert metrics.psnr((target + 0.01), target)[0].item() == pytest.approx(40.0, abs=1e-3)


def test_sam_of_zero_spectra_is_finite():
    zeros = torch.zeros(1, 13, 8, 8)
    ones = torch.ones(1, 13, 8, 8)
    assert metrics.sam(zeros, zeros).item() == 0.0
    assert metrics.sam(zeros, ones).item() == pytest.approx(90.0, abs=1e-4)
    assert metrics.sam(2 * ones, ones).item() == pytest.approx(0.0, abs=1e-4)  # scale-invariant
    assert metrics.sam(-ones, ones).item() == pytest.approx(180.0, abs=1e-4)
    assert torch.isfinite(metrics.compute_metrics(zeros, zeros)["SSIM"]).all()


def _masks(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) > 0.6


def test_masked_metrics_match_numpy_on_selected_pixels():
    pred, target = _random_pair(n=2, size=40, seed=1)
    cloudy = _masks(2, 40, seed=2)
    out = metrics.masked_metrics(pred, target, cloudy)
    full_map = metrics.ssim_map(pred, target).double().numpy()
    for part, sel in (("cloudy", cloudy), ("clear", ~cloudy)):
        for i in range(2):
            m = sel[i, 0].numpy()
            p, t = pred[i].double().numpy()[:, m], target[i].double().numpy()[:, m]  # (C, pixels)
            mse = ((p - t) ** 2).mean()
            cos = (p * t).sum(0) / (np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0))
            expected = {"PSNR": 10 * np.log10(1 / mse), "RMSE": np.sqrt(mse), "MAE": np.abs(p - t).mean(),
                        "SAM": np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(),
                        "SSIM": full_map[i][:, m].mean()}
            for key, value in expected.items():
                assert out[part][key][i].item() == pytest.approx(value, abs=TOL[key]), (part, key, i)
    # The per-metric functions agree with the dict, and 0/1 float masks equal bool masks.
    as_float = cloudy.float()
    for name, fn in (("PSNR", metrics.psnr), ("SSIM", metrics.ssim), ("SAM", metrics.sam),
                     ("MAE", metrics.mae), ("RMSE", metrics.rmse)):
        assert torch.allclose(fn(pred, target, as_float), out["cloudy"][name], atol=1e-6), name
    # An all-ones mask is the unmasked metric.
    everything = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    unmasked, all_selected = metrics.compute_metrics(pred, target), metrics.compute_metrics(pred, target, everything)
    for key in metrics.METRIC_NAMES:
        assert torch.allclose(unmasked[key], all_selected[key], atol=1e-6), key


def test_masked_ssim_matches_skimage_map_inside_the_image(real_pair):
    cloudy, cloudfree = real_pair
    crop = (slice(None), slice(None), slice(64, 128), slice(64, 128))
    pred, target = cloudy[crop], cloudfree[crop]
    # Select pixels away from the border, where skimage's reflect padding and our zero padding agree.
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 10:40, 20:55] = True  # windows of these pixels stay inside the 64 px crop (<= 58 + 5)
    _, skimage_map = structural_similarity(
        target[0].double().numpy(), pred[0].double().numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=0, full=True)
    expected = skimage_map[:, mask[0, 0].numpy()].mean()
    assert metrics.ssim(pred, target, mask).item() == pytest.approx(expected, abs=TOL["SSIM"])


def test_soft_cloud_score_needs_threshold():
    pred, target = _random_pair(n=1, size=16)
    soft = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="threshold"):
        metrics.masked_metrics(pred, target, soft)
    with pytest.raises(ValueError, match="threshold"):
        metrics.psnr(pred, target, soft)
    thresholded = metrics.masked_metrics(pred, target, soft, threshold=0.2)
    direct = metrics.masked_metrics(pred, target, soft >= 0.2)
    for part in ("cloudy", "clear"):
        for key in metrics.METRIC_NAMES:
            assert torch.equal(thresholded[part][key], direct[part][key])


def test_empty_mask_gives_nan_for_that_image_only():
    pred, target = _random_pair(n=2, size=24)
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    mask[1, :, :12] = True  # image 0 selects nothing
    scores = metrics.compute_metrics(pred, target, mask)
    for key in metrics.METRIC_NAMES:
        assert torch.isnan(scores[key][0]), key
        assert torch.isfinite(scores[key][1]), key
    # masked_metrics: image 0 is all clear -> its cloudy half is NaN, its clear half is the full image.
    split = metrics.masked_metrics(pred, target, mask)
    assert torch.isnan(split["cloudy"]["PSNR"][0])
    assert split["clear"]["PSNR"][0].item() == pytest.approx(metrics.psnr(pred, target)[0].item(), abs=1e-5)
    # Batch means skip the image with nothing selected; NaN only if no image selects anything.
    assert metrics.PSNR(pred, target, mask) == pytest.approx(scores["PSNR"][1].item(), abs=1e-5)
    assert math.isnan(metrics.PSNR(pred, target, torch.zeros_like(mask)))


def test_autocast_and_bf16_inputs_give_fp32_numbers():
    pred, target = _random_pair(n=2, size=32, seed=4)
    reference = metrics.compute_metrics(pred, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = metrics.compute_metrics(pred, target)
    for key in metrics.METRIC_NAMES:
        assert under_autocast[key].dtype == torch.float32
        assert torch.allclose(under_autocast[key], reference[key], rtol=0, atol=1e-6), key
    # bf16 tensors (e.g. a bf16 model output): scored in fp32 on exactly the bf16 values.
    pred16, target16 = pred.bfloat16(), target.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores16 = metrics.compute_metrics(pred16, target16)
    exact = metrics.compute_metrics(pred16.float(), target16.float())
    for key in metrics.METRIC_NAMES:
        assert scores16[key].dtype == torch.float32
        assert torch.allclose(scores16[key], exact[key], rtol=0, atol=1e-6), key


def test_per_image_equals_batch_and_glfcr_names_are_batch_means():
    pred, target = _random_pair(n=3, size=32, seed=6)
    mask = _masks(3, 32, seed=7)
    batch = metrics.compute_metrics(pred, target, mask)
    for i in range(3):
        single = metrics.compute_metrics(pred[i:i + 1], target[i:i + 1], mask[i:i + 1])
        for key in metrics.METRIC_NAMES:
            assert torch.allclose(single[key][0], batch[key][i], atol=1e-6), (key, i)
    plain = metrics.compute_metrics(pred, target)
    for name in metrics.METRIC_NAMES:
        value = getattr(metrics, name)(pred, target)
        # GLF-CR's types: PSNR a Python float, SSIM a 0-d tensor; ours follow for MAE/RMSE/SAM (float).
        assert isinstance(value, torch.Tensor) if name == "SSIM" else isinstance(value, float)
        assert float(value) == pytest.approx(plain[name].mean().item(), abs=1e-6), name
    # GLF-CR's masked PSNR for one image: sum of masked squared error / (selected pixels * C).
    p, t, m = pred[:1], target[:1], mask[:1].float()
    glfcr_mse = ((p - t) ** 2 * m).sum() / (m.sum() * p.shape[1])
    assert metrics.PSNR(p, t, mask[:1]) == pytest.approx(20 * math.log10(1 / math.sqrt(glfcr_mse)), abs=1e-4)


def test_bad_input_raises_clear_errors():
    pred, target = _random_pair(n=2, size=16)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(pred, target[:, :12])
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(pred[0], target[0])
    with pytest.raises(ValueError, match="mask must have shape"):
        metrics.sam(pred, target, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(TypeError):
        metrics.mae(pred.numpy(), target.numpy())
    with pytest.raises(ValueError, match="padding"):
        metrics.ssim_map(pred, target, padding="reflect")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    pred, target = _random_pair(n=2, size=32, seed=8)
    mask = _masks(2, 32, seed=9)
    cpu = metrics.compute_metrics(pred, target, mask)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        gpu = metrics.compute_metrics(pred.cuda().half(), target.cuda().half(), mask.cuda())
    cpu16 = metrics.compute_metrics(pred.half().float(), target.half().float(), mask)
    for key in metrics.METRIC_NAMES:
        assert gpu[key].device.type == "cuda" and gpu[key].dtype == torch.float32
        assert torch.allclose(gpu[key].cpu(), cpu16[key], rtol=0, atol=1e-4), key
    assert cpu["PSNR"].shape == (2,)


def test_glfcr_ssim_keeps_item_call():
    """GLF-CR's test script calls SSIM(...).item(): our SSIM returns a 0-d tensor like theirs."""
    torch.manual_seed(0)
    a = torch.rand(2, 13, 32, 32)
    value = metrics.SSIM(a, a * 0.9)
    assert value.dim() == 0 and abs(value.item() - metrics.ssim(a, a * 0.9).mean().item()) < 1e-6
