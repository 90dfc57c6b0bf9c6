"""GLF-CR Enhanced v3: SAR-optical cloud removal with cross-attention fusion and cloud-aware residual.

    python net_CR_CrossAttention.py      # smoke test: parameter count, MACs, shapes, forward/backward time

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

Also the field's baseline DSen2CR (Meraner et al., ISPRS 2020) with the same forward signature, and
create_model(model_name, **config) building either from a checkpoint's stored config.
This module imports nothing of the project (torch only).
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "SpectralAttentionSAR", "ResBlock", "OpticalEncoder", "SAREncoder", "CrossAttentionFusion",
    "SpeckleAwareGate", "CloudConfidencePredictor", "CloudRemovalCrossAttention", "DSen2CR",
    "create_model", "MODELS", "SAR_INPUTS", "ADDED_SWITCHES", "count_macs",
]

GN_GROUPS = 8
ATTENTION_PATHS = ("fused", "reference")
SAR_INPUTS = ("on", "zeros")  # "zeros": the radar ablation, an all-zero SAR image whatever the data holds
# Switches added after the design's first version, with the value that rebuilds a network saved before each
# existed (a checkpoint's config lacks the key): runtime.model_config_of fills them in.
ADDED_SWITCHES = {"use_date_correction": False, "use_sar_skips": False, "use_confidence_refinement": False,
                  "detach_confidence_input": False, "affine_residual": False}


def _gn(channels):
    return nn.GroupNorm(min(GN_GROUPS, channels), channels)


def _check_sar_input(sar_input):
    if sar_input not in SAR_INPUTS:
        raise ValueError(f"sar_input must be one of {SAR_INPUTS}, got {sar_input!r}")


def _check_inputs(optical, sar, in_optical, in_sar):
    if optical.dim() != 4 or sar.dim() != 4:
        raise ValueError(f"optical and sar must be (N,C,H,W) tensors, got shapes "
                         f"{tuple(optical.shape)} and {tuple(sar.shape)}")
    if optical.shape[1] != in_optical or sar.shape[1] != in_sar:
        raise ValueError(f"expected {in_optical} optical and {in_sar} SAR channels, got optical "
                         f"{tuple(optical.shape)} and sar {tuple(sar.shape)}")
    if optical.shape[0] != sar.shape[0] or optical.shape[2:] != sar.shape[2:]:
        raise ValueError(f"optical and SAR must have the same batch size and spatial size, got optical "
                         f"{tuple(optical.shape)} and sar {tuple(sar.shape)}")


class SpectralAttentionSAR(nn.Module):
    """Squeeze-and-excitation over the raw SAR channels (VV, VH): weights VV against VH by content.

    Both the mean and the max of each channel are squeezed through one shared 2->hidden->2 MLP (as in
    CBAM) because speckle makes the mean alone a weak summary of a radar scene. 82 parameters with
    hidden=16. The weights are 2*sigmoid so an untrained block starts at identity (sigmoid(0)=0.5).
    """

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

    attention="fused" calls F.scaled_dot_product_attention (flash / memory-efficient kernels: the
    (tokens x tokens) matrix is never stored; 4096 tokens per 256 px image at 1/4 resolution).
    attention="reference" materialises softmax(QK^T/sqrt(d))V explicitly; it exists so a test can prove
    the two agree and so the benchmark can show what the fused kernel saves.
    """

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
    """Optical-guided speckle-aware gate: sigmoid(spatial map) x sigmoid(channel vector) from [optical, SAR].

    The spatial gate smooths over a 3x3 neighbourhood so single speckle-bright pixels cannot open it; the
    channel gate pools globally. Both see the optical features, which say where the radar is needed.
    """

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

    The cloudy and the cloud-free image of a pair are two acquisition dates, so even clear pixels differ (sun,
    atmosphere, phenology). This term carries that change for all pixels, so the confidence map only has to say
    where clouds are. gain = 1 + 0.1 tanh(.), offset = 0.05 tanh(.) (a bounded correction), predicted from the
    pooled refined features; zero-initialised, so an untrained network starts at the identity.
    """

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

    369,281 parameters (the design's ~0.37M): 3x3 256->128, 3x3 128->64, 1x1 64->1.
    """

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
    4-8 px; near an edge that gates the residual off inside the cloud and on in the clear. confidence =
    sigmoid(upsampled predictor logits + refinement). Zero-initialised: an untrained refinement gives the
    predictor's own map (upsampled as logits rather than as probabilities).
    """

    def __init__(self, channels=64, hidden=32):
        super().__init__()
        self.net = nn.Sequential(_conv_gn_act(channels, hidden), nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, decoder_features):
        return self.net(decoder_features)


def _pad_to_multiple(x, multiple):
    """Pad bottom/right so H and W are multiples of `multiple`; reflect where the size allows it."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    # Reflect padding needs pad < size; a tiny input (e.g. 1-3 px) falls back to replicate.
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class CloudRemovalCrossAttention(nn.Module):
    """The whole GLF-CR Enhanced v3 network; see the module docstring for the data flow.

    Switches (stored in .config so create_model(**model.config) rebuilds the same network):
      use_spectral_attention: SpectralAttentionSAR before the SAR encoder (off: raw VV/VH go in).
      use_cross_attn: cross-attention fusion (off: ConcatFusion, concatenation + convolution).
      use_cloud_predictor: output = cloudy + confidence * residual (off: output = cloudy + residual,
                           confidence returned as None).
      attention: "fused" (F.scaled_dot_product_attention) or "reference" (materialised softmax(QK^T)V);
                 same parameters, same function.
      sar_input: "on", or "zeros" to feed an all-zero radar image (ablation: does the model use the radar?);
                 part of the config so a checkpoint evaluates the way it was trained.
      use_date_correction: output = DateCorrection(cloudy) + confidence * residual (off: cloudy + ...).
      use_sar_skips: the decoder also concatenates the SAR encoder's full and half resolution features, so
                 full-resolution radar detail reaches the pixels under thick cloud (off: optical skips only).
      use_confidence_refinement: ConfidenceRefinement sharpens the confidence map at full resolution (only with
                 use_cloud_predictor: without a confidence map it is recorded as off).
      affine_residual: the head predicts a per-pixel, per-band offset and gain, residual = offset + gain * cloudy
                 (in fp32). A cloud's physics (cloudy = clear * transmission + cloud light, shadow a second factor)
                 makes clear = cloudy / transmission - cloud light / transmission: affine in the input, with
                 coefficients that vary slowly in space, so the head need not rebuild the input's detail, only
                 scale and shift it (AOD-Net, Li et al. ICCV 2017, writes dehazing the same way). Off:
                 residual = head(features), the design's.
      detach_confidence_input: the confidence predictor (and refinement) read detached features, so a loss on the
                 confidence map (--confidence_weight) trains the confidence head only and does not pull the shared
                 encoders and decoder away from reconstruction; the reconstruction loss still reaches the head
                 through confidence * residual.
    """

    model_name = "CrossAttention"
    DOWNSAMPLE = 4  # two stride-2 stages: inputs are padded to a multiple of this

    def __init__(self, in_optical=13, in_sar=2, use_spectral_attention=True, use_cross_attn=True,
                 use_cloud_predictor=True, attention="fused", widths=(64, 128, 256), encoder_blocks=(1, 1, 1),
                 decoder_blocks=(0, 0), heads=8, ffn_ratio=2.0, sar_input="on", use_date_correction=False,
                 use_sar_skips=True, use_confidence_refinement=True, detach_confidence_input=False,
                 affine_residual=True):
        super().__init__()
        widths, encoder_blocks, decoder_blocks = tuple(widths), tuple(encoder_blocks), tuple(decoder_blocks)
        if len(widths) != 3 or len(encoder_blocks) != 3 or len(decoder_blocks) != 2:
            raise ValueError("widths and encoder_blocks need 3 entries (levels), decoder_blocks 2")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        _check_sar_input(sar_input)
        self.config = dict(in_optical=in_optical, in_sar=in_sar, use_spectral_attention=use_spectral_attention,
                           use_cross_attn=use_cross_attn, use_cloud_predictor=use_cloud_predictor,
                           attention=attention, widths=widths, encoder_blocks=encoder_blocks,
                           decoder_blocks=decoder_blocks, heads=heads, ffn_ratio=ffn_ratio, sar_input=sar_input,
                           use_date_correction=use_date_correction, use_sar_skips=use_sar_skips,
                           use_confidence_refinement=use_confidence_refinement,
                           detach_confidence_input=detach_confidence_input, affine_residual=affine_residual)
        self.in_optical, self.in_sar, self.sar_input = in_optical, in_sar, sar_input
        dim = widths[2]
        self.optical_encoder = OpticalEncoder(in_optical, widths, encoder_blocks)
        self.sar_encoder = SAREncoder(in_sar, widths, encoder_blocks, use_spectral_attention)
        self.fusion = (CrossAttentionFusion(dim, heads, ffn_ratio, attention) if use_cross_attn
                       else ConcatFusion(dim))
        self.gate = SpeckleAwareGate(dim)
        self.refine = Refinement(dim)
        skips = 2 if use_sar_skips else 1
        self.up2 = _UpStage(widths[2], widths[1], decoder_blocks[0], skips)
        self.up1 = _UpStage(widths[1], widths[0], decoder_blocks[1], skips)
        # affine: (offset, gain) per band and pixel, residual = offset + gain * cloudy
        self.head = nn.Conv2d(widths[0], in_optical * (2 if affine_residual else 1), 3, padding=1)
        self.cloud_predictor = CloudConfidencePredictor(dim) if use_cloud_predictor else None
        self.date_correction = DateCorrection(dim, in_optical) if use_date_correction else None
        # a refinement of the confidence map needs a map: without the cloud predictor the config records it as off
        use_confidence_refinement = use_confidence_refinement and use_cloud_predictor
        self.config["use_confidence_refinement"] = use_confidence_refinement
        self.confidence_refinement = ConfidenceRefinement(widths[0]) if use_confidence_refinement else None
        # A small residual at initialisation: the untrained network starts near the identity (output ~
        # cloudy), which is already a fair cloud-removal baseline, yet every layer still gets a gradient.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.weight[in_optical:].zero_()  # the gains, where there are any: 0, the plain residual

    def forward(self, optical, sar, return_aux=False):
        """optical (N,13,H,W) cloudy image, sar (N,2,H,W) -> prediction (N,13,H,W) float32.

        With return_aux=True returns (prediction, {"confidence": (N,1,H,W) or None, "residual": (N,13,H,W)}).
        """
        _check_inputs(optical, sar, self.in_optical, self.in_sar)
        if self.sar_input == "zeros":
            sar = torch.zeros_like(sar)
        h, w = optical.shape[-2:]
        optical_p = _pad_to_multiple(optical, self.DOWNSAMPLE)
        sar_p = _pad_to_multiple(sar, self.DOWNSAMPLE)

        o1, o2, o3 = self.optical_encoder(optical_p)
        s1, s2, s3 = self.sar_encoder(sar_p)
        fused = self.fusion(o3, s3) * self.gate(o3, s3)
        refined = self.refine(fused, o3)
        if self.config["use_sar_skips"]:
            x = self.up1(self.up2(refined, o2, s2), o1, s1)
        else:
            x = self.up1(self.up2(refined, o2), o1)
        if self.config["affine_residual"]:  # in fp32: the gain multiplies the input, the offset nearly cancels it
            with torch.autocast(device_type=optical.device.type, enabled=False):
                offset, gain = self.head(x.float())[..., :h, :w].chunk(2, dim=1)
                residual = offset + gain * optical.float()
        else:
            residual = self.head(x)[..., :h, :w]

        confidence = None
        if self.cloud_predictor is not None:
            bottleneck, decoded = (refined.detach(), x.detach()) if self.config["detach_confidence_input"] else (refined, x)
            if self.confidence_refinement is None:  # the design: the predictor's map, upsampled
                confidence = F.interpolate(self.cloud_predictor(bottleneck), size=optical_p.shape[-2:],
                                           mode="bilinear", align_corners=False)
            else:  # in logits, so the full-resolution correction adds up without saturating
                logits = F.interpolate(self.cloud_predictor.logits(bottleneck), size=optical_p.shape[-2:],
                                       mode="bilinear", align_corners=False)
                confidence = torch.sigmoid((logits + self.confidence_refinement(decoded)).float())
            confidence = confidence[..., :h, :w]
        correction = None if self.date_correction is None else self.date_correction(refined)
        # The final addition in fp32 (outside autocast): in bf16 a clear pixel's reflectance would lose
        # its last 8 bits, which is the detail the weighted residual is meant to pass through.
        with torch.autocast(device_type=optical.device.type, enabled=False):
            residual, base = residual.float(), optical.float()
            if correction is not None:
                gain, offset = correction
                base = gain * base + offset
            if confidence is not None:
                confidence = confidence.float()
                prediction = base + confidence * residual
            else:
                prediction = base + residual
        if return_aux:
            return prediction, {"confidence": confidence, "residual": residual, "corrected": base}
        return prediction


