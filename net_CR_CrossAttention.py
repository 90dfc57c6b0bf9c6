"""GLF-CR Enhanced v3: SAR-optical cloud removal with cross-attention fusion and cloud-aware residual.

    python net_CR_CrossAttention.py      # smoke test: parameter count, MACs, shapes, forward/backward time
    python net_CR_CrossAttention.py --device cpu

The network (design document "GLF-CR Enhanced Architecture v3.0"):

    cloudy (N,13,H,W) --OpticalEncoder--> o1 (64, H)   o2 (128, H/2)   o3 (256, H/4)
    sar    (N, 2,H,W) --SAREncoder------> s1           s2              s3
                        (SpectralAttentionSAR on VV/VH first)
    fused   = CrossAttentionFusion(queries=o3, keys/values=s3)        pre-norm transformer block + 1x1
    gated   = fused * SpeckleAwareGate(o3, s3)                         spatial x channel sigmoid gates
    refined = Refinement(gated, o3)
    residual   = Decoder(refined, skips o2+s2, o1+s1)                  13 bands, full resolution: a per-pixel
                 offset + gain * cloudy (affine_residual) or the head's output alone
    confidence = CloudConfidencePredictor(refined) upsampled to H,W    0 clear ... 1 cloudy
    output  = cloudy + confidence * residual                           added in fp32

Also the field's baseline DSen2CR (Meraner et al., ISPRS 2020) with the same forward signature, and create_model
building either from a checkpoint's stored config. Imports nothing of the project (torch only).
"""
import argparse
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "SpectralAttentionSAR", "ResBlock", "OpticalEncoder", "SAREncoder", "CrossAttentionFusion", "SpeckleAwareGate",
    "CloudConfidencePredictor", "UncertaintyHead", "CloudRemovalCrossAttention", "DSen2CR", "create_model",
    "MODELS", "SAR_INPUTS", "ModelConfig", "DSen2CRConfig", "ModelOutputs", "count_macs"]

GN_GROUPS = 8
ATTENTION_PATHS = ("fused", "reference")
SAR_INPUTS = ("on", "zeros")  # "zeros": the radar ablation, an all-zero SAR image whatever the data holds
SAR_ABSENT = ("token", "skip")  # how a network trained with sar_dropout is told a sample has no radar
# The uncertainty head's log-variance is clamped to these: a standard deviation from one step of the products' uint16
# x10000 grid (1e-4 reflectance) to the whole reflectance range (1).
LOG_VARIANCE_MIN, LOG_VARIANCE_MAX = 2 * math.log(1e-4), 0.0
# An untrained head's std everywhere: about the cloudy input's own RMSE (26.8 dB PSNR, i.e. 0.046, on the synthetic
# test split of BENCHMARKS.md), so the first steps neither explode nor vanish in the NLL.
UNCERTAINTY_INIT_STD = 0.05


def _switch(default, help, older=None):
    """A field of ModelConfig that is also a training flag. `older`: the value that rebuilds a checkpoint written
    before the field existed (its stored config lacks the key); None for the design's own switches."""
    return field(default=default, metadata={"help": help, "older": older})


