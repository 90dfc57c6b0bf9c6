"""net_CR_CrossAttention.py: shapes, parameter budget, the two attention paths, switches, precision.

Inputs stay at 32-64 px so the whole file runs in seconds on a shared 2-core machine.
"""
import copy
from dataclasses import asdict

import pytest
import torch

import losses
import net_CR_CrossAttention as net
import runtime
from net_CR_CrossAttention import (
    CloudRemovalCrossAttention,
    DSen2CR,
    count_parameters,
    create_model,
)

# Design: 6.00M parameters in total, SAR spectral attention ~100 or fewer, cloud predictor ~0.37M.
DESIGN_TOTAL, DESIGN_TOLERANCE = 6.00e6, 0.05e6


def _inputs(n=1, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 13, h, w, generator=g), torch.rand(n, 2, h, w, generator=g)


def _model(seed=0, **config):
    torch.manual_seed(seed)
    return CloudRemovalCrossAttention(**config)


@pytest.fixture(scope="module")
def model():
    return _model().eval()


def test_parameter_budget_matches_design(model):
    # the design document's network: every switch added after it off
    design = _model(**net.design_switches())
    total = count_parameters(design)
    assert abs(total - DESIGN_TOTAL) <= DESIGN_TOLERANCE, total
    assert count_parameters(design.sar_encoder.spectral_attention) <= 100
    assert abs(count_parameters(design.cloud_predictor) - 0.37e6) <= 0.01e6
    # the default adds what BENCHMARKS.md measured worth it: SAR skips, the confidence refinement, the affine head
    parts, design_parts = net.parameter_breakdown(model), net.parameter_breakdown(design)
    top_level = {k: v for k, v in parts.items() if "." not in k}
    assert sum(top_level.values()) == count_parameters(model)
    sar_skips = (parts["up2"] + parts["up1"]) - (design_parts["up2"] + design_parts["up1"])
    gains = parts["head"] - design_parts["head"]
    assert gains == 13 * (64 * 9 + 1)  # a second 3x3 head of 13 bands: the gains
    assert count_parameters(model) == total + sar_skips + parts["confidence_refinement"] + gains


@pytest.mark.parametrize("n,h,w", [(1, 32, 32), (2, 37, 45), (1, 64, 50), (1, 33, 63), (1, 3, 5), (1, 1, 2)])
def test_output_shapes_any_size(model, n, h, w):
    optical, sar = _inputs(n, h, w)
    with torch.no_grad():
        prediction, aux = model(optical, sar, return_aux=True)
    assert prediction.shape == (n, 13, h, w) and prediction.dtype == torch.float32
    assert aux.residual.shape == (n, 13, h, w)
    assert aux.confidence.shape == (n, 1, h, w)
    assert torch.all((aux.confidence >= 0) & (aux.confidence <= 1))
    assert torch.isfinite(prediction).all()


def test_crop_back_keeps_the_image_content_aligned(model):
    # A 37x45 input is padded to 40x48 and cropped back: the prediction for the padded image, cropped, is
    # the prediction for the original (same pixels, same place), not a shifted or resampled one.
    optical, sar = _inputs(1, 37, 45)
    padded_optical = net._pad_to_multiple(optical, 4)
    padded_sar = net._pad_to_multiple(sar, 4)
    with torch.no_grad():
        direct = model(optical, sar)
        via_padded = model(padded_optical, padded_sar)[..., :37, :45]
    torch.testing.assert_close(direct, via_padded, rtol=0, atol=1e-6)