class _DSen2CRBlock(nn.Module):
    """conv3x3-ReLU-conv3x3, scaled by `scale` and added to the input (Meraner et al. 2020)."""

    def __init__(self, channels, scale):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.conv2(F.relu(self.conv1(x)))


class DSen2CR(nn.Module):
    """DSen2-CR baseline (Meraner et al., ISPRS J. 2020), after the authors' Keras code:
    concat(optical, SAR) -> conv3x3 (feature_sizes) + ReLU -> num_layers residual blocks scaled by 0.1
    -> conv3x3 to the optical bands -> + optical input (long skip).

    Differences from the original, on purpose: PyTorch default init instead of he_uniform, and no extra
    output channels (the original appends the input and a cloud-mask placeholder for its loss).
    Default: 18,947,341 parameters (16 blocks of 256 channels).
    """

    model_name = "DSen2CR"

    def __init__(self, in_optical=13, in_sar=2, feature_sizes=256, num_layers=16, scale=0.1, sar_input="on"):
        super().__init__()
        _check_sar_input(sar_input)
        self.config = dict(in_optical=in_optical, in_sar=in_sar, feature_sizes=feature_sizes,
                           num_layers=num_layers, scale=scale, sar_input=sar_input)
        self.in_optical, self.in_sar, self.sar_input = in_optical, in_sar, sar_input
        self.stem = nn.Conv2d(in_optical + in_sar, feature_sizes, 3, padding=1)
        self.blocks = nn.Sequential(*[_DSen2CRBlock(feature_sizes, scale) for _ in range(num_layers)])
        self.head = nn.Conv2d(feature_sizes, in_optical, 3, padding=1)

    def forward(self, optical, sar, return_aux=False):
        _check_inputs(optical, sar, self.in_optical, self.in_sar)
        if self.sar_input == "zeros":
            sar = torch.zeros_like(sar)
        x = self.blocks(F.relu(self.stem(torch.cat([optical, sar], dim=1))))
        residual = self.head(x)
        with torch.autocast(device_type=optical.device.type, enabled=False):
            residual = residual.float()
            prediction = optical.float() + residual
        if return_aux:
            return prediction, {"confidence": None, "residual": residual}
        return prediction