@dataclass
class ModelConfig:
    """The CrossAttention network's switches and sizes: the network is built from it, a checkpoint stores it (as a
    dict, "model_config"), and the training script's model flags are made from its fields that carry a help text.
    A new switch is one field here plus its use in the network."""
    use_cross_attn: bool = _switch(True, "fuse SAR into optical features with transformer cross-attention "
                                         "(--no-use_cross_attn: concatenation + convolution)")
    use_spectral_attention: bool = _switch(True, "channel attention over VV/VH at the SAR encoder input")
    use_cloud_predictor: bool = _switch(True, "weight the residual by a predicted cloud confidence map "
                                              "(--no-use_cloud_predictor: output = cloudy + residual)")
    use_date_correction: bool = _switch(
        False, "a per-image, per-band gain and offset applied to every pixel (the two dates' radiometric change), "
               "so the confidence map only marks clouds: output = corrected + confidence * residual", older=False)
    use_sar_skips: bool = _switch(True, "feed the SAR encoder's full- and half-resolution features to the decoder "
                                        "too", older=False)
    use_confidence_refinement: bool = _switch(True, "sharpen the cloud confidence map at full resolution from the "
                                                    "decoder's features (needs the cloud predictor)", older=False)
    detach_confidence_input: bool = _switch(
        False, "the confidence head reads detached features: --confidence_weight trains the head only, not the "
               "shared encoders and decoder", older=False)
    affine_residual: bool = _switch(
        True, "the decoder's head predicts a per-pixel, per-band offset and gain, residual = offset + gain * cloudy "
              "(in fp32): under a cloud the clear image is affine in the cloudy one (docs/model.md), so the head "
              "scales and shifts the input's detail (--no-affine_residual: residual = head output)", older=False)
    use_uncertainty_head: bool = _switch(
        False, "predict a per-pixel, per-band log-variance of the prediction (aux.log_variance), trained by the "
               "NLL term (--nll_weight); it reads detached features, so the prediction is the same with it or "
               "without", older=False)
    attention: str = field(default="fused", metadata={
        "choices": ATTENTION_PATHS,
        "help": "attention kernel: fused scaled_dot_product_attention, or the explicit reference (same function)"})
    sar_input: str = field(default="on", metadata={
        "choices": SAR_INPUTS, "older": "args",  # older checkpoints kept it in the training args only
        "help": "'zeros' feeds an all-zero SAR image (ablation: does the model use the radar?); stored in the "
                "model's config, so evaluation feeds what training fed"})
    sar_dropout: float = _switch(
        0.0, "share of training samples (drawn per sample from torch's generator) trained without radar, the "
             "network told so (--sar_absent): one checkpoint then predicts with radar and without", older=0.0)
    sar_absent: str = field(default="token", metadata={"choices": SAR_ABSENT, "older": "token", "help": (
        "with --sar_dropout, what stands for a sample's missing radar: 'token' learned SAR features at each level "
        "(448 parameters), 'skip' no fusion and zero SAR skips")})
    # sizes: not flags
    in_optical: int = 13
    in_sar: int = 2
    widths: tuple = (64, 128, 256)
    encoder_blocks: tuple = (1, 1, 1)
    decoder_blocks: tuple = (0, 0)
    heads: int = 8
    ffn_ratio: float = 2.0

    def __post_init__(self):
        self.widths, self.encoder_blocks = tuple(self.widths), tuple(self.encoder_blocks)
        self.decoder_blocks = tuple(self.decoder_blocks)
        if len(self.widths) != 3 or len(self.encoder_blocks) != 3 or len(self.decoder_blocks) != 2:
            raise ValueError("widths and encoder_blocks need 3 entries (levels), decoder_blocks 2")
        for f in fields(self):  # the switches with a set of values: attention, sar_input, sar_absent
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {getattr(self, f.name)!r}")
        if not 0.0 <= self.sar_dropout <= 1.0:
            raise ValueError(f"sar_dropout must lie in [0, 1], got {self.sar_dropout!r}")
        # a refinement of the confidence map needs a map: without the cloud predictor it is recorded as off
        self.use_confidence_refinement = self.use_confidence_refinement and self.use_cloud_predictor


def flag_fields():
    """ModelConfig's fields that are training flags (those with a help text)."""
    return [f for f in fields(ModelConfig) if "help" in f.metadata]


def design_switches():
    """{switch: value} that turns the default network into the design document's: every switch added since at the
    value that checkpoints written before it were built with."""
    return {f.name: f.metadata.get("older") for f in flag_fields() if isinstance(f.metadata.get("older"), bool)}


def _gn(channels):
    return nn.GroupNorm(min(GN_GROUPS, channels), channels)


def _check_inputs(optical, sar, in_optical, in_sar):
    """The SAR image to use (zeros for sar=None: no radar) once the shapes are checked."""
    if sar is None:
        sar = optical.new_zeros(optical.shape[0], in_sar, *optical.shape[2:])
    if optical.dim() != 4 or sar.dim() != 4 or optical.shape[1] != in_optical or sar.shape[1] != in_sar:
        raise ValueError(f"expected (N,C,H,W) tensors with {in_optical} optical and {in_sar} SAR channels, got "
                         f"optical {tuple(optical.shape)} and sar {tuple(sar.shape)}")
    if optical.shape[0] != sar.shape[0] or optical.shape[2:] != sar.shape[2:]:
        raise ValueError(f"optical and SAR must have the same batch size and spatial size, got optical "
                         f"{tuple(optical.shape)} and sar {tuple(sar.shape)}")
    return sar


