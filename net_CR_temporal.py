"""Several cloudy dates in, one clear image out: the time series form of the CrossAttention network (issue 30).

    cloudy (N,T,13,H,W), sar (N,T,2,H,W) -> prediction (N,13,H,W), ModelOutputs with date_confidence (N,T,1,H,W)

Every date goes through the mono-temporal network's own encoders, gated SAR fusion and refinement
(CloudRemovalCrossAttention.encode, weights shared across dates, dates in chunks of `date_chunk`, recomputed in the
backward pass when training so a date's encoder activations are not kept). Then, per pixel of the 1/4-resolution
bottleneck:

    logit_t    = CloudConfidencePredictor(refined_t)                  each date's cloud confidence (logits)
    score_t,h  = q_h . k_h(refined_t) / sqrt(d) + a_h * log(1 - c_t)  L-TAE's master query per head (Garnot &
                                                                      Landrieu 2020, as UnCRtainTS uses it), plus
                                                                      the date's log clearness
    weight_t,h = softmax over dates of score_t,h
    temporal   = sum_t weight_t,h * refined_t (head h's channels), then a 1x1 projection, added to the clear-weighted
                 mean of refined_t

The query starts at zero and a_h at one, so an untrained fusion takes each pixel from its dates in proportion to
their clearness (1 - c_t). The skips o2/s2 and o1/s1 are combined over dates with the heads' mean weights upsampled
to their resolution. The output stays cloud-aware:

    base       = sum_t w_t * cloudy_t,  w_t = (1 - c_t) / sum_s (1 - c_s)    the clear-weighted mean of the dates
    confidence = sum_t w_t * c_t (how cloudy that base still is), refined at full resolution as in the mono network
    prediction = base + confidence * residual                              (compose, in fp32)

A pixel clear on one date gets w ~ 1 on it, so base is that date and confidence ~ 0; a pixel cloudy on every date
keeps confidence ~ 1 and takes its content from the decoder's residual. `mosaic(cloudy, cloud_score)` is the baseline
anyone tries first: per pixel the date the cloud detector scores least cloudy. create_model builds the mono network
for input_t = 1 (net_CR_CrossAttention.create_model, unchanged) and this one above.
"""
import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import net_CR_CrossAttention as net

KEY_DIM = 16  # L-TAE's key size per head (UnCRtainTS: d_k = 4 with 16 heads; 16 here, with 8 heads of 32 channels)
CLEAR_EPS = 1e-4  # keeps a date's weight finite where the predictor says "certainly cloudy" on every date


@dataclass
class TemporalConfig(net.ModelConfig):
    """ModelConfig plus the number of input dates (stored in a checkpoint's model_config, so evaluation reads it) and
    how many dates are encoded in one pass (a memory setting: it does not change the numbers)."""
    input_t: int = 3
    date_chunk: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.input_t < 2:
            raise ValueError(f"a time series network needs input_t >= 2, got {self.input_t} "
                             f"(input_t 1 is net_CR_CrossAttention.CloudRemovalCrossAttention)")
        if self.date_chunk < 0:
            raise ValueError(f"date_chunk must be >= 0 (0: all dates in one pass), got {self.date_chunk}")