MODELS = {"CrossAttention": CloudRemovalCrossAttention, "DSen2CR": DSen2CR}


def create_model(model_name="CrossAttention", **config):
    """Build "CrossAttention" (CloudRemovalCrossAttention) or "DSen2CR" from its constructor arguments.

    create_model(model_name=ckpt["model_name"], **ckpt["model_config"]) rebuilds a saved model.
    """
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
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), counter:
            model(torch.empty(1, model.in_optical, size, size, device=device),
                  torch.empty(1, model.in_sar, size, size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _smoke_test():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = CloudRemovalCrossAttention().to(device)
    n_params = count_parameters(model)
    cfg = model.config
    tick = lambda on: "✓" if on else "✗"  # noqa: E731
    design = CloudRemovalCrossAttention(**ADDED_SWITCHES)
    n_design = count_parameters(design)
    print(f"Model parameters: {n_params / 1e6:.2f}M (the design's network: {n_design / 1e6:.2f}M, plus "
          f"{(n_params - n_design):,} for the parts measured worth adding)")
    print(f"MACs per 256 px forward: {count_macs(model) / 1e9:.1f} G (the design's network: "
          f"{count_macs(design) / 1e9:.1f} G; DSen2-CR: {count_macs(DSen2CR()) / 1e9:,.0f} G)")
    print("Architecture: Cloud-Aware Weighted Residual Learning")
    print(f"  - Spectral Attention for SAR: {tick(cfg['use_spectral_attention'])}")
    print(f"  - Cloud Confidence Predictor: {tick(cfg['use_cloud_predictor'])}")
    print(f"  - Adaptive Residual Weighting: {tick(cfg['use_cloud_predictor'])}")
    print(f"  - Full-resolution confidence refinement: {tick(cfg['use_confidence_refinement'])}")
    print(f"  - SAR skip connections to the decoder: {tick(cfg['use_sar_skips'])}")
    print(f"  - Affine residual (offset + gain x cloudy): {tick(cfg['affine_residual'])}")
    print(f"  - Date (radiometric) correction: {tick(cfg['use_date_correction'])}")
    for name, count in parameter_breakdown(model).items():
        print(f"      {name:32s} {count:>10,d}")

    size, batch = 128, 2
    optical = torch.rand(batch, 13, size, size, device=device)
    sar = torch.rand(batch, 2, size, size, device=device)
    prediction, aux = model(optical, sar, return_aux=True)
    assert prediction.shape == optical.shape and prediction.dtype == torch.float32
    assert aux["confidence"].shape == (batch, 1, size, size)
    print(f"Output shape: {tuple(prediction.shape)} == input {tuple(optical.shape)}: OK; "
          f"confidence {tuple(aux['confidence'].shape)}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
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
