"""The uncertainty head, its NLL term, the calibration metrics, ensembles and the uncertainty products
(docs/uncertainty.md). Inputs stay at 32-64 px; tests that train or spawn processes are marked slow."""
import math
import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import bands
import losses
import metrics
import net_CR_CrossAttention as net
import runtime

SMALL = dict(widths=(8, 16, 32), heads=4)  # a tiny CrossAttention: every part, a few thousand parameters


def _inputs(n=2, h=36, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 13, h, w, generator=g), torch.rand(n, 2, h, w, generator=g)


def _model(seed=0, **config):
    torch.manual_seed(seed)
    return net.CloudRemovalCrossAttention(**{**SMALL, **config})


# ----------------------------------------------------------------------------- UnCRtainTS's UCE / AUCE

def uncrtaints_compute_uce_auce(var, errors, n_samples, percent=5):
    """PatrickTUM/UnCRtainTS, model/train_reconstruct.py, compute_uce_auce(l2=True) line for line in numpy, its plot
    left out; torch.Tensor(list) is float32 there, so it is here."""
    binarize = lambda arg, n_bins, floor=0, ceil=1: np.digitize(
        arg, bins=np.linspace(floor, ceil, num=n_bins)[1:])
    n_bins = 100 // percent
    var, errors = np.asarray(var, np.float32), np.asarray(errors, np.float32)
    metric = lambda arg: np.sqrt(np.mean(arg ** 2))
    var_idx = binarize(var, n_bins, floor=var.min(), ceil=var.max()).astype(np.float32)
    bk_var, bk_err = np.empty(n_bins), np.empty(n_bins)
    for bin_idx in range(n_bins):
        bk_var[bin_idx] = metric(np.sqrt(var[var_idx == bin_idx]))
        bk_err[bin_idx] = metric(errors[var_idx == bin_idx])
    calib_err = np.abs(bk_err - bk_var)
    bk_weight = np.histogram(var_idx, n_bins)[0] / n_samples
    return np.nansum(bk_weight * calib_err), np.nanmean(calib_err)


