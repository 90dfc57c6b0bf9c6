"""The fp32 islands of an fp16 run (docs/training.md, "Precision"): each part is fed values that fp16 cannot carry
(beyond its 65504 maximum, under its 6e-5 smallest normal, or finer than its 11-bit mantissa) under
torch.autocast("cpu", torch.float16), and must give a finite float32 result equal to its fp32 computation. Beside
each, the same arithmetic done in fp16 shows that the values really stress it."""
import math

import pytest
import torch

import losses
import metrics
import net_CR_CrossAttention as net

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


def same_in_fp16_autocast(function, *inputs, rel=1e-6):
    """function(*inputs) under fp16 autocast: finite, float32 and equal (to rel) to the result without autocast."""
    exact = function(*inputs)
    with fp16_autocast():
        amp = function(*inputs)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    torch.testing.assert_close(amp, exact, rtol=rel, atol=0.0)
    return amp


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return net.CloudRemovalCrossAttention(use_uncertainty_head=True).eval()


def forward_fp16(model, cloudy):
    sar = torch.rand(cloudy.shape[0], 2, *cloudy.shape[-2:])
    with torch.no_grad(), fp16_autocast():
        return model(cloudy, sar, return_aux=True)


def reflectance_grid(size=16, start=0.3):
    """13-band images on the products' 1e-4 reflectance grid, most values between fp16's (2.4e-4 apart near 0.3)."""
    return start + torch.randint(0, 40, (1, 13, size, size)) * 1e-4


# ----------------------------------------------------------------------------- the network's islands

def forward_fp16_with_constant_output(model, layer, bias, cloudy=None):
    """forward_fp16 of `cloudy` (default reflectance_grid()) with `layer` (a conv) answering `bias` at every pixel;
    its weights are put back afterwards."""
    with torch.no_grad():
        saved = layer.weight.clone(), layer.bias.clone()
        layer.weight.zero_()
        layer.bias.copy_(bias)
    try:
        return forward_fp16(model, reflectance_grid() if cloudy is None else cloudy)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved[0])
            layer.bias.copy_(saved[1])


def test_affine_residual_head_keeps_the_detail_its_offset_nearly_cancels(model):
    """residual = offset + gain * cloudy: with gain 1 and offset -0.3 the residual is the input's detail (1e-4
    steps), which fp16's 2.4e-4 spacing near 0.3 would round away."""
    cloudy = reflectance_grid()
    offsets_then_gains = torch.cat([torch.full((13,), -0.3), torch.ones(model.head.bias.numel() - 13)])
    _, aux = forward_fp16_with_constant_output(model, model.head, offsets_then_gains, cloudy)
    detail = cloudy - 0.3
    assert aux.residual.dtype == torch.float32
    torch.testing.assert_close(aux.residual, detail, rtol=0, atol=1e-6)
    naive = torch.tensor(-0.3).half() + cloudy.half()
    assert (naive.float() - detail).abs().max() > 5e-5  # fp16 loses it


def test_final_addition_passes_clear_pixels_bit_for_bit(model):
    """prediction = cloudy + confidence * residual in fp32: with no residual the output is the input exactly, though
    its values (1e-4 grid) lie between fp16's."""
    cloudy = reflectance_grid()
    prediction, _ = forward_fp16_with_constant_output(model, model.head, 0.0, cloudy)
    assert prediction.dtype == torch.float32 and torch.equal(prediction, cloudy)
    assert not torch.equal(cloudy.half().float(), cloudy)


def test_confidence_sigmoid_resolves_a_certain_cloud(model):
    """sigmoid of the confidence logits in fp32: at a logit of 10, 1 - confidence is 4.5e-5; fp16 rounds the
    confidence to exactly 1 (its spacing below 1 is 4.9e-4)."""
    _, aux = forward_fp16_with_constant_output(model, model.cloud_predictor.net[-1], 10.0)
    assert aux.confidence.dtype == torch.float32
    torch.testing.assert_close(1 - aux.confidence, torch.full_like(aux.confidence, 1 - math.exp(10) /
                                                                      (1 + math.exp(10))), rtol=1e-3, atol=0)
    assert torch.sigmoid(torch.tensor(10.0).half()) == 1


def test_uncertainty_head_resolves_small_variances(model):
    """The head's log-variance in fp32: near the floor (-18.4) fp16 steps by 0.0156 (1.6 % of the variance), so
    bands 0.004 apart would collapse onto a few values."""
    wanted = -15.0 - 0.004 * torch.arange(13.0)
    _, aux = forward_fp16_with_constant_output(model, model.uncertainty_head.net[-1], wanted)
    assert aux.log_variance.dtype == torch.float32
    torch.testing.assert_close(aux.log_variance[0, :, 0, 0], wanted, rtol=0, atol=1e-6)
    assert len(wanted.half().unique()) < 13


def test_fused_attention_survives_scores_beyond_fp16():
    """The default fused attention accumulates q.k in fp32 inside the kernel (flash attention, on CPU and CUDA):
    scores over 65504 stay finite. The explicit reference path materialises fp16 scores and overflows; it is a
    test and benchmark path only."""
    q = torch.full((1, 8, 16, 32), 110.0)  # q.k / sqrt(32) = 68,446
    q[..., 1::2, :] = -110.0
    v = torch.rand(1, 8, 16, 32)
    fusion = net.CrossAttentionFusion()
    exact = fusion._attend(q, q, v)
    with fp16_autocast():
        fused = fusion._attend(q, q, v)
        fusion.attention = "reference"
        reference = fusion._attend(q, q, v)
    assert fused.dtype == torch.float16 and torch.isfinite(fused).all()
    torch.testing.assert_close(fused.float(), exact, rtol=0, atol=2e-3)
    assert not torch.isfinite(reference).all()


