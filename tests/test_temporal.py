"""The time series network (net_CR_temporal.py, issue 30): shapes, what input_t = 1 leaves alone, the temporal fusion's
clear-weighted start, chunking and checkpointing over dates that leave the numbers alone, and the mosaic baseline."""
import pytest
import torch

import net_CR_CrossAttention as net
import net_CR_temporal as temporal

SMALL = dict(widths=(8, 16, 32), heads=4)


def _series(n=2, t=3, h=18, w=22, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, t, 13, h, w, generator=g), torch.rand(n, t, 2, h, w, generator=g)


def test_input_t_1_builds_todays_network_with_todays_numbers():
    torch.manual_seed(0)
    today = net.create_model("CrossAttention", **SMALL)
    torch.manual_seed(0)
    built = temporal.create_model("CrossAttention", input_t=1, **SMALL)
    assert type(built) is net.CloudRemovalCrossAttention and "input_t" not in vars(built.config)
    cloudy, sar = _series()
    assert torch.equal(today(cloudy[:, 0], sar[:, 0]), built(cloudy[:, 0], sar[:, 0]))
    assert temporal.input_t_of(built) == 1 and temporal.input_t_of(net.DSen2CR(num_layers=1, feature_sizes=8)) == 1


def test_shared_parts_start_as_the_mono_network_of_the_same_seed():
    torch.manual_seed(0)
    mono = net.create_model("CrossAttention", **SMALL).state_dict()
    torch.manual_seed(0)
    series = temporal.create_model("CrossAttention", input_t=3, **SMALL).state_dict()
    assert set(series) - set(mono) == {k for k in series if k.startswith("temporal.")}
    assert all(torch.equal(mono[k], series[k]) for k in mono)


def test_outputs_and_per_date_confidence_maps():
    torch.manual_seed(0)
    model = temporal.create_model(input_t=3, use_uncertainty_head=True, **SMALL)
    cloudy, sar = _series()
    prediction, aux = model(cloudy, sar, return_aux=True)
    assert prediction.shape == (2, 13, 18, 22) and prediction.dtype == torch.float32
    assert aux.date_confidence.shape == (2, 3, 1, 18, 22) and aux.confidence.shape == (2, 1, 18, 22)
    assert aux.corrected.shape == aux.residual.shape == aux.log_variance.shape == (2, 13, 18, 22)
    assert ((aux.date_confidence >= 0) & (aux.date_confidence <= 1)).all()
    torch.testing.assert_close(prediction, aux.corrected + aux.confidence * aux.residual)
    prediction.mean().backward()
    assert model.temporal.to_key.weight.grad is not None and model.optical_encoder.stem[0].weight.grad.abs().sum() > 0


def test_wrong_number_of_dates_or_a_single_image_is_a_clear_error():
    model = temporal.create_model(input_t=3, **SMALL)
    cloudy, sar = _series(t=2)
    with pytest.raises(ValueError, match="input_t=3"):
        model(cloudy, sar)
    with pytest.raises(ValueError, match=r"\(N,T,13,H,W\)"):
        model(cloudy[:, 0], sar[:, 0])
    with pytest.raises(ValueError, match="only the CrossAttention"):
        temporal.create_model("DSen2CR", input_t=3)


def test_the_base_is_the_clear_weighted_mean_of_the_dates():
    """Where one date's predictor says clear and the others cloudy, the base is that date and the target's
    confidence (how cloudy the base still is) is near 0; where all say cloudy it stays near 1."""
    model = temporal.create_model(input_t=3, use_confidence_refinement=False, **SMALL)
    logits = torch.tensor([10.0, -10.0, 10.0]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 2).clone()
    logits[..., 1, 1] = 10.0  # pixel (1,1): cloudy on every date
    date_confidence, weights = model._date_maps(logits, (8, 8), 8, 8)
    assert weights.shape == (1, 3, 1, 8, 8)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 1, 8, 8))
    assert weights[0, 1, 0, 0, 0] > 0.999  # the clear date, far from the cloudy corner
    confidence = model._target_confidence(date_confidence, weights, None, 8, 8)
    assert confidence[0, 0, 0, 0] < 0.01 and confidence[0, 0, -1, -1] > 0.99