def test_fused_and_reference_attention_agree():
    # Same weights, two attention kernels: fp32 outputs and gradients agree to 1e-4 (both sum the same
    # 256 products per token; only the accumulation order differs).
    fused = _model(attention="fused")
    reference = _model(attention="reference")
    reference.load_state_dict(fused.state_dict())
    assert count_parameters(fused) == count_parameters(reference)
    optical, sar = _inputs(1, 32, 36)
    out_f, out_r = fused(optical, sar), reference(optical, sar)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    out_f.square().mean().backward()
    out_r.square().mean().backward()
    for (name, pf), (_, pr) in zip(fused.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_reference_path_differs_from_a_broken_attention():
    # Guards the agreement test above: replacing attention by a uniform average changes the output.
    fused = _model()
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        before = fused(optical, sar)
        fused.fusion._attend = lambda q, k, v: v.mean(dim=-2, keepdim=True).expand_as(q)
        after = fused(optical, sar)
    assert (before - after).abs().max() > 1e-5


@pytest.mark.parametrize("config", [{}, {"use_cross_attn": False}, {"use_cloud_predictor": False},
                                    {"affine_residual": False}])
def test_every_parameter_gets_a_gradient(config):
    m = _model(**config)
    with torch.no_grad():  # zero-initialised last layers pass no gradient to their inner layers until trained
        if m.confidence_refinement is not None:
            m.confidence_refinement.net[-1].weight.normal_(0, 0.1)
        if m.date_correction is not None:
            m.date_correction.mlp[-1].weight.normal_(0, 0.1)
    optical, sar = _inputs(1, 32, 32)
    m(optical, sar).abs().mean().backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_spectral_attention_switch():
    full = _model()
    without = _model(use_spectral_attention=False)
    sa = count_parameters(full.sar_encoder.spectral_attention)
    assert without.sar_encoder.spectral_attention is None
    assert count_parameters(full) - count_parameters(without) == sa
    # Same remaining weights: the output differs only through the VV/VH reweighting.
    without.load_state_dict({k: v for k, v in full.state_dict().items() if "spectral_attention" not in k})
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(full(optical, sar), without(optical, sar))
        # The block really reweights the raw channels by content, per image.
        weighted = full.sar_encoder.spectral_attention(sar)
        ratio = (weighted / sar).flatten(2)
        torch.testing.assert_close(ratio.amin(-1), ratio.amax(-1), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(weighted, sar)


def test_cloud_predictor_switch_gives_plain_global_residual():
    # without a confidence map there is nothing to refine: the default drops predictor and refinement together
    default, default_plain = _model(), _model(use_cloud_predictor=False)
    assert count_parameters(default) - count_parameters(default_plain) == \
        count_parameters(default.cloud_predictor) + count_parameters(default.confidence_refinement)
    full = _model(**net.design_switches())  # the design's network: the switch removes exactly the predictor
    plain = _model(use_cloud_predictor=False, **net.design_switches())
    assert plain.cloud_predictor is None
    assert count_parameters(full) - count_parameters(plain) == count_parameters(full.cloud_predictor)
    plain.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("cloud_predictor")})
    optical, sar = _inputs(1, 36, 32)
    with torch.no_grad():
        out_full, aux_full = full(optical, sar, return_aux=True)
        out_plain, aux_plain = plain(optical, sar, return_aux=True)
    assert aux_plain.confidence is None
    torch.testing.assert_close(aux_plain.residual, aux_full.residual, rtol=0, atol=0)
    torch.testing.assert_close(out_plain, optical + aux_plain.residual, rtol=0, atol=0)
    torch.testing.assert_close(out_full, optical + aux_full.confidence * aux_full.residual, rtol=0, atol=0)
    assert not torch.allclose(out_full, out_plain)


def test_cross_attention_switch_uses_concat_fusion():
    full = _model()
    concat = _model(use_cross_attn=False)
    assert isinstance(full.fusion, net.CrossAttentionFusion)
    assert isinstance(concat.fusion, net.ConcatFusion)
    assert count_parameters(concat) - count_parameters(concat.fusion) == \
        count_parameters(full) - count_parameters(full.fusion)
    assert count_parameters(concat.fusion) != count_parameters(full.fusion)
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        assert concat(optical, sar).shape == optical.shape


@pytest.mark.parametrize("config", [{}, {"affine_residual": False}, net.design_switches()],
                         ids=["default", "plain_head", "design"])