def test_uce_auce_by_hand():
    # two bins (percent 50): variances 1 and 4 in the first, 9 in the second
    out = metrics.uce_auce([1.0, 4.0, 9.0], [1.0, 3.0, 5.0], percent=50)
    gap0 = math.sqrt((1 + 9) / 2) - math.sqrt((1 + 4) / 2)  # RMSE - RMV of the first bin: 0.654929
    assert out["bin_rmv"] == pytest.approx([math.sqrt(2.5), 3.0])
    assert out["bin_rmse"] == pytest.approx([math.sqrt(5), 5])
    assert out["uce"] == pytest.approx(2 / 3 * gap0 + 1 / 3 * 2.0) == pytest.approx(1.103286, abs=1e-6)
    assert out["auce"] == pytest.approx((gap0 + 2.0) / 2) == pytest.approx(1.327464, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's mean of an empty bin, as torch's: NaN
        assert uncrtaints_compute_uce_auce([1.0, 4.0, 9.0], [1.0, 3.0, 5.0], 3, percent=50) == pytest.approx(
            (out["uce"], out["auce"]), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uce_auce_reproduce_uncrtaints_on_a_fixed_input(seed):
    rng = np.random.default_rng(seed)
    std = rng.gamma(2.0, 0.01, size=500)  # heavy right tail, like predicted uncertainties: many empty upper bins
    errors = std * rng.standard_normal(500) * rng.uniform(0.5, 2.0)
    out = metrics.uce_auce(std ** 2, errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        uce, auce = uncrtaints_compute_uce_auce(std ** 2, errors, len(std))
    assert out["uce"] == pytest.approx(uce, rel=1e-5) and out["auce"] == pytest.approx(auce, rel=1e-5)
    assert sum(out["bin_weight"]) == pytest.approx(1.0) and out["bin_weight"][-1] == pytest.approx(1 / 500)
    assert out["uce"] > 0


def test_constant_uncertainty_keeps_its_calibration_error():
    # UnCRtainTS's histogram puts a constant input's weight into an empty bin (UCE 0); here it is |RMSE - std|
    errors = np.array([0.1, -0.3, 0.2, 0.0])
    out = metrics.uce_auce(np.full(4, 0.04), errors)
    assert out["uce"] == pytest.approx(abs(math.sqrt(np.mean(errors ** 2)) - 0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert uncrtaints_compute_uce_auce(np.full(4, 0.04), errors, 4)[0] == 0.0
    with pytest.raises(ValueError, match="as many variances as errors"):
        metrics.uce_auce([1.0, 2.0], [1.0])


def _calibrated_head(n=200_000, seed=0):
    """Per-pixel variances spread like a head's (gamma) and errors drawn from exactly those variances."""
    rng = np.random.default_rng(seed)
    variance = rng.gamma(2.0, 0.01, size=n) ** 2
    return variance, np.sqrt(variance) * rng.standard_normal(n)


def test_a_calibrated_head_scores_about_zero_against_the_constant_baseline():
    variance, errors = _calibrated_head()
    baseline = metrics.constant_uncertainty(variance)
    assert np.all(baseline == variance.mean())
    constant = metrics.uce_auce(baseline, np.abs(errors))["uce"]
    head = metrics.uce_auce(variance, np.abs(errors))["uce"]
    # the square of the mean std (the former baseline) is below the mean variance: it scored the std's spread
    squared_mean_std = metrics.uce_auce(np.full_like(variance, np.sqrt(variance).mean() ** 2), np.abs(errors))["uce"]
    assert constant < 2e-4 and head < 2e-3, (constant, head)
    assert squared_mean_std > 20 * constant and squared_mean_std > 2e-3


def test_uncrtaints_uce_by_hand_and_as_their_code_does():
    # per image: mean variance and mean SIGNED error; two bins (percent 50): variances 1 and 4, then 9
    out = metrics.uce_auce_uncrtaints([1.0, 4.0, 9.0], [1.0, -3.0, 5.0], percent=50)
    gap0 = math.sqrt((1 + 9) / 2) - math.sqrt((1 + 4) / 2)  # RMS error - root mean variance of the first bin
    assert out["uce"] == pytest.approx(2 / 3 * gap0 + 1 / 3 * 2.0, rel=1e-6)
    assert out["auce"] == pytest.approx((gap0 + 2.0) / 2, rel=1e-6)
    # their histogram of the bin indices: a constant variance puts the weight into an empty bin, UCE 0
    assert metrics.uce_auce_uncrtaints(np.full(4, 0.04), [0.1, -0.3, 0.2, 0.0])["uce"] == 0.0
    rng = np.random.default_rng(3)
    variance = rng.gamma(2.0, 0.01, size=300) ** 2
    signed = np.sqrt(variance) * rng.standard_normal(300) * 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        uce, auce = uncrtaints_compute_uce_auce(variance, signed, len(variance))
    theirs = metrics.uce_auce_uncrtaints(variance, signed)
    assert theirs["uce"] == pytest.approx(uce, rel=1e-5) and theirs["auce"] == pytest.approx(auce, rel=1e-5)
    with pytest.raises(ValueError, match="one mean error per mean variance"):
        metrics.uce_auce_uncrtaints([1.0, 2.0], [1.0])


def test_evaluation_reports_uncrtaints_uce_from_the_mean_signed_error():
    import scoring
    target = torch.rand(2, 13, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = target + torch.linspace(-0.02, 0.03, 2 * 13 * 64).reshape(2, 13, 8, 8)
    variance = torch.full_like(target, 4e-4)
    variance[1] *= 2
    out = {"prediction": prediction, "variance": variance, "aleatoric": variance, "epistemic": None}
    cloudy = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    cloudy[:, :, :4] = True
    cols = scoring.uncertainty_scores(out, cloudy, target)
    assert set(cols) == set(scoring.UNCERTAINTY_COLUMNS)
    assert cols["unc_mean_error"] == pytest.approx((target - prediction).mean(dim=(1, 2, 3)).numpy(), abs=1e-7)
    rows = [{k: float(v[i]) for k, v in cols.items()} | {scoring.column("model", r, "RMSE"): 0.02
                                                            for r in scoring.REGIONS} for i in range(2)]
    px = scoring.sample_pixels(out, target, cloudy, torch.Generator().manual_seed(0))
    region = scoring._uncertainty_region(px, rows, "all")
    want = metrics.uce_auce_uncrtaints(cols["unc_var"].numpy(), cols["unc_mean_error"].numpy())
    assert region["uce_uncrtaints"] == pytest.approx(want["uce"]) and region["auce_uncrtaints"] == pytest.approx(
        want["auce"])
    assert region["uce_pixels_constant"] == pytest.approx(abs(np.sqrt(px["se"].mean()) - np.sqrt(px["var"].mean())),
                                                          rel=1e-6)
    assert scoring._uncertainty_region(px, rows, "cloudy")["uce_uncrtaints"] is None  # theirs: whole images only


# ----------------------------------------------------------------------------- Spearman and sparsification

def test_sparsification_averages_ties():
    # the two samples of uncertainty 1 tie: removing half removes the first and one of them, either with chance 1/2
    out = metrics.sparsification([2.0, 1.0, 1.0, 0.0], [4.0, 0.0, 8.0, 1.0], fractions=(0.0, 0.25, 0.5))
    assert out["rmse"] == pytest.approx([math.sqrt(13 / 4), math.sqrt(9 / 3), math.sqrt((4 + 1) / 2)])
    # a constant uncertainty removes average samples whatever the samples' order: a flat curve
    rng = np.random.default_rng(0)
    se = np.sort(rng.exponential(size=1000))  # sorted: image order would look like a perfect (or worst) ranking
    flat = metrics.sparsification(np.ones(1000), se)
    assert flat["rmse"] == pytest.approx([math.sqrt(se.mean())] * len(flat["rmse"]))
    shuffled = metrics.sparsification(np.ones(1000), rng.permutation(se))
    assert shuffled["area_between"] == pytest.approx(flat["area_between"])
    assert metrics.sparsification(np.ones(1000), se[::-1])["area_between"] == pytest.approx(flat["area_between"])


def test_sparsification_by_hand():
    out = metrics.sparsification([4.0, 3.0, 2.0, 1.0], [1.0, 16.0, 4.0, 0.0], fractions=(0.0, 0.25, 0.5))
    full = math.sqrt(21 / 4)
    assert out["rmse"] == pytest.approx([full, math.sqrt(20 / 3), math.sqrt(2)])
    assert out["oracle_rmse"] == pytest.approx([full, math.sqrt(5 / 3), math.sqrt(0.5)])
    gaps = [0.0, (math.sqrt(20 / 3) - math.sqrt(5 / 3)) / full, (math.sqrt(2) - math.sqrt(0.5)) / full]
    assert out["area_between"] == pytest.approx(0.25 * (gaps[0] + gaps[1]) / 2 + 0.25 * (gaps[1] + gaps[2]) / 2)


def test_perfect_uncertainty_is_the_oracle_and_noise_is_not():
    rng = np.random.default_rng(0)
    se = rng.exponential(size=2000)
    perfect = metrics.sparsification(np.sqrt(se), se)
    assert perfect["area_between"] == pytest.approx(0.0, abs=1e-12) and perfect["rmse"] == perfect["oracle_rmse"]
    noise = metrics.sparsification(rng.uniform(size=2000), se)
    assert noise["area_between"] > 0.3  # a random ranking removes average pixels: its curve stays flat
    assert all(o <= m + 1e-12 for m, o in zip(noise["rmse"], noise["oracle_rmse"]))
    assert metrics.spearman(np.sqrt(se), np.sqrt(se)) == pytest.approx(1.0)
    assert abs(metrics.spearman(rng.uniform(size=2000), se)) < 0.1
    assert math.isnan(metrics.spearman(np.ones(5), np.arange(5.0)))


# ----------------------------------------------------------------------------- the head

def test_head_adds_an_output_and_leaves_the_prediction_alone():
    optical, sar = _inputs()
    plain, headed = _model().eval(), _model(use_uncertainty_head=True).eval()
    with torch.no_grad():
        p0, aux0 = plain(optical, sar, return_aux=True)
        p1, aux1 = headed(optical, sar, return_aux=True)
    assert aux0.log_variance is None and headed.config.use_uncertainty_head
    assert torch.equal(p0, p1)  # built last, detached input: the same weights and the same prediction
    lv = aux1.log_variance
    assert lv.shape == optical.shape and lv.dtype == torch.float32
    assert torch.allclose(lv.exp().sqrt(), torch.tensor(net.UNCERTAINTY_INIT_STD))  # untrained: the initial std
    parts = net.parameter_breakdown(headed)
    assert parts["uncertainty_head"] == net.count_parameters(headed.uncertainty_head) > 0
    assert net.count_parameters(headed) == net.count_parameters(plain) + parts["uncertainty_head"]
    with torch.no_grad():
        headed.uncertainty_head.net[-1].bias.fill_(50.0)  # far outside the clamp
        assert headed(optical, sar, return_aux=True)[1].log_variance.max() == net.LOG_VARIANCE_MAX


def test_head_computes_in_float32_under_autocast():
    """The fp16 path on CUDA runs this same code: autocast switched off inside the head, its input cast to float32.
    Under CPU bf16 autocast its output equals the head applied in float32 to the same features, bit for bit."""
    m = _model(use_uncertainty_head=True).eval()
    with torch.no_grad():
        m.uncertainty_head.net[-1].weight.normal_(0, 0.1)
    seen = {}
    m.uncertainty_head.register_forward_hook(lambda mod, args, out: seen.update(features=args[0], out=out))
    optical, sar = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(optical, sar, return_aux=True)
    assert seen["features"].dtype == torch.bfloat16  # the decoder did run in bf16
    with torch.no_grad():
        reference = m.uncertainty_head.net(seen["features"].float()).clamp(net.LOG_VARIANCE_MIN, net.LOG_VARIANCE_MAX)
    assert seen["out"].dtype == torch.float32 and torch.equal(seen["out"], reference)


def test_old_checkpoints_rebuild_without_the_head():
    import runtime
    model = _model()
    config = {k: v for k, v in asdict(model.config).items() if k != "use_uncertainty_head"}  # as saved before the head
    ckpt = {"model": model.state_dict(), "model_name": "CrossAttention", "model_config": config}
    rebuilt = runtime.build_model_from_checkpoint(ckpt)
    assert rebuilt.config.use_uncertainty_head is False and rebuilt.uncertainty_head is None


# ----------------------------------------------------------------------------- the NLL term

def test_nll_is_the_gaussian_and_laplace_negative_log_likelihood():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 13, 8, 8, generator=g), torch.rand(2, 13, 8, 8, generator=g)
    s = torch.randn(2, 13, 8, 8, generator=g) - 4
    gaussian = torch.nn.functional.gaussian_nll_loss(pred, target, s.exp(), full=True, eps=0.0)
    assert losses.nll_loss(pred, target, s, "gaussian") == pytest.approx(float(gaussian), rel=1e-5)
    laplace = -torch.distributions.Laplace(pred, (s.exp() / 2).sqrt()).log_prob(target).mean()
    assert losses.nll_loss(pred, target, s, "laplace") == pytest.approx(float(laplace), rel=1e-5)
    with pytest.raises(ValueError, match="gaussian"):
        losses.nll_loss(pred, target, s, "cauchy")


@pytest.mark.parametrize("distribution", losses.NLL_DISTRIBUTIONS)
def test_nll_is_lowest_at_the_errors_variance_and_trains_only_the_variance(distribution):
    error = torch.tensor([0.01, -0.05, 0.2])
    pred = torch.zeros(1, 3, 1, 1, requires_grad=True)
    # Gaussian: the variance e^2; Laplace: 2 b^2 with b = |e|
    best = (error ** 2 * (1.0 if distribution == "gaussian" else 2.0)).log().view(1, 3, 1, 1)
    s = best.clone().requires_grad_(True)
    losses.nll_loss(pred, error.view(1, 3, 1, 1), s, distribution).backward()
    assert s.grad.abs().max() < 1e-6 and pred.grad is None  # a minimum, and the prediction is left alone
    for shift in (-0.5, 0.5):
        assert losses.nll_loss(pred, error.view(1, 3, 1, 1), best + shift, distribution) > \
            losses.nll_loss(pred, error.view(1, 3, 1, 1), best, distribution)


def test_nll_stays_finite_where_fp16_would_overflow():
    """exp(-s) at the clamp (s = -18.4) times an error of 0.5 is 2.5e7, beyond fp16's 65504; fp16 inputs (what a T4's
    autocast hands the loss) are cast to float32 first."""
    pred = torch.zeros(1, 13, 4, 4, dtype=torch.float16)
    target = torch.full((1, 13, 4, 4), 0.5, dtype=torch.float16)
    s = torch.full((1, 13, 4, 4), net.LOG_VARIANCE_MIN, dtype=torch.float16)
    assert torch.isinf(0.5 * target.square() * torch.exp(-s)).all()  # the same arithmetic in fp16 overflows
    for distribution in losses.NLL_DISTRIBUTIONS:
        value = losses.nll_loss(pred, target, s, distribution)
        expected = losses.nll_loss(pred.double(), target.double(), s.double(), distribution)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_criterion_adds_the_nll_term_beside_the_others():
    g = torch.Generator().manual_seed(0)
    pred, target, cloudy = (torch.rand(2, 13, 16, 16, generator=g) for _ in range(3))
    s = torch.full((2, 13, 16, 16), -5.0)
    crit = losses.CRLoss(perceptual_weight=0, use_fft_loss=True, nll_weight=0.1, nll_distribution="gaussian")
    total, terms = crit(pred, target, cloudy, aux=net.ModelOutputs(log_variance=s))
    assert set(terms) == {"l1", "fft", "nll"}
    assert float(terms["nll"]) == pytest.approx(0.1 * float(losses.nll_loss(pred, target, s, "gaussian")))
    assert float(total) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-6)
    with pytest.raises(ValueError, match="uncertainty head"):
        crit(pred, target, cloudy)
    with pytest.raises(ValueError, match="nll_distribution"):
        losses.CRLoss(perceptual_weight=0, nll_distribution="normal")
    assert "nll" not in losses.CRLoss(perceptual_weight=0).weights  # off unless asked for


# ----------------------------------------------------------------------------- ensembles

def test_ensemble_is_the_mean_with_the_members_spread_and_mean_variance():
    members = [_model(seed, use_uncertainty_head=True).eval() for seed in (0, 1, 2)]
    for i, m in enumerate(members):
        with torch.no_grad():
            m.uncertainty_head.net[-1].bias.fill_(-6.0 - i)
    optical, sar = _inputs()
    with torch.no_grad():
        outs = [m(optical, sar, return_aux=True) for m in members]
        mean, aux = runtime.Ensemble(members)(optical, sar, return_aux=True)
    preds = torch.stack([p for p, _ in outs])
    assert torch.allclose(mean, preds.mean(0)) and aux.members == 3
    assert torch.allclose(aux.epistemic_variance, ((preds - preds.mean(0)) ** 2).mean(0), atol=1e-9)
    assert torch.allclose(aux.log_variance.exp(), torch.stack([a.log_variance.exp() for _, a in outs]).mean(0))
    assert torch.allclose(aux.confidence, torch.stack([a.confidence for _, a in outs]).mean(0))
    plain = runtime.Ensemble([_model(0).eval(), _model(1).eval()])
    with torch.no_grad():
        assert plain(optical, sar, return_aux=True)[1].log_variance is None  # epistemic only
    with pytest.raises(ValueError, match="at least 2"):
        runtime.Ensemble(members[:1])


# ----------------------------------------------------------------------------- evaluation and products

CROP = 48  # 2,304 pixels per image, under the sampling cap: every pixel is pooled


def _train(csv_path, root, save_dir, name, *extra):
    import train_CR_kaggle as train
    argv = ["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
            str(save_dir), "--experiment_name", name, "--max_epochs", "1", "--batch_sz", "2", "--load_size", "64",
            "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0", "--perceptual_weight", "0",
            "--amp", "off", "--warmup_epochs", "0.5", "--num_quicklooks", "0", *extra]
    assert train.main(argv) == 0
    return save_dir / name / "last.pth"


@pytest.fixture(scope="module")
def head_checkpoints(synthetic_dataset, tmp_path_factory):
    """Two checkpoints of the default network with the uncertainty head (1 epoch each, seeds 0 and 1)."""
    root, csv_path = synthetic_dataset
    save_dir = tmp_path_factory.mktemp("head_ckpt")
    return [_train(csv_path, root, save_dir, f"head{seed}", "--use_uncertainty_head", "--seed", str(seed))
            for seed in (0, 1)]


def _evaluate(checkpoints, synthetic_dataset, results, *extra):
    import test_CR
    root, csv_path = synthetic_dataset
    return test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", *map(str, checkpoints), "--data_list_filepath", str(csv_path), "--input_data_folder",
        str(root), "--split", "test", "--results_dir", str(results), "--crop_size", str(CROP), "--amp", "off",
        "--num_workers", "0", "--device", "cpu", "--batch_sz", "3", *extra]))


def _read(path):
    import rasterio
    with rasterio.open(path) as src:
        return src.read().astype(np.float64), src.crs, src.transform, src.descriptions


@pytest.mark.slow
def test_evaluation_scores_the_saved_uncertainty_products(head_checkpoints, synthetic_dataset, tmp_path):
    """summary.json's figures are recomputed from the saved GeoTIFFs (prediction, std) and the targets with
    metrics.py: the products hold exactly what was scored."""
    import datalist
    import dataloader
    import quicklooks
    summary = _evaluate(head_checkpoints[:1], synthetic_dataset, tmp_path, "--save_uncertainty", "--save_geotiff",
                        "--save_png")
    u = summary["uncertainty"]
    assert u["source"] == "aleatoric (uncertainty head)" and u["epistemic_std"] is None
    root, csv_path = synthetic_dataset
    dataset = dataloader.SEN12MSCRDataset(datalist.select_split(datalist.read_data_list(csv_path), "test"), root,
                                          crop_size=CROP, augment=False, cloud_detector="rule")
    pixels = {"std": [], "var": [], "se": [], "ae": [], "cloudy": []}
    for s in (dataset[i] for i in range(len(dataset))):
        stem = s["file_name"][:-4]
        std, crs, transform, descriptions = _read(tmp_path / "uncertainty" / f"{stem}.tif")
        prediction, crs_p, transform_p, _ = _read(tmp_path / "geotiff" / f"{stem}.tif")
        assert std.shape == (13, CROP, CROP) and (crs, transform) == (crs_p, transform_p) and (std > 0).all()
        assert descriptions[3].startswith("B4 predicted standard deviation")
        error = prediction / bands.S2_SCALE - s["cloudfree_data"].double().numpy()
        for key, value in (("std", std.mean(0)), ("var", (std ** 2).mean(0)), ("se", (error ** 2).mean(0)),
                           ("ae", np.abs(error).mean(0)), ("cloudy", s["cloud_mask"][0].numpy() >= 0.2)):
            pixels[key].append(value.ravel())
    px = {k: np.concatenate(v) for k, v in pixels.items()}
    assert u["pixels_sampled"] == px["std"].size  # 48 px patches: every pixel
    cloudy = px["cloudy"]
    for region, sel in (("all", np.ones_like(cloudy)), ("cloudy", cloudy), ("clear", ~cloudy)):
        r = u["regions"][region]
        assert r["spearman"] == pytest.approx(metrics.spearman(px["std"][sel], px["ae"][sel]), abs=1e-3), region
        uce = metrics.uce_auce(px["var"][sel], np.sqrt(px["se"][sel]))["uce"]
        assert r["uce_pixels"] == pytest.approx(uce, rel=1e-3)
        curve = metrics.sparsification(px["std"][sel], px["se"][sel])
        assert r["sparsification_area"] == pytest.approx(curve["area_between"], abs=1e-3)
        assert r["rmse_drop_pct"]["10"] == pytest.approx(100 * (1 - curve["rmse"][2] / curve["rmse"][0]), abs=0.1)
        assert r["mean_std"] == pytest.approx(px["std"][sel].mean(), rel=1e-4)
        assert r["uce_pixels_constant"] == pytest.approx(abs(np.sqrt(px["se"][sel].mean())
                                                             - np.sqrt(px["var"][sel].mean())), rel=1e-3)
    assert u["cloudy_clear_ratio"] == pytest.approx(u["mean_std"]["cloudy"] / u["mean_std"]["clear"])
    assert (tmp_path / "calibration.png").is_file() and u["calibration_plot"] == str(tmp_path / "calibration.png")
    # the per-image columns: UCE over images reads them with the model's RMSE
    import csv
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    by_image = metrics.uce_auce([float(r["unc_var"]) for r in rows], [float(r["model_RMSE"]) for r in rows])
    assert u["regions"]["all"]["uce_images"] == pytest.approx(by_image["uce"], rel=1e-6)
    theirs = metrics.uce_auce_uncrtaints([float(r["unc_var"]) for r in rows],
                                         [float(r["unc_mean_error"]) for r in rows])
    assert u["regions"]["all"]["uce_uncrtaints"] == pytest.approx(theirs["uce"], rel=1e-5)
    # the quicklook has the sixth panel: the band-mean std on its fixed colour scale
    from matplotlib import colormaps
    from PIL import Image
    from test_eval import _enlarged, _panel
    layout = quicklooks.quicklook_layout(CROP, CROP, uncertainty=True)
    png = np.asarray(Image.open(tmp_path / "png" / f"{stem}.png").convert("RGB"))
    assert png.shape == (*layout["size"], 3)
    want = colormaps[quicklooks.UNCERTAINTY_CMAP]((std.mean(0) / quicklooks.QUICKLOOK_STD_MAX).clip(0, 1))[..., :3]
    got = _panel(png, layout, 5, CROP, CROP)
    assert np.abs(got - _enlarged(torch.from_numpy(want).permute(2, 0, 1), layout["scale"])).max() <= 2 / 255


@pytest.mark.slow
def test_a_model_without_uncertainty_reports_none_and_refuses_the_product(synthetic_dataset, tmp_path):
    import runtime
    root, csv_path = synthetic_dataset
    plain = _train(csv_path, root, tmp_path / "ckpt", "plain")
    summary = _evaluate([plain], synthetic_dataset, tmp_path / "results")
    assert summary["uncertainty"] is None and summary["checkpoint"] == str(plain)
    assert not (tmp_path / "results" / "calibration.png").exists()
    with pytest.raises(runtime.UsageError, match="no uncertainty head"):
        _evaluate([plain], synthetic_dataset, tmp_path / "results", "--save_uncertainty")


@pytest.mark.slow
def test_an_ensemble_scores_the_members_mean_and_reports_their_spread(head_checkpoints, synthetic_dataset, tmp_path):
    import datalist
    import dataloader
    import runtime
    summary = _evaluate(head_checkpoints, synthetic_dataset, tmp_path, "--save_geotiff", "--save_uncertainty")
    u = summary["uncertainty"]
    assert summary["checkpoint"] == [str(p) for p in head_checkpoints] and summary["epoch"] == [1, 1]
    assert u["source"] == "ensemble of 2: aleatoric + epistemic (members' spread)"
    assert u["epistemic_std"] > 0 and u["aleatoric_std"] > 0
    root, csv_path = synthetic_dataset
    s = dataloader.SEN12MSCRDataset(datalist.select_split(datalist.read_data_list(csv_path), "test"), root,
                                    crop_size=CROP, augment=False)[0]
    members = [runtime.load_model(p, torch.device("cpu"))[0] for p in head_checkpoints]
    with torch.no_grad():
        outs = [m(s["cloudy_data"][None], s["SAR_data"][None], return_aux=True) for m in members]
    mean = torch.stack([p for p, _ in outs]).mean(0)
    saved, *_ = _read(tmp_path / "geotiff" / f"{s['file_name'][:-4]}.tif")
    assert np.abs(saved - bands.denormalize_s2(bands.finish_s2(mean))[0]).max() <= 1  # one uint16 step
    variance = torch.stack([a.log_variance.exp() for _, a in outs]).mean(0) + torch.stack(
        [p for p, _ in outs]).var(0, unbiased=False)
    std, *_ = _read(tmp_path / "uncertainty" / f"{s['file_name'][:-4]}.tif")
    assert np.allclose(std, variance[0].sqrt().numpy(), rtol=1e-4, atol=1e-7)
    # the same checkpoint twice: no spread
    twice = _evaluate(head_checkpoints[:1] * 2, synthetic_dataset, tmp_path / "twice")["uncertainty"]
    assert twice["epistemic_std"] == 0.0
    assert summary["model_name"] == "Ensemble of 2 CrossAttention"


# ----------------------------------------------------------------------------- training: AMP, resume, DDP, compile

def _tiny_args(csv_path, root, save_dir, *extra, epochs=1):
    from test_train import tiny
    args = tiny(csv_path, root, save_dir, "--perceptual_weight", "0", *extra, epochs=epochs)
    args.remove("--use_contrastive_loss")
    return args


@pytest.mark.slow
def test_training_with_the_head_under_a_grad_scaler_then_resumed(synthetic_dataset, tmp_path):
    """The NLL term trains the head beside the design's terms on the GradScaler path (a T4's --amp fp16, run on the
    CPU), and a resumed run rebuilds the head from the checkpoint and continues it."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_CR_kaggle as train
    root, csv_path = synthetic_dataset
    fp16 = ("--use_uncertainty_head", "--amp", "fp16", "--channels_last", "on")  # layout pinned: no fp16 timing probe
    # 3 epochs: the scaler skips its first steps while it calibrates (tests/test_train.py's fp16 test counts them)
    assert train.main(_tiny_args(csv_path, root, tmp_path, *fp16, epochs=3)) == 0
    run = tmp_path / "glf_cr_enhanced_v3"
    first = runtime.load_checkpoint(run / "last.pth")
    assert first["model_config"]["use_uncertainty_head"] and first["args"]["nll_weight"] == 0.1
    assert first["scaler"]["scale"] > 0
    assert first["model"]["uncertainty_head.net.1.weight"].abs().sum() > 0  # the zero-initialised layer learned
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "train/loss_nll" in acc.Tags()["scalars"]
    resumed = [a for a in _tiny_args(csv_path, root, tmp_path, *fp16, epochs=4) if a != "--train_from_scratch"]
    assert train.main(resumed) == 0
    second = runtime.load_checkpoint(run / "last.pth")
    assert second["epoch"] == 4 and second["global_step"] > first["global_step"]
    key = "uncertainty_head.net.1.weight"
    assert not torch.equal(second["model"][key], first["model"][key])
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_the_nll_term_and_the_head_go_together(synthetic_dataset, tmp_path):
    import train_CR_kaggle as train
    root, csv_path = synthetic_dataset
    with pytest.raises(runtime.UsageError, match="--nll_weight 0.1 needs the uncertainty head"):
        train.main(_tiny_args(csv_path, root, tmp_path, "--nll_weight", "0.1"))
    with pytest.raises(runtime.UsageError, match="would not learn"):
        train.main(_tiny_args(csv_path, root, tmp_path, "--use_uncertainty_head", "--nll_weight", "0"))
    assert not list(tmp_path.iterdir()), "a run that fails before its first step leaves no run folder"
    nll = losses.TERMS["nll"]
    assert losses.resolve(model=net.ModelConfig(use_uncertainty_head=True)).weights["nll"] == nll.weight == 0.1
    assert losses.resolve(model=net.ModelConfig()).weights["nll"] == 0.0
    assert losses.resolve(model=net.DSen2CRConfig()).weights["nll"] == 0.0  # DSen2CR has no head


@pytest.mark.slow
def test_torchrun_two_processes_train_the_head(synthetic_dataset, tmp_path):
    from test_train import torchrun_two_processes

    root, csv_path = synthetic_dataset
    proc = torchrun_two_processes(_tiny_args(csv_path, root, tmp_path, "--device", "cpu", "--use_uncertainty_head"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = runtime.load_checkpoint(tmp_path / "glf_cr_enhanced_v3" / "last.pth")
    assert ckpt["model_config"]["use_uncertainty_head"]
    assert ckpt["model"]["uncertainty_head.net.1.weight"].abs().sum() > 0


@pytest.mark.slow
def test_the_head_compiles():
    """torch.compile (inductor, CPU) of the head, fed bf16 features under bf16 autocast as in training: float32 out,
    the eager head's values, and the NLL's gradient through the compiled graph. (The whole network compiled on CPU
    takes minutes here; the head is what this feature adds to it.)"""
    torch._dynamo.reset()
    head = net.UncertaintyHead(channels=8)
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 0.1)
    compiled = torch.compile(head)
    features = torch.randn(2, 8, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, out = head(features), compiled(features)
    assert out.dtype == torch.float32 and torch.allclose(out, eager, atol=1e-5)
    losses.nll_loss(torch.zeros_like(out), torch.full_like(out, 0.1), out).backward()
    assert head.net[-1].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- whole scenes

from test_eval import SCENE_H, SCENE_W, Pointwise, scene  # noqa: E402,F401  (scene: a fixture)


class PointwiseWithVariance(Pointwise):
    """Pointwise (per-pixel 1x1 network) with a per-pixel log-variance too: any tiling must reproduce it exactly."""

    def forward(self, optical, sar, return_aux=False):
        pred, aux = super().forward(optical, sar, return_aux=True)
        log_variance = -8.0 + 2.0 * torch.tanh(4.0 * (pred - optical))
        return (pred, replace(aux, log_variance=log_variance)) if return_aux else pred


def _whole_scene(model, cloudy_path, sar_path):
    import contextlib

    import inference
    import rasters
    cloudy = torch.from_numpy(bands.normalize_s2(rasters.read_raster(cloudy_path, 13)))[None]
    sar = torch.from_numpy(bands.normalize_s1(rasters.read_raster(sar_path, 2)))[None]
    return inference.forward_all(model, cloudy, sar, contextlib.nullcontext())["variance"][0].sqrt().numpy()


@pytest.mark.parametrize("tile,overlap", [(32, 8), (40, 16)])
def test_tiled_uncertainty_reproduces_a_pointwise_model(scene, tmp_path, tile, overlap):
    import inference
    model = PointwiseWithVariance().eval()
    inference.predict_scene(model, *scene, tmp_path / "out.tif", tile=tile, overlap=overlap, batch_sz=2, progress=False,
                          uncertainty_path=tmp_path / "std.tif")
    std, crs, transform, descriptions = _read(tmp_path / "std.tif")
    _, crs_in, transform_in, _ = _read(scene[0])
    assert std.shape == (13, SCENE_H, SCENE_W) and (crs, transform) == (crs_in, transform_in)
    assert descriptions[0].startswith("B1 predicted standard deviation")
    whole = _whole_scene(model, *scene)
    assert np.abs(std - whole).max() <= 1e-6 * np.abs(whole).max()  # blending equal values: float32 rounding only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif", "std.tif"]


@pytest.mark.slow
def test_predict_writes_the_uncertainty_without_seams(scene, head_checkpoints, tmp_path):
    import inference
    import test_CR
    out = tmp_path / "cloudfree.tif"
    argv = ["--predict", "--checkpoint", *map(str, head_checkpoints), "--cloudy", str(scene[0]), "--sar",
            str(scene[1]), "--out", str(out), "--tile", "32", "--overlap", "8", "--amp", "off", "--device", "cpu",
            "--save_uncertainty"]
    assert test_CR.main(argv) == 0
    std, crs, transform, _ = _read(tmp_path / "cloudfree_uncertainty.tif")
    _, crs_in, transform_in, _ = _read(scene[0])
    assert std.shape == (13, SCENE_H, SCENE_W) and (crs, transform) == (crs_in, transform_in) and (std > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloudfree.tif", "cloudfree_uncertainty.tif"]
    # The seams of one model's head (an ensemble of two 1-epoch models is dominated by their spread, which depends on
    # each tile's context far more than a trained head's: measured 3.2x against 6.6x for the head alone)
    model, _ = runtime.load_models(head_checkpoints[:1], torch.device("cpu"))
    inference.predict_scene(model, *scene, tmp_path / "soft.tif", tile=32, overlap=8, progress=False,
                          uncertainty_path=tmp_path / "soft_std.tif")
    std, *_ = _read(tmp_path / "soft_std.tif")
    whole = _whole_scene(model, *scene)

    def seam(img, overlap):
        """Mean excess of the column-to-column jump at tile edges over the single-pass image's jump there (as the
        prediction's seam test in tests/test_eval.py measures it)."""
        edges = sorted({s + d for s in inference.tile_starts(SCENE_W, 32, overlap)[1:] for d in (0, overlap)})
        jump = lambda a: np.abs(np.diff(a, axis=2))[:, :, [e - 1 for e in edges]]
        return np.abs(jump(img) - jump(whole)).mean()

    inference.predict_scene(model, *scene, tmp_path / "hard.tif", tile=32, overlap=0, progress=False,
                          uncertainty_path=tmp_path / "hard_std.tif")
    stitched, *_ = _read(tmp_path / "hard_std.tif")
    # feathered tiles jump at their edges as the single pass does; hard stitching leaves a step several times larger
    # (measured 1.1e-5 against 7.5e-5)
    assert seam(std, 8) < seam(stitched, 0) / 3, (seam(std, 8), seam(stitched, 0))
    assert np.abs(std - whole).mean() < 0.1 * whole.mean()  # 32 px tiles see less context, not another image


def test_predict_asks_before_replacing_the_uncertainty_output(scene, tmp_path):
    import test_CR
    out = tmp_path / "cloudfree.tif"
    (tmp_path / "cloudfree_uncertainty.tif").write_bytes(b"old")
    args = test_CR.build_parser().parse_args(["--predict", "--checkpoint", "x.pth", "--cloudy", str(scene[0]), "--sar",
                                              str(scene[1]), "--out", str(out), "--save_uncertainty"])
    with pytest.raises(runtime.UsageError, match="cloudfree_uncertainty.tif exists; pass --overwrite"):
        test_CR.check_predict_output(args)
    args.overwrite = True
    assert test_CR.check_predict_output(args) == out


def test_the_head_leaves_the_random_stream_alone():
    """Built from a fork of the random stream: the draws after the network (e.g. the training data's order) are those
    of the network without the head, so a run with the head trains the same network on the same batches."""
    _model()
    after_plain = torch.rand(3)
    _model(use_uncertainty_head=True)
    assert torch.equal(torch.rand(3), after_plain)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_network_trains_bit_for_bit_as_without_the_head(synthetic_dataset, tmp_path, amp):
    """The head takes nothing from the network: detached features, a detached prediction in its loss, a forked random
    stream at construction, and a gradient clipped apart from the network's. So the network's weights after training
    are those of the same run without the head, bit for bit (CPU, eager): the head costs no PSNR by construction."""
    import train_CR_kaggle as train
    import training
    root, csv_path = synthetic_dataset
    weights = {}
    for name, extra in (("plain", ()), ("head", ("--use_uncertainty_head",))):
        # one memory layout for both runs: --channels_last auto times both and may pick either where they tie;
        # 16 px crops, the smallest that test it: bf16 is emulated, and slow, on a CPU without native bf16
        assert train.main(_tiny_args(csv_path, root, tmp_path / name, "--amp", amp, "--grad_clip", "0.1",
                                     "--channels_last", "off", "--crop_size", "16", "--val_crop_size", "16",
                                     "--num_quicklooks", "0", *extra, epochs=2)) == 0
        weights[name] = runtime.load_checkpoint(tmp_path / name / "glf_cr_enhanced_v3" / "last.pth")["model"]
    network = [k for k in weights["head"] if not k.startswith("uncertainty_head.")]
    assert sorted(network) == sorted(weights["plain"]) and len(network) < len(weights["head"])
    assert all(torch.equal(weights["plain"][k], weights["head"][k]) for k in network)
    # what the measured runs had: one clip norm for both, which lets the head's gradient move the network
    torch.manual_seed(0)
    model = _model(use_uncertainty_head=True)
    groups = training.clip_groups(model)
    assert len(groups) == 2 and groups[1] == list(model.uncertainty_head.parameters())
    assert len(training.clip_groups(_model())) == 1