class SpectralAttentionSAR(nn.Module):
    """Squeeze-and-excitation over the raw SAR channels (VV, VH): weights VV against VH by content. Mean and max of
    each channel go through one shared 2->hidden->2 MLP (as in CBAM: speckle makes the mean alone a weak summary of
    a radar scene); weights 2*sigmoid, so an untrained block is the identity. 82 parameters with hidden=16."""

    def __init__(self, channels=2, hidden=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, sar):
        avg = sar.mean(dim=(2, 3), keepdim=True)
        mx = sar.amax(dim=(2, 3), keepdim=True)
        weights = 2.0 * torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        return sar * weights


class ResBlock(nn.Module):
    """conv3x3-GN-SiLU-conv3x3-GN plus identity, then SiLU."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels), nn.SiLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


def _conv_gn_act(cin, cout, kernel=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
                         _gn(cout), nn.SiLU(inplace=True))


class _Encoder(nn.Module):
    """Three levels (full, 1/2, 1/4 resolution) of residual blocks; strided 3x3 convs downsample."""

    def __init__(self, in_channels, widths=(64, 128, 256), blocks=(1, 1, 1)):
        super().__init__()
        self.stem = _conv_gn_act(in_channels, widths[0])
        self.levels = nn.ModuleList()
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = [] if i == 0 else [_conv_gn_act(widths[i - 1], width, stride=2)]
            layers += [ResBlock(width) for _ in range(n)]
            self.levels.append(nn.Sequential(*layers))

    def forward(self, x):
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class OpticalEncoder(_Encoder):
    """Encoder of the 13-band cloudy image."""


class SAREncoder(_Encoder):
    """Encoder of the VV/VH image; SpectralAttentionSAR reweights the raw channels before the stem."""

    def __init__(self, in_channels=2, widths=(64, 128, 256), blocks=(1, 1, 1), use_spectral_attention=True):
        super().__init__(in_channels, widths, blocks)
        self.spectral_attention = SpectralAttentionSAR(in_channels) if use_spectral_attention else None

    def forward(self, sar):
        if self.spectral_attention is not None:
            sar = self.spectral_attention(sar)
        return super().forward(sar)


class CrossAttentionFusion(nn.Module):
    """Pre-norm transformer block: optical tokens attend to SAR tokens, then an FFN, then a 1x1 projection.
    attention="fused" calls F.scaled_dot_product_attention (flash / memory-efficient kernels never store the tokens x
    tokens matrix: 4096 tokens per 256 px image at 1/4 resolution); "reference" materialises softmax(QK^T/sqrt(d))V,
    so a test can prove the two agree and the benchmark show what the fused kernel saves."""

    def __init__(self, dim=256, heads=8, ffn_ratio=2.0, attention="fused"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        self.heads, self.attention = heads, attention
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        hidden = int(dim * ffn_ratio)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, q, k, v):
        if self.attention == "fused":
            return F.scaled_dot_product_attention(q, k, v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(scores.softmax(dim=-1), v)

    def forward(self, optical, sar):
        n, c, h, w = optical.shape
        # (N,C,H,W) -> (N,L,C); a free view when the features are channels_last.
        q_tokens = optical.flatten(2).transpose(1, 2)
        kv_tokens = sar.flatten(2).transpose(1, 2)
        heads, d = self.heads, c // self.heads
        q = self.to_q(self.norm_q(q_tokens)).view(n, -1, heads, d).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(kv_tokens)).view(n, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        attended = self._attend(q, k, v).transpose(1, 2).reshape(n, -1, c)
        x = q_tokens + self.out(attended)
        x = x + self.ffn(self.norm_ffn(x))
        x = x.transpose(1, 2).reshape(n, c, h, w)
        return self.proj(x)


class ConcatFusion(nn.Module):
    """Ablation of CrossAttentionFusion (use_cross_attn=False): concatenate, 3x3 conv, 1x1 projection."""

    def __init__(self, dim=256):
        super().__init__()
        self.conv = _conv_gn_act(2 * dim, dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, optical, sar):
        return self.proj(self.conv(torch.cat([optical, sar], dim=1)))


class SpeckleAwareGate(nn.Module):
    """Optical-guided speckle-aware gate: sigmoid(spatial map) x sigmoid(channel vector) from [optical, SAR]. The
    spatial gate smooths over 3x3 so single speckle-bright pixels cannot open it; the channel gate pools globally.
    Both see the optical features, which say where the radar is needed."""

    def __init__(self, dim=256, spatial_hidden=32, channel_hidden=32):
        super().__init__()
        self.spatial = nn.Sequential(nn.Conv2d(2 * dim, spatial_hidden, 1), nn.SiLU(inplace=True),
                                     nn.Conv2d(spatial_hidden, 1, 3, padding=1))
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * dim, channel_hidden, 1),
                                     nn.SiLU(inplace=True), nn.Conv2d(channel_hidden, dim, 1))

    def forward(self, optical, sar):
        both = torch.cat([optical, sar], dim=1)
        return torch.sigmoid(self.spatial(both)) * torch.sigmoid(self.channel(both))


class Refinement(nn.Module):
    """Joins the gated fused features with the optical bottleneck: 1x1 (2C->C), then a residual 3x3."""

    def __init__(self, dim=256):
        super().__init__()
        self.reduce = _conv_gn_act(2 * dim, dim, kernel=1)
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), _gn(dim))
        self.act = nn.SiLU(inplace=True)

    def forward(self, fused, optical):
        x = self.reduce(torch.cat([fused, optical], dim=1))
        return self.act(x + self.conv(x))


class _UpStage(nn.Module):
    """x2 bilinear upsampling, 1x1 channel reduction, concatenation with the encoder skip(s), 3x3 conv."""

    def __init__(self, cin, cout, blocks=0, skips=1):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cout, 1)
        self.merge = _conv_gn_act((1 + skips) * cout, cout)
        self.blocks = nn.Sequential(*[ResBlock(cout) for _ in range(blocks)])

    def forward(self, x, *skips):
        x = F.interpolate(x, size=skips[0].shape[-2:], mode="bilinear", align_corners=False)
        x = self.merge(torch.cat([self.reduce(x), *skips], dim=1))
        return self.blocks(x)


class DateCorrection(nn.Module):
    """A per-image, per-band radiometric correction applied to every pixel: corrected = gain * cloudy + offset.
    The two images of a pair are two dates, so even clear pixels differ (sun, atmosphere, phenology); this term
    carries that change, so the confidence map only has to say where clouds are. gain = 1 + 0.1 tanh(.), offset =
    0.05 tanh(.), from the pooled refined features; zero-initialised: an untrained network starts at the identity."""

    def __init__(self, dim=256, bands=13, hidden=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, hidden, 1), nn.SiLU(inplace=True),
                                 nn.Conv2d(hidden, 2 * bands, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, refined):
        gain, offset = self.mlp(refined).float().chunk(2, dim=1)  # (N,13,1,1) each
        return 1.0 + 0.1 * torch.tanh(gain), 0.05 * torch.tanh(offset)


class CloudConfidencePredictor(nn.Module):
    """From the refined bottleneck, a 1-channel sigmoid map: 0 clear (pass the input through), 1 cloudy.
    369,281 parameters (the design's ~0.37M): 3x3 256->128, 3x3 128->64, 1x1 64->1."""

    def __init__(self, dim=256):
        super().__init__()
        self.net = nn.Sequential(_conv_gn_act(dim, dim // 2), _conv_gn_act(dim // 2, dim // 4),
                                 nn.Conv2d(dim // 4, 1, 1))

    def logits(self, refined):
        return self.net(refined)

    def forward(self, refined):
        return torch.sigmoid(self.logits(refined))


class ConfidenceRefinement(nn.Module):
    """A full-resolution correction of the confidence logit from the decoder's features (64 channels at H x W).
    The CloudConfidencePredictor sees the 1/4-resolution bottleneck, so its upsampled map blurs cloud edges over
    4-8 px, gating the residual off inside the cloud and on in the clear near an edge. confidence =
    sigmoid(upsampled predictor logits + refinement); zero-initialised: an untrained one gives the predictor's map."""

    def __init__(self, channels=64, hidden=32):
        super().__init__()
        self.net = nn.Sequential(_conv_gn_act(channels, hidden), nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, decoder_features):
        return self.net(decoder_features)


class UncertaintyHead(nn.Module):
    """Per-pixel, per-band log-variance of the prediction (the aleatoric part of its uncertainty), from the decoder's
    full-resolution features (64 channels at H x W), clamped to [LOG_VARIANCE_MIN, LOG_VARIANCE_MAX]. The model
    passes it detached features, and losses.nll_loss detaches the prediction: the head learns from the NLL term alone
    and the reconstruction is trained as without it (the NLL's 1/variance weighting of the error would otherwise
    turn the mean's training away from the pixels it finds hard, i.e. from clouds: Seitzer et al., ICLR 2022). In
    float32 with autocast off: exp(-log_variance) reaches e^18, beyond fp16's range, and bf16 resolves a log-variance
    near -15 only in steps of 0.0625 (6 % of the variance). The last layer starts at zero weights and a bias of
    log(UNCERTAINTY_INIT_STD^2): an untrained head predicts that std everywhere."""

    def __init__(self, channels=64, bands=13, hidden=32):
        super().__init__()
        self.net = nn.Sequential(_conv_gn_act(channels, hidden), nn.Conv2d(hidden, bands, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, 2 * math.log(UNCERTAINTY_INIT_STD))

    def forward(self, features):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.net(features.float()).clamp(LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)


def _pad_to_multiple(x, multiple):
    """Pad bottom/right so H and W are multiples of `multiple`; reflect where the size allows it."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < size: tiny inputs replicate
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@dataclass(frozen=True)
class ModelOutputs:
    """What model(cloudy, sar, return_aux=True) returns beside the prediction, the same for every model (None: none)."""
    residual: torch.Tensor | None = None  # (N,13,H,W) fp32: what the network adds to the (corrected) cloudy image
    confidence: torch.Tensor | None = None  # (N,1,H,W) fp32, 0 clear ... 1 cloudy: where the residual is applied
    corrected: torch.Tensor | None = None  # (N,13,H,W) fp32: the cloudy image the residual is added to (CrossAttention)
    log_variance: torch.Tensor | None = None  # (N,13,H,W) fp32: the uncertainty head's per-band log-variance
    epistemic_variance: torch.Tensor | None = None  # (N,13,H,W) fp32: an ensemble's spread of its members' predictions
    members: int | None = None  # an ensemble's number of members
    date_confidence: torch.Tensor | None = None  # (N,T,1,H,W) fp32: a time series model's confidence of each date


class CloudRemovalCrossAttention(nn.Module):
    """The whole GLF-CR Enhanced v3 network; see the module docstring for the data flow. Built from a ModelConfig
    (keyword overrides allowed: CloudRemovalCrossAttention(use_sar_skips=False)), kept as .config; its fields say what
    each switch does. create_model("CrossAttention", **asdict(model.config)) rebuilds the same network."""

    model_name = "CrossAttention"
    DOWNSAMPLE = 4  # two stride-2 stages: inputs are padded to a multiple of this

    def __init__(self, config=None, **overrides):
        super().__init__()
        c = replace(config or ModelConfig(), **overrides)  # replace() re-runs ModelConfig's checks
        self.config = c
        in_optical, in_sar, widths, encoder_blocks = c.in_optical, c.in_sar, c.widths, c.encoder_blocks
        self.in_optical, self.in_sar, self.sar_input = in_optical, in_sar, c.sar_input
        dim = widths[2]
        self.optical_encoder = OpticalEncoder(in_optical, widths, encoder_blocks)
        self.sar_encoder = SAREncoder(in_sar, widths, encoder_blocks, c.use_spectral_attention)
        self.fusion = (CrossAttentionFusion(dim, c.heads, c.ffn_ratio, c.attention) if c.use_cross_attn
                       else ConcatFusion(dim))
        self.gate = SpeckleAwareGate(dim)
        self.refine = Refinement(dim)
        skips = 2 if c.use_sar_skips else 1
        self.up2 = _UpStage(widths[2], widths[1], c.decoder_blocks[0], skips)
        self.up1 = _UpStage(widths[1], widths[0], c.decoder_blocks[1], skips)
        # affine: (offset, gain) per band and pixel, residual = offset + gain * cloudy
        self.head = nn.Conv2d(widths[0], in_optical * (2 if c.affine_residual else 1), 3, padding=1)
        self.cloud_predictor = CloudConfidencePredictor(dim) if c.use_cloud_predictor else None
        self.date_correction = DateCorrection(dim, in_optical) if c.use_date_correction else None
        self.confidence_refinement = ConfidenceRefinement(widths[0]) if c.use_confidence_refinement else None
        # A small residual at initialisation: the untrained network starts near the identity (output ~
        # cloudy), which is already a fair cloud-removal baseline, yet every layer still gets a gradient.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.weight[in_optical:].zero_()  # the gains, where there are any: 0, the plain residual
        # Last, and from a fork of the random stream: every other part and every later draw (the training data's
        # order) get the same numbers with the head as without it, so the two networks train alike but for what the
        # head itself changes.
        self.uncertainty_head = None
        if c.use_uncertainty_head:
            with torch.random.fork_rng(devices=[]):
                self.uncertainty_head = UncertaintyHead(widths[0], in_optical)
        # learned SAR features of "no radar" per level, zeros at first (no draw from the random stream)
        self.sar_absent = c.sar_absent if c.sar_dropout > 0 and c.sar_input == "on" else None
        self.absent_sar = (nn.ParameterList([nn.Parameter(torch.zeros(1, w, 1, 1)) for w in widths])
                           if self.sar_absent == "token" else None)

    def _fuse_sar(self, sar, present, o3):
        """(gated fusion of the SAR features into o3, SAR skips s1, s2). Samples without radar (present False) get
        the absent tokens ("token"), no fusion and zero skips ("skip"), or zero radar (a model never trained so)."""
        if self.sar_input == "zeros":
            sar = torch.zeros_like(sar)
        elif present is not None and self.sar_absent is None:
            sar = torch.where(present.view(-1, 1, 1, 1), sar, 0.0)
        s1, s2, s3 = self.sar_encoder(_pad_to_multiple(sar, self.DOWNSAMPLE))
        keep = None if present is None or self.sar_absent is None else present.view(-1, 1, 1, 1)
        if keep is not None and self.absent_sar is not None:
            s1, s2, s3 = (torch.where(keep, s, t.to(s.dtype)) for s, t in zip((s1, s2, s3), self.absent_sar))
        fused = self.fusion(o3, s3) * self.gate(o3, s3)
        if keep is not None and self.absent_sar is None:  # "skip"
            fused, s1, s2 = (torch.where(keep, x, 0.0) for x in (fused, s1, s2))
        return fused, s1, s2

    def encode(self, optical, sar, present=None):
        """Padded images, which samples have radar (None: all) -> (refined bottleneck, 1/2 and full-res skips)."""
        o1, o2, o3 = self.optical_encoder(optical)
        fused, s1, s2 = self._fuse_sar(sar, present, o3)
        refined = self.refine(fused, o3)
        skips = 2 if self.config.use_sar_skips else 1
        return refined, (o2, s2)[:skips], (o1, s1)[:skips]

    def decode(self, refined, skips2, skips1, base, h, w):
        """(decoder features at the padded full resolution, residual (N,13,h,w)); an affine residual scales `base`."""
        x = self.up1(self.up2(refined, *skips2), *skips1)
        if self.config.affine_residual:  # in fp32: the gain multiplies the input, the offset nearly cancels it
            with torch.autocast(device_type=x.device.type, enabled=False):
                offset, gain = self.head(x.float())[..., :h, :w].chunk(2, dim=1)
                return x, offset + gain * base.float()
        return x, self.head(x)[..., :h, :w]

    def forward(self, optical, sar, return_aux=False):
        """optical (N,13,H,W) cloudy image, sar (N,2,H,W) or None (no radar) -> prediction (N,13,H,W) float32;
        return_aux=True: (prediction, ModelOutputs: residual, corrected, confidence or None, log_variance)."""
        n, (h, w) = optical.shape[0], optical.shape[-2:]
        present = (torch.zeros(n, dtype=torch.bool, device=optical.device) if sar is None  # which samples have radar
                   else torch.rand(n, device=optical.device) >= self.config.sar_dropout  # per sample: torch's generator
                   if self.training and self.config.sar_dropout > 0 else None)  # None: all of them
        sar = _check_inputs(optical, sar, self.in_optical, self.in_sar)
        optical_p = _pad_to_multiple(optical, self.DOWNSAMPLE)
        refined, skips2, skips1 = self.encode(optical_p, sar, present)
        x, residual = self.decode(refined, skips2, skips1, optical, h, w)
        log_variance = None  # only where asked for: validation's plain forward skips the head
        if return_aux and self.uncertainty_head is not None:
            log_variance = self.uncertainty_head(x.detach())[..., :h, :w]
        confidence = None
        if self.cloud_predictor is not None:
            bottleneck, decoded = ((refined.detach(), x.detach()) if self.config.detach_confidence_input
                                   else (refined, x))
            if self.confidence_refinement is None:  # the design: the predictor's map, upsampled
                confidence = F.interpolate(self.cloud_predictor(bottleneck), size=optical_p.shape[-2:],
                                           mode="bilinear", align_corners=False)
            else:  # in logits, so the full-resolution correction adds up without saturating
                logits = F.interpolate(self.cloud_predictor.logits(bottleneck), size=optical_p.shape[-2:],
                                       mode="bilinear", align_corners=False)
                confidence = torch.sigmoid((logits + self.confidence_refinement(decoded)).float())
            confidence = confidence[..., :h, :w]
        correction = None if self.date_correction is None else self.date_correction(refined)
        prediction, base, residual, confidence = compose(optical, residual, confidence, correction)
        if return_aux:
            return prediction, ModelOutputs(residual=residual, confidence=confidence, corrected=base,
                                            log_variance=log_variance)
        return prediction


def compose(base, residual, confidence, correction=None):
    """(prediction, corrected base, residual, confidence), fp32: base (date-corrected) + confidence * residual (or +
    residual). Outside autocast: bf16 would drop a clear pixel's last 8 bits, the detail the residual passes through."""
    with torch.autocast(device_type=base.device.type, enabled=False):
        residual, base = residual.float(), base.float()
        if correction is not None:
            gain, offset = correction
            base = gain * base + offset
        if confidence is None:
            return base + residual, base, residual, None
        confidence = confidence.float()
        return base + confidence * residual, base, residual, confidence


class _DSen2CRBlock(nn.Module):
    """conv3x3-ReLU-conv3x3, scaled by `scale` and added to the input (Meraner et al. 2020)."""

    def __init__(self, channels, scale):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.conv2(F.relu(self.conv1(x)))


@dataclass
class DSen2CRConfig:
    in_optical: int = 13
    in_sar: int = 2
    feature_sizes: int = 256
    num_layers: int = 16
    scale: float = 0.1
    sar_input: str = "on"

    def __post_init__(self):
        if self.sar_input not in SAR_INPUTS:
            raise ValueError(f"sar_input must be one of {SAR_INPUTS}, got {self.sar_input!r}")


class DSen2CR(nn.Module):
    """DSen2-CR baseline (Meraner et al., ISPRS J. 2020) after the authors' Keras code: concat(optical, SAR) -> conv3x3
    + ReLU -> num_layers residual blocks scaled by 0.1 -> conv3x3 -> + optical (long skip). Unlike the original: torch's
    default init, not he_uniform; no extra output channels. Default: 18,947,341 parameters (16 blocks of 256)."""

    model_name = "DSen2CR"

    def __init__(self, config=None, **overrides):
        super().__init__()
        c = self.config = replace(config or DSen2CRConfig(), **overrides)
        self.in_optical, self.in_sar, self.sar_input = c.in_optical, c.in_sar, c.sar_input
        self.stem = nn.Conv2d(c.in_optical + c.in_sar, c.feature_sizes, 3, padding=1)
        self.blocks = nn.Sequential(*[_DSen2CRBlock(c.feature_sizes, c.scale) for _ in range(c.num_layers)])
        self.head = nn.Conv2d(c.feature_sizes, c.in_optical, 3, padding=1)

    def forward(self, optical, sar, return_aux=False):
        sar = _check_inputs(optical, sar, self.in_optical, self.in_sar)
        if self.sar_input == "zeros":
            sar = torch.zeros_like(sar)
        x = self.blocks(F.relu(self.stem(torch.cat([optical, sar], dim=1))))
        prediction, _, residual, _ = compose(optical, self.head(x), None)
        if return_aux:
            return prediction, ModelOutputs(residual=residual)
        return prediction


MODELS = {"CrossAttention": CloudRemovalCrossAttention, "DSen2CR": DSen2CR}


def create_model(model_name="CrossAttention", **config):
    """Build "CrossAttention" (CloudRemovalCrossAttention) or "DSen2CR" from its constructor arguments;
    runtime.model_config_of(checkpoint) gives the config that rebuilds a saved model."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model_name {model_name!r}; choose one of {sorted(MODELS)}")
    return MODELS[model_name](**config)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def parameter_breakdown(model):
    """{part name: parameter count} for the top-level parts of a model (SAR attention listed apart)."""
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    sar_encoder = getattr(model, "sar_encoder", None)
    if sar_encoder is not None and sar_encoder.spectral_attention is not None:
        parts["sar_encoder.spectral_attention"] = count_parameters(sar_encoder.spectral_attention)
    return parts


def count_macs(model, size=256):
    """Multiply-accumulates of one forward pass of one size x size sample in eval mode (torch's FlopCounterMode,
    MACs = FLOPs / 2), the unit the field's papers report as "GFLOPs". Runs on fake tensors: shapes only, no
    arithmetic, so it takes about a second for any network. FlopCounterMode has no formula for the CPU's fused
    attention kernel; it is counted as the two matmuls it does, so "fused" and "reference" count the same."""
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={
        cpu_sdpa: lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value)})
    was_training, device = model.training, next(model.parameters()).device
    dates = (1,) if getattr(model, "input_t", 1) == 1 else (1, model.input_t)  # a time series model: (N,T,C,H,W)
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), counter:
            model(*(torch.empty(*dates, c, size, size, device=device) for c in (model.in_optical, model.in_sar)))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def build_parser():
    """The smoke test's flags (--help answers without building a network)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the forward/backward pass is timed: auto = CUDA when available, else CPU")
    return parser


def _smoke_test(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine; use --device cpu")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model = CloudRemovalCrossAttention().to(device)
    design, cfg = CloudRemovalCrossAttention(**design_switches()), asdict(model.config)
    n_params, n_design = count_parameters(model), count_parameters(design)
    print(f"Model parameters: {n_params / 1e6:.2f}M (the design's network: {n_design / 1e6:.2f}M, plus "
          f"{(n_params - n_design):,} for the parts measured worth adding)")
    print(f"MACs per 256 px forward: {count_macs(model) / 1e9:.1f} G (the design's network: "
          f"{count_macs(design) / 1e9:.1f} G; DSen2-CR: {count_macs(DSen2CR()) / 1e9:,.0f} G)")
    print("Architecture: Cloud-Aware Weighted Residual Learning")
    features = {"Spectral Attention for SAR": "use_spectral_attention", "Cloud Confidence Predictor":
                "use_cloud_predictor", "Adaptive Residual Weighting": "use_cloud_predictor",
                "Full-resolution confidence refinement": "use_confidence_refinement", "SAR skip connections to the "
                "decoder": "use_sar_skips", "Affine residual (offset + gain x cloudy)": "affine_residual",
                "Date (radiometric) correction": "use_date_correction", "Uncertainty head (per-band log-variance)":
                "use_uncertainty_head"}
    for name, switch in features.items():
        print(f"  - {name}: {'✓' if cfg[switch] else '✗'}")
    parts = parameter_breakdown(model)
    if model.uncertainty_head is None:  # what --use_uncertainty_head would add
        parts["uncertainty_head (off)"] = count_parameters(UncertaintyHead(cfg["widths"][0], cfg["in_optical"]))
    for name, count in parts.items():
        print(f"      {name:32s} {count:>10,d}")

    size, batch = 128, 2
    optical, sar = torch.rand(batch, 13, size, size, device=device), torch.rand(batch, 2, size, size, device=device)
    prediction, aux = model(optical, sar, return_aux=True)
    assert prediction.shape == optical.shape and prediction.dtype == torch.float32
    assert aux.confidence.shape == (batch, 1, size, size)
    assert aux.log_variance is None or aux.log_variance.shape == optical.shape
    print(f"Output shape: {tuple(prediction.shape)} == input {tuple(optical.shape)}: OK; "
          f"confidence {tuple(aux.confidence.shape)}")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(3):  # the first step includes one-off allocation and kernel selection
        sync()
        t0 = time.perf_counter()
        model(optical, sar).abs().mean().backward()
        sync()
        times.append(time.perf_counter() - t0)
    print(f"Forward+backward on {device.type} ({torch.get_num_threads()} threads), batch {batch} "
          f"at {size}x{size}, fp32: {min(times[1:]) * 1000:.0f} ms (first {times[0] * 1000:.0f} ms)")
    print("Expected PSNR target: 35-36 dB (the design document's target, not a measurement)")


if __name__ == "__main__":
    _smoke_test()