def test_zero_confidence_passes_the_input_through_exactly(config):
    m = _model(**config)
    # logits of -1e4: sigmoid gives exactly 0, on the design's path and through the refinement alike
    m.cloud_predictor.net.register_forward_hook(lambda module, args, out: torch.full_like(out, -1e4))
    optical, sar = _inputs(2, 33, 41)
    with torch.no_grad():
        prediction, aux = m(optical, sar, return_aux=True)
        assert aux.residual.abs().max() > 0  # the residual is there; the confidence silences it
        assert torch.equal(prediction, optical)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction_bf16 = m(optical, sar)
    assert prediction_bf16.dtype == torch.float32
    assert torch.equal(prediction_bf16, optical)  # the final addition is fp32 even under autocast


def test_bf16_autocast_on_cpu_is_finite_and_close(model):
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        reference = model(optical, sar)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(optical, sar)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 has an 8-bit mantissa: the residual is off by ~1e-3 relative; the output stays near fp32.
    assert (low - reference).abs().max() < 0.05
    m = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(optical, sar)
    out.abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_channels_last_matches_contiguous(model, attention):
    m = copy.deepcopy(model)
    m.fusion.attention = attention
    optical, sar = _inputs(1, 36, 32)
    with torch.no_grad():
        expected = m(optical, sar)
        m = m.to(memory_format=torch.channels_last)
        got = m(optical.contiguous(memory_format=torch.channels_last),
                sar.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mismatched_inputs_raise_clear_errors(model):
    optical, _ = _inputs(1, 32, 32)
    _, sar = _inputs(1, 32, 36)
    with pytest.raises(ValueError, match="same batch size and spatial size"):
        model(optical, sar)
    with pytest.raises(ValueError, match="13 optical and 2 SAR channels"):
        model(optical[:, :3], sar[..., :32])
    with pytest.raises(ValueError, match="attention must be one of"):
        CloudRemovalCrossAttention(attention="flash")


def test_create_model_rebuilds_from_config():
    m = _model(use_spectral_attention=False, attention="reference")
    rebuilt = create_model(**asdict(m.config))
    assert rebuilt.config == m.config
    rebuilt.load_state_dict(m.state_dict())  # strict: same architecture
    d = DSen2CR(feature_sizes=8, num_layers=2)
    rebuilt_d = create_model(model_name=d.model_name, **asdict(d.config))
    assert isinstance(rebuilt_d, DSen2CR) and rebuilt_d.config == d.config
    with pytest.raises(ValueError, match="unknown model_name"):
        create_model(model_name="GLF-CR")


def _dsen2cr_count(in_optical, in_sar, f, layers):
    # stem conv3x3 (in->f), `layers` blocks of two conv3x3 (f->f), head conv3x3 (f->optical); all biased.
    return (9 * (in_optical + in_sar) * f + f) + layers * 2 * (9 * f * f + f) + (9 * f * in_optical + in_optical)


def test_dsen2cr_baseline():
    small = DSen2CR(feature_sizes=16, num_layers=3)
    assert count_parameters(small) == _dsen2cr_count(13, 2, 16, 3)
    optical, sar = _inputs(1, 37, 32)
    prediction, aux = small(optical, sar, return_aux=True)
    assert prediction.shape == optical.shape and aux.confidence is None
    torch.testing.assert_close(prediction, optical + aux.residual, rtol=0, atol=0)
    prediction.mean().backward()
    assert all(p.grad is not None for p in small.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = small(optical, sar)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - prediction).abs().max() < 0.05
    # The published configuration: 16 blocks of 256 features (checked on the meta device: no memory).
    with torch.device("meta"):
        default = DSen2CR()
    assert count_parameters(default) == _dsen2cr_count(13, 2, 256, 16) == 18_947_341


def test_macs_of_a_small_known_network_by_hand():
    # DSen2CR is convolutions only, so its MACs are H*W * sum(cout * cin * k*k) and grow with the pixel count.
    m = DSen2CR(feature_sizes=8, num_layers=2)
    per_pixel = 8 * 15 * 9 + 2 * 2 * (8 * 8 * 9) + 13 * 8 * 9
    assert net.count_macs(m, size=32) == 32 * 32 * per_pixel
    assert net.count_macs(m, size=64) == 4 * net.count_macs(m, size=32)
    assert m.training  # counted in eval mode, then put back


def test_macs_count_the_fused_attention_as_the_reference_does():
    # FlopCounterMode knows no formula for the CPU's fused attention kernel: without the one count_macs adds,
    # the fused path would count 2 * tokens^2 * dim fewer MACs than the materialised softmax(QK^T)V.
    small = dict(widths=(8, 16, 32), heads=4)
    fused = net.count_macs(_model(attention="fused", **small), size=32)
    reference = net.count_macs(_model(attention="reference", **small), size=32)
    assert fused == reference
    concat = net.count_macs(_model(use_cross_attn=False, **small), size=32)
    assert fused != concat


def _capture_head(m):
    seen = {}
    m.head.register_forward_hook(lambda module, args, out: seen.update(out=out))
    return seen


def test_affine_residual_is_offset_plus_gain_times_the_input_in_fp32():
    m = _model(affine_residual=True)
    with torch.no_grad():
        m.head.weight.normal_(0, 0.05)  # untrained, the gains are 0: give them a value
    seen = _capture_head(m)
    optical, sar = _inputs(2, 33, 41)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        prediction, aux = m(optical, sar, return_aux=True)
    assert seen["out"].dtype == torch.float32  # the head runs in fp32 even under autocast
    offset, gain = seen["out"][..., :33, :41].chunk(2, dim=1)
    assert gain.abs().max() > 0
    torch.testing.assert_close(aux.residual, offset + gain * optical, rtol=0, atol=0)
    torch.testing.assert_close(prediction, optical + aux.confidence * aux.residual, rtol=0, atol=0)


def test_a_checkpoint_from_before_the_affine_residual_loads_with_the_plain_head():
    # its config has no "affine_residual" key: runtime.model_config_of fills in the field's older value (off)
    old = _model(affine_residual=False).eval()
    config = {k: v for k, v in asdict(old.config).items() if k != "affine_residual"}
    ckpt = {"model_name": "CrossAttention", "model_config": config, "model": old.state_dict(), "args": {}}
    with pytest.raises(RuntimeError, match="head.weight"):  # today's default cannot hold those weights
        net.create_model("CrossAttention", **config).load_state_dict(ckpt["model"])
    rebuilt = runtime.build_model_from_checkpoint(ckpt).eval()
    assert rebuilt.config.affine_residual is False
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(optical, sar), old(optical, sar))