class DateAttention(nn.Module):
    """Per-pixel attention over dates with one learned query per head (L-TAE), biased by each date's log clearness.

    forward(features (N,T,C,h,w), clear_log (N,T,1,h,w)) -> (fused (N,C,h,w), weights (N,T,heads,h,w))."""

    def __init__(self, dim=256, heads=8, key_dim=KEY_DIM):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.key_dim = heads, key_dim
        self.norm = nn.LayerNorm(dim)
        self.to_key = nn.Linear(dim, heads * key_dim)
        self.query = nn.Parameter(torch.zeros(heads, key_dim))  # zero: an untrained fusion weighs dates by clearness
        self.clear_scale = nn.Parameter(torch.ones(heads))
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, features, clear_log):
        n, t, c, h, w = features.shape
        tokens = features.permute(0, 3, 4, 1, 2)  # (N,h,w,T,C)
        keys = self.to_key(self.norm(tokens)).view(n, h, w, t, self.heads, self.key_dim)
        scores = (keys * self.query).sum(-1) / math.sqrt(self.key_dim)  # (N,h,w,T,heads)
        scores = scores + self.clear_scale * clear_log.permute(0, 3, 4, 1, 2).to(scores.dtype)
        weights = scores.float().softmax(dim=3).to(tokens.dtype)
        values = tokens.view(n, h, w, t, self.heads, c // self.heads)
        fused = (weights.unsqueeze(-1) * values).sum(dim=3).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return self.proj(fused.contiguous()), weights.permute(0, 3, 4, 1, 2)


def _over_dates(x, weights):
    """sum_t weights_t * x_t: x (N,T,C,H,W), weights (N,T,1,h,w) resized to H,W (bilinear keeps their sum at 1)."""
    if weights.shape[-2:] != x.shape[-2:]:
        n, t = weights.shape[:2]
        weights = F.interpolate(weights.flatten(0, 1), size=x.shape[-2:], mode="bilinear",
                                align_corners=False).view(n, t, 1, *x.shape[-2:])
    return (weights.to(x.dtype) * x).sum(dim=1)


class TemporalCloudRemoval(net.CloudRemovalCrossAttention):
    """The CrossAttention network over input_t dates (module docstring); its parameters are the mono network's (same
    names) plus `temporal` (DateAttention)."""

    # A context manager factory entered around each recomputation of a checkpointed date chunk (None: nothing). The
    # backward pass runs outside the caller's torch function modes, so sizing.py's CUDA autocast emulation sets it
    # to hold there too.
    recompute_context = None

    def __init__(self, config=None, **overrides):
        config = TemporalConfig(**{**(asdict(config) if config is not None else {}), **overrides})
        mono = {k: v for k, v in asdict(config).items() if k not in ("input_t", "date_chunk")}
        super().__init__(net.ModelConfig(**mono))
        self.config, self.input_t = config, config.input_t
        with torch.random.fork_rng(devices=[]):  # the shared parts draw the numbers a mono network of this seed draws
            self.temporal = DateAttention(config.widths[2], config.heads)

    def _encode_dates(self, optical, sar):
        """Each date through encode, `date_chunk` dates per pass; when training, a pass is recomputed in backward
        (activation checkpointing) instead of keeping its encoder activations."""
        n, t = optical.shape[:2]
        chunk = self.config.date_chunk or t
        parts = []
        for start in range(0, t, chunk):
            o, s = (x[:, start:start + chunk].flatten(0, 1) for x in (optical, sar))
            if self.training and torch.is_grad_enabled() and self.config.date_chunk:
                extra = {} if self.recompute_context is None else {
                    "context_fn": lambda: (contextlib.nullcontext(), self.recompute_context())}
                parts.append(checkpoint(self.encode, o, s, use_reentrant=False, **extra))
            else:
                parts.append(self.encode(o, s))

        def stack(get):  # (N*k, ...) per chunk -> (N, T, ...)
            return torch.cat([get(p).view(n, -1, *get(p).shape[1:]) for p in parts], dim=1)
        refined = stack(lambda p: p[0])
        skips2 = tuple(stack(lambda p, i=i: p[1][i]) for i in range(len(parts[0][1])))
        skips1 = tuple(stack(lambda p, i=i: p[2][i]) for i in range(len(parts[0][2])))
        return refined, skips2, skips1

    def forward(self, optical, sar, return_aux=False):
        """optical (N,T,13,H,W), sar (N,T,2,H,W), T = input_t, dates in time order -> prediction (N,13,H,W) float32;
        with return_aux=True (prediction, ModelOutputs) with date_confidence (N,T,1,H,W) besides the mono fields."""
        _check_series(optical, sar, self.input_t, self.in_optical, self.in_sar)
        if self.sar_input == "zeros":
            sar = torch.zeros_like(sar)
        n, t, _, h, w = optical.shape
        optical_p = _pad_dates(optical, self.DOWNSAMPLE)
        refined, skips2, skips1 = self._encode_dates(optical_p, _pad_dates(sar, self.DOWNSAMPLE))
        if self.cloud_predictor is not None:  # (N,T,1,h/4,w/4)
            date_logits = self.cloud_predictor.logits(refined.flatten(0, 1)).view(n, t, 1, *refined.shape[-2:])
        else:  # no confidence: every date counts alike
            date_logits = torch.full_like(refined[:, :, :1], -math.inf)
        clear_log = F.logsigmoid(-date_logits.float())
        clear = clear_log.softmax(dim=1)  # (1 - c_t) / sum_s (1 - c_s)
        attended, weights = self.temporal(refined, clear_log)
        bottleneck = _over_dates(refined, clear) + attended
        date_weights = weights.float().mean(dim=2, keepdim=True)  # the heads' mean, for the skips
        date_confidence, base_weights = self._date_maps(date_logits, optical_p.shape[-2:], h, w)
        base = (base_weights * optical.float()).sum(dim=1)  # an affine residual scales this base
        x, residual = self.decode(bottleneck, tuple(_over_dates(s, date_weights) for s in skips2),
                                  tuple(_over_dates(s, date_weights) for s in skips1), base, h, w)
        log_variance = None
        if return_aux and self.uncertainty_head is not None:
            log_variance = self.uncertainty_head(x.detach())[..., :h, :w]
        confidence = None
        if self.cloud_predictor is not None:
            confidence = self._target_confidence(date_confidence, base_weights, x, h, w)
        correction = None if self.date_correction is None else self.date_correction(bottleneck)
        prediction, base, residual, confidence = net.compose(base, residual, confidence, correction)
        if return_aux:
            return prediction, net.ModelOutputs(residual=residual, confidence=confidence, corrected=base,
                                                log_variance=log_variance,
                                                date_confidence=None if self.cloud_predictor is None else
                                                date_confidence)
        return prediction

    def _date_maps(self, date_logits, full, h, w):
        """(each date's confidence (N,T,1,h,w), the base's weights (N,T,1,h,w)) in fp32 at full resolution."""
        n, t = date_logits.shape[:2]
        logits = date_logits.float()
        if self.cloud_predictor is not None:
            logits = F.interpolate(logits.flatten(0, 1), size=full, mode="bilinear",
                                   align_corners=False).view(n, t, 1, *full)[..., :h, :w]
        else:  # no predictor: uniform weights, no confidence
            logits = logits.new_full((n, t, 1, h, w), -math.inf)
        confidence = torch.sigmoid(logits)
        return confidence, F.logsigmoid(-logits).softmax(dim=1)

    def _target_confidence(self, date_confidence, base_weights, x, h, w):
        """How cloudy the base still is, sum_t w_t c_t, sharpened by the mono network's full-resolution refinement
        (added in logits) where it has one. detach_confidence_input detaches the refinement's input only: the dates'
        own maps steer the fusion and the base, so they stay on the path the reconstruction trains."""
        cloudy_left = (base_weights * date_confidence).sum(dim=1).clamp(CLEAR_EPS, 1 - CLEAR_EPS)
        if self.confidence_refinement is None:
            return cloudy_left
        decoded = x.detach() if self.config.detach_confidence_input else x
        correction = self.confidence_refinement(decoded)[..., :h, :w].float()
        return torch.sigmoid(torch.logit(cloudy_left) + correction)


def _check_series(optical, sar, input_t, in_optical, in_sar):
    if optical.dim() != 5 or sar.dim() != 5:
        raise ValueError(f"a time series network takes cloudy (N,T,{in_optical},H,W) and sar (N,T,{in_sar},H,W), got "
                         f"shapes {tuple(optical.shape)} and {tuple(sar.shape)}")
    if optical.shape[1] != input_t or sar.shape[1] != input_t:
        raise ValueError(f"the network was built for input_t={input_t} dates, got {optical.shape[1]} cloudy and "
                         f"{sar.shape[1]} SAR dates")
    net._check_inputs(optical[:, 0], sar[:, 0], in_optical, in_sar)


def _pad_dates(x, multiple):
    """net_CR_CrossAttention's padding of every date of (N,T,C,H,W)."""
    padded = net._pad_to_multiple(x.flatten(0, 1), multiple)
    return padded.view(*x.shape[:2], *padded.shape[1:])


def mosaic(cloudy, cloud_score):
    """The per-pixel least-cloudy-date baseline: cloudy (N,T,13,H,W), the detector's score (N,T,1,H,W) -> (N,13,H,W),
    each pixel from the date the detector scores lowest there (the earliest of equal scores)."""
    if cloudy.dim() != 5 or cloud_score.shape != (*cloudy.shape[:2], 1, *cloudy.shape[-2:]):
        raise ValueError(f"mosaic takes cloudy (N,T,C,H,W) and cloud_score (N,T,1,H,W), got {tuple(cloudy.shape)} "
                         f"and {tuple(cloud_score.shape)}")
    best = cloud_score.argmin(dim=1, keepdim=True)  # argmin returns the first of equal minima
    return cloudy.gather(1, best.expand(-1, -1, cloudy.shape[2], -1, -1)).squeeze(1)


def target_cloud_mask(date_scores):
    """The target's cloud mask from the dates' cloud scores (N,T,1,H,W) -> (N,1,H,W): the score of the clearest date
    (min over dates; for binary masks: cloudy on every date). A pixel clear on any date can be taken from that date,
    as a clear pixel of a single date is passed through; the pixels the network must rebuild, which the cloud-focused
    loss weighs, the confidence map is taught to mark and the "cloudy pixels" metrics score, are those no date shows."""
    return date_scores.amin(dim=1)


def loss_reference(cloudy, aux):
    """The cloudy image the loss compares with (a contrastive negative; the cloud map where none is given): the input
    itself, or for several dates (N,T,13,H,W) the network's base, their clear-weighted mean (detached)."""
    return cloudy if cloudy.dim() == 4 else aux.corrected.detach()


def input_t_of(model):
    """The number of cloudy dates a model takes (1 for the mono-temporal networks)."""
    return getattr(model, "input_t", 1)


def create_model(model_name="CrossAttention", input_t=1, **config):
    """net_CR_CrossAttention.create_model for input_t = 1 (today's networks, unchanged); the time series network for
    input_t > 1 (CrossAttention only). A checkpoint's model_config holds input_t only where it is > 1."""
    if input_t == 1:
        return net.create_model(model_name, **config)
    if model_name != "CrossAttention":
        raise ValueError(f"input_t={input_t}: only the CrossAttention network takes several dates, not {model_name!r}")
    return TemporalCloudRemoval(input_t=input_t, **config)