def test_an_untrained_date_attention_weighs_dates_by_their_clearness():
    attention = temporal.DateAttention(dim=32, heads=4)
    features = torch.randn(2, 3, 32, 4, 4)
    clear_log = torch.nn.functional.logsigmoid(-torch.randn(2, 3, 1, 4, 4))
    _, weights = attention(features, clear_log)
    expected = clear_log.softmax(dim=1).expand(-1, -1, 4, -1, -1)
    torch.testing.assert_close(weights, expected)


def test_the_network_treats_its_dates_as_a_set():
    """No date embedding: the order of the dates does not change the prediction (content, not position, decides)."""
    torch.manual_seed(0)
    model = temporal.create_model(input_t=3, **SMALL).eval()
    cloudy, sar = _series()
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(cloudy, sar), model(cloudy[:, order], sar[:, order]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2])
def test_chunks_and_checkpointing_over_dates_leave_the_numbers_alone(chunk):
    cloudy, sar = _series()
    results = []
    for date_chunk in (1, chunk):  # 1: one date a pass, recomputed in backward; 0: all at once, kept
        torch.manual_seed(0)
        model = temporal.create_model(input_t=3, date_chunk=date_chunk, **SMALL)
        prediction = model(cloudy, sar)
        prediction.square().mean().backward()
        results.append((prediction.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_config_round_trips_through_a_checkpoint_dict():
    from dataclasses import asdict
    model = temporal.create_model(input_t=4, date_chunk=2, use_sar_skips=False, **SMALL)
    rebuilt = temporal.create_model("CrossAttention", **asdict(model.config))
    assert rebuilt.config == model.config and rebuilt.input_t == 4
    rebuilt.load_state_dict(model.state_dict())


def test_count_macs_counts_every_date():
    """Each extra date costs the same (its encoders and fusion, its share of the attention), the decoder runs once."""
    one = net.count_macs(net.create_model(**SMALL), 64)
    two, three, four = (net.count_macs(temporal.create_model(input_t=t, **SMALL), 64) for t in (2, 3, 4))
    assert four - three == three - two and 0.5 * one < three - two < one < two


def test_mosaic_takes_each_pixel_from_its_least_cloudy_date():
    cloudy = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(1, 3, 13, 2, 2).clone()
    score = torch.tensor([[0.9, 0.1], [0.5, 0.5]]).view(1, 1, 1, 2, 2).repeat(1, 3, 1, 1, 1)
    score[0, 1, 0, 0, 0], score[0, 2, 0, 0, 1] = 0.2, 0.05  # date 1 best at (0,0), date 2 at (0,1); ties at row 1
    out = temporal.mosaic(cloudy, score)
    assert out.shape == (1, 13, 2, 2)
    assert out[0, 0].tolist() == [[1.0, 2.0], [0.0, 0.0]]  # equal scores: the earliest date
    with pytest.raises(ValueError, match="mosaic takes"):
        temporal.mosaic(cloudy, score[:, :2])


def test_each_dates_map_is_supervised_by_default_for_several_dates_only():
    import losses
    series = temporal.create_model(input_t=3, **SMALL)
    assert losses.resolve({}, series.config).weights["date_confidence"] == 0.5
    assert losses.resolve({}, net.ModelConfig()).weights["date_confidence"] == 0.0
    alone = {f"{name}_weight": 0.0 for name in ("l1", "perceptual", "confidence", "residual")}  # the dates' term only
    criterion = losses.CRLoss(losses.resolve(alone, series.config))
    assert list(criterion.weights) == ["date_confidence"]
    cloudy, sar = _series()
    prediction, aux = series(cloudy, sar, return_aux=True)
    labels = (cloudy[:, :, :1] > 0.5).float()
    total, _ = criterion(prediction, cloudy[:, 0], aux.corrected.detach(), aux=aux, date_confidence_target=labels)
    total.backward()
    assert series.cloud_predictor.net[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="date_confidence_target"):
        criterion(prediction, cloudy[:, 0], aux.corrected.detach(), aux=aux)