def test_group_norm_statistics_do_not_overflow():
    """GroupNorm on fp16 features: on CPU the kernel keeps fp32 statistics (output fp16), on CUDA autocast runs it in
    fp32; a mean square of 40,000 over 4,096 values would overflow an fp16 sum."""
    x = (200.0 + torch.randn(1, 64, 8, 8)).half()
    norm = net._gn(64)
    with fp16_autocast():
        out = norm(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), norm(x.float()), rtol=0, atol=5e-2)
    assert (x * x).sum(dtype=torch.float16).isinf()


# ----------------------------------------------------------------------------- the losses' and metrics' islands

def test_nll_with_a_tiny_variance():
    """exp(-log_variance) reaches e^18.4 = 1e8 at the head's floor: beyond fp16."""
    pred, target = torch.zeros(1, 13, 8, 8), torch.full((1, 13, 8, 8), 0.5)
    s = torch.full((1, 13, 8, 8), net.LOG_VARIANCE_MIN).half()
    for distribution in losses.NLL_DISTRIBUTIONS:
        same_in_fp16_autocast(lambda *a, d=distribution: losses.nll_loss(*a, distribution=d), pred.half(), target, s)
    assert torch.exp(-s).isinf().all()


def test_confidence_bce_at_a_certain_map():
    """The BCE clamps the map to [1e-7, 1 - 1e-7] in fp32: in fp16 1 - 1e-7 is 1, log(1 - 1) = -inf (torch's BCE
    then clamps the log to -100, a loss 6x too large)."""
    confidence = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).half()
    labels = 1 - confidence.float()
    target = torch.rand(2, 13, 4, 4)
    loss = same_in_fp16_autocast(lambda c: losses.confidence_loss(c, target, labels=labels), confidence)
    assert loss.item() == pytest.approx(-math.log(losses.EPS), rel=1e-2)  # about 16, not 100
    assert torch.tensor(1 - losses.EPS).half() == 1


def test_fft_loss_at_256_px():
    """The FFT term in fp32 and orthonormal: an unnormalised transform of a 256 px difference of 1 has a DC term of
    65,536, past fp16's maximum (CPU's FFT takes no fp16 at all; CPU autocast runs FFTs in fp32)."""
    diff = torch.ones(1, 13, 256, 256).half()
    same_in_fp16_autocast(losses.fft_l1, diff)
    assert torch.fft.rfft2(diff.float()).abs().max() > FP16_MAX


def test_cloud_focused_weights_with_errors_below_fp16():
    """The weighted L1 of a converged prediction: errors of 1e-8 reflectance underflow fp16 (smallest subnormal
    6e-8), the weights multiply them and the per-image normalisation divides."""
    target = torch.rand(2, 13, 32, 32)
    pred = target + 1e-8 * torch.rand_like(target)
    mask = torch.rand(2, 1, 32, 32)
    focused = losses.CloudFocusedLoss()
    same_in_fp16_autocast(lambda p: focused(p, target, cloud_mask=mask), pred, rel=1e-5)
    assert ((pred - target).half() == 0).float().mean() > 0.5


@pytest.mark.slow
def test_vgg_normalisation_and_the_fp16_vgg_terms():
    """The ImageNet normalisation of the RGB input runs in fp32 (CRLoss switches autocast off); the VGG layers up to
    relu4_1 run in fp16 and the deeper ones in fp32 (losses.FP32_AFTER): the perceptual and contrastive terms stay
    within the tolerances tests/test_losses.py states for bf16."""
    torch.manual_seed(0)
    target, cloudy = torch.rand(2, 13, 32, 32), torch.rand(2, 13, 32, 32)
    pred = 0.5 * (target + cloudy)
    crit = losses.CRLoss(**losses.loss_options("design", vgg_weights="random"))
    exact = crit._vgg_terms(pred, target, cloudy)
    crit.vgg_dtype = torch.float16
    with fp16_autocast():
        rgb = losses.rgb_for_vgg(pred, crit.imagenet_mean, crit.imagenet_std)
        amp = crit._vgg_terms(pred, target, cloudy)
    assert rgb.dtype == torch.float32
    for name, a, e, rel in zip(("perceptual", "contrastive"), amp, exact, (2e-3, 2e-2)):
        assert a.dtype == torch.float32 and torch.isfinite(a), name
        assert a.item() == pytest.approx(e.item(), rel=rel), name


def test_psnr_and_ssim_of_a_close_prediction():
    """PSNR and SSIM in fp32 with autocast off: squared errors of 2^-13 differences (1.5e-8) underflow fp16 (PSNR
    would read inf), and SSIM's variances, E[x^2] - E[x]^2, cancel catastrophically in fp16's 11 bits."""
    target = 0.25 + 0.01 * torch.rand(1, 13, 32, 32)
    pred = target + 2.0 ** -13 * torch.sign(torch.randn_like(target))
    same_in_fp16_autocast(metrics.psnr, pred, target)
    same_in_fp16_autocast(metrics.ssim, pred, target, rel=1e-5)
    assert ((pred - target).half() ** 2 == 0).all()
    x = target.half()
    fp16_variance = (x * x).mean() - x.mean() ** 2
    assert abs(fp16_variance.float() / target.var(unbiased=False) - 1) > 0.1
