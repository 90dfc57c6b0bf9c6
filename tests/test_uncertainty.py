"""The uncertainty head, its NLL term, the calibration metrics, ensembles and the uncertainty products
(docs/uncertainty.md). Inputs stay at 32-64 px; tests that train or spawn processes are marked slow."""
import math
import warnings

import numpy as np
import pytest
import torch

import losses
import metrics
import net_CR_CrossAttention as net

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
    binarize = lambda arg, n_bins, floor=0, ceil=1: np.digitize(arg, bins=np.linspace(floor, ceil, num=n_bins)[1:])  # noqa: E731
    n_bins = 100 // percent
    var, errors = np.asarray(var, np.float32), np.asarray(errors, np.float32)
    metric = lambda arg: np.sqrt(np.mean(arg ** 2))  # noqa: E731
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
    assert out["bin_rmv"] == pytest.approx([math.sqrt(2.5), 3.0]) and out["bin_rmse"] == pytest.approx([math.sqrt(5), 5])
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


# ----------------------------------------------------------------------------- Spearman and sparsification

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
    assert aux0["log_variance"] is None and headed.config["use_uncertainty_head"]
    assert torch.equal(p0, p1)  # built last, detached input: the same weights and the same prediction
    lv = aux1["log_variance"]
    assert lv.shape == optical.shape and lv.dtype == torch.float32
    assert torch.allclose(lv.exp().sqrt(), torch.tensor(net.UNCERTAINTY_INIT_STD))  # untrained: the initial std
    parts = net.parameter_breakdown(headed)
    assert parts["uncertainty_head"] == net.count_parameters(headed.uncertainty_head) > 0
    assert net.count_parameters(headed) == net.count_parameters(plain) + parts["uncertainty_head"]
    with torch.no_grad():
        headed.uncertainty_head.net[-1].bias.fill_(50.0)  # far outside the clamp
        assert headed(optical, sar, return_aux=True)[1]["log_variance"].max() == net.LOG_VARIANCE_MAX


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
    config = {k: v for k, v in model.config.items() if k != "use_uncertainty_head"}  # as saved before the head
    ckpt = {"model": model.state_dict(), "model_name": "CrossAttention", "model_config": config}
    rebuilt = runtime.build_model_from_checkpoint(ckpt)
    assert rebuilt.config["use_uncertainty_head"] is False and rebuilt.uncertainty_head is None


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
        assert value.dtype == torch.float32 and torch.isfinite(value) and float(value) == pytest.approx(float(expected), rel=1e-5)


def test_criterion_adds_the_nll_term_beside_the_others():
    g = torch.Generator().manual_seed(0)
    pred, target, cloudy = (torch.rand(2, 13, 16, 16, generator=g) for _ in range(3))
    s = torch.full((2, 13, 16, 16), -5.0)
    crit = losses.CRLoss(perceptual_weight=0, use_fft_loss=True, nll_weight=0.1, nll_distribution="gaussian")
    total, terms = crit(pred, target, cloudy, log_variance=s)
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
        mean, aux = net.Ensemble(members)(optical, sar, return_aux=True)
    preds = torch.stack([p for p, _ in outs])
    assert torch.allclose(mean, preds.mean(0)) and aux["members"] == 3
    assert torch.allclose(aux["epistemic_variance"], ((preds - preds.mean(0)) ** 2).mean(0), atol=1e-9)
    assert torch.allclose(aux["log_variance"].exp(), torch.stack([a["log_variance"].exp() for _, a in outs]).mean(0))
    assert torch.allclose(aux["confidence"], torch.stack([a["confidence"] for _, a in outs]).mean(0))
    plain = net.Ensemble([_model(0).eval(), _model(1).eval()])
    with torch.no_grad():
        assert plain(optical, sar, return_aux=True)[1]["log_variance"] is None  # epistemic only
    with pytest.raises(ValueError, match="at least 2"):
        net.Ensemble(members[:1])