def test_affine_residual_starts_as_the_plain_head():
    # zero gains at initialisation: the same offsets give the plain network's output
    affine, plain = _model(affine_residual=True), _model(affine_residual=False)
    assert count_parameters(affine) - count_parameters(plain) == 13 * (64 * 9 + 1)
    state = affine.state_dict()
    state["head.weight"], state["head.bias"] = state["head.weight"][:13], state["head.bias"][:13]
    plain.load_state_dict(state)
    optical, sar = _inputs(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(affine(optical, sar), plain(optical, sar), rtol=1e-5, atol=1e-6)


def test_every_model_returns_the_same_outputs_object():
    """model(..., return_aux=True) gives a ModelOutputs whatever the model: callers and the loss terms read its
    fields by name, and a field the model has no part for is None, not missing."""
    optical, sar = _inputs(2, 32, 32)
    members = [_model(seed, widths=(8, 16, 32), use_uncertainty_head=True) for seed in (0, 1)]
    models = {"CrossAttention": members[0], "DSen2CR": DSen2CR(feature_sizes=8, num_layers=1),
              "Ensemble": runtime.Ensemble(members)}
    with torch.no_grad():
        outputs = {name: m(optical, sar, return_aux=True)[1] for name, m in models.items()}
    assert all(type(a) is net.ModelOutputs for a in outputs.values())
    present = {name: {f for f, v in vars(a).items() if v is not None} for name, a in outputs.items()}
    assert present == {"CrossAttention": {"residual", "confidence", "corrected", "log_variance"},
                       "DSen2CR": {"residual"},
                       "Ensemble": {"confidence", "log_variance", "epistemic_variance", "members"}}
    assert outputs["Ensemble"].members == 2 and outputs["Ensemble"].epistemic_variance.shape == optical.shape
    # every output a loss term reads is a field of it
    assert {key for term in losses.LOSS_TERMS for key in term.reads} <= set(vars(outputs["DSen2CR"]))
