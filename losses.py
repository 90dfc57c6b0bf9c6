"""Training losses for SAR-optical cloud removal: L1 (or cloud-focused L1), perceptual, FFT, gradient,
AECR-Net contrastive regularisation, optional confidence-map and residual terms, and the negative log-likelihood
that trains the uncertainty head (docs/uncertainty.md).

    criterion = CRLoss(resolve(given_flags(args), model.config))   # or CRLoss(fft_weight=0.3, ...)
    total, terms = criterion(pred, target, cloudy, cloud_mask=cloud_mask, aux=aux)   # aux: the model's ModelOutputs

The terms are declared once, in LOSS_TERMS (a LossTerm each: name, default weight, the model part it needs, the
model outputs it reads, its function); the training flags, the resolved LossConfig a checkpoint stores and
docs/losses.md's table are made from it.

Every term is computed in float32 with autocast disabled, whatever precision the model ran in: the
FFT, the divisions of the contrastive and cloud-focused terms and binary cross-entropy are not safe in
fp16/bf16. Every division carries an epsilon, so all-zero and all-one images give finite losses. Only the
frozen VGG's convolutions may run in lower precision (CRLoss(vgg_dtype=torch.bfloat16), what training passes
under AMP); their features are compared in float32.

The perceptual and contrastive terms share the VGG19 features of one step: the target and the cloudy image
go through VGG together without gradient, the prediction with gradient. The L1, cloud-focused, FFT and
gradient terms all read one difference image (pred - target): the FFT and finite differences are linear,
so FFT(pred) - FFT(target) = FFT(pred - target) and one transform does.
"""
import functools
import math
import os
import socket
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from bands import RGB_BANDS

EPS = 1e-7  # AECR-Net's epsilon; also guards every other division below

# ReLU outputs used by both VGG terms: the first ReLU of each of VGG19's five blocks, with the per-layer
# weights of AECR-Net's ContrastLoss (GlassyWu/AECR-Net, model/CR.py) - the same layers and weights as
# pix2pixHD's VGG perceptual loss. Deeper layers get more weight because they are fewer and coarser.
VGG_LAYER_WEIGHTS = {"relu1_1": 1.0 / 32, "relu2_1": 1.0 / 16, "relu3_1": 1.0 / 8, "relu4_1": 1.0 / 4, "relu5_1": 1.0}
# Under AMP the VGG layers up to this ReLU run in bf16/fp16, the deeper ones in float32. Measured with random
# weights (tests/test_losses.py): relu5_1 features of different images differ by ~1e-3 of their magnitude, below
# bf16's resolution, and the contrastive term came out 17-22% off when conv4_2..conv5_1 ran in bf16; up to
# relu4_1 (62% of the FLOPs to relu5_1) the terms stay within the tolerance the tests state.
FP32_AFTER = "relu4_1"
# Index of each ReLU in torchvision's `vgg.features` Sequential (VGG16 accepted for local weight files).
VGG_LAYER_INDEX = {
    "vgg19": {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29},
    "vgg16": {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 18, "relu5_1": 25},
}
# Reflectance (dataloader's [0,1] = reflectance / 10000) is multiplied by this and clipped to [0,1]
# before VGG: clear land rarely exceeds 0.3 reflectance in B4/B3/B2, so 0..0.3 fills VGG's 0..1 photo
# range like a standard true-colour rendering, and clouds (> 0.3) saturate to white as in a photo.
RGB_GAIN = 1.0 / 0.3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 60  # torch.hub's download has no timeout of its own; a dead network must not hang training
PROBE_TIMEOUT_S = 10  # one HEAD request tells whether the weights can be downloaded at all
VGG_WEIGHTS_HINT = ("hint: pass --vgg_weights PATH to a torchvision vgg19 or vgg16 state_dict file (e.g. "
                    "vgg19-dcbb9e9d.pth copied from an online machine), or --vgg_weights random for offline smoke "
                    "tests only (the perceptual and contrastive terms are then meaningless)")

# Defaults of the terms' options (LOSS_TERMS below holds them; CloudFocusedLoss needs its own before the table).
# 2.5 as in the design document's training command (its "Usage" example shows 2.0); the ablation table in
# BENCHMARKS.md was measured with 2.5.
CLOUD_WEIGHT_FACTOR = 2.5
NLL_DISTRIBUTIONS = ("gaussian", "laplace")
VGG_WEIGHTS_DEFAULT = "imagenet"  # where the VGG terms' weights come from: a CRLoss argument, not part of the losses


class VGGWeightsError(RuntimeError):
    """The VGG weights asked for cannot be had (offline without a cached copy, unreadable or foreign file)."""


def _fp32(x):
    return None if x is None else x.float()


def rgb_for_vgg(x, mean, std):
    """(N,13,H,W) reflectance in [0,1] -> (N,3,H,W) R,G,B scaled by RGB_GAIN, clipped, normalised by the (1,3,1,1)
    ImageNet mean and std (built once by CRLoss, on its device)."""
    return ((x[:, list(RGB_BANDS)] * RGB_GAIN).clamp(0.0, 1.0) - mean) / std


def _reachable(url):
    """None when a HEAD request to url succeeds, else why not ("URLError: ...")."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
        return None
    except Exception as exc:  # URLError, timeout, HTTP error: no download possible from here
        return f"{type(exc).__name__}: {exc}"


def _imagenet_state_dict():
    """torchvision's ImageNet VGG19 weights from the torch hub cache; downloaded (and said so) only when the cache
    lacks them and the URL answers, so an offline machine gets one error line, not a "Downloading" line first."""
    url = torchvision.models.VGG19_Weights.IMAGENET1K_V1.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(cached):
        why = _reachable(url)
        if why is not None:
            raise VGGWeightsError(f"VGG19 ImageNet weights are not in the torch cache ({cached}) and {url} cannot "
                                  f"be reached ({why})\n{VGG_WEIGHTS_HINT}")
        print(f"downloading VGG19 ImageNet weights (548 MB, once) from {url} to {cached}")
    previous_timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu")
    except Exception as exc:  # broken download, hash mismatch, unreadable cached file
        raise VGGWeightsError(f"VGG19 ImageNet weights could not be loaded from {cached} or {url} "
                              f"({type(exc).__name__}: {exc})\n{VGG_WEIGHTS_HINT}") from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _file_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VGGWeightsError(f"--vgg_weights {path}: cannot read a torch state_dict "
                              f"({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VGGWeightsError(f"--vgg_weights {path}: expected a torchvision vgg16/vgg19 state_dict, "
                              f"got {type(state).__name__}")
    return state


# torchvision's layer configurations: "E" is VGG19, "D" is VGG16.
_VGG_CFG = {"vgg19": torchvision.models.vgg.cfgs["E"], "vgg16": torchvision.models.vgg.cfgs["D"]}


def _vgg_conv_stack(arch):
    """torchvision's `vgg.features` for arch, built without the 120M-parameter classifier we never use."""
    return torchvision.models.vgg.make_layers(_VGG_CFG[arch], batch_norm=False)


def _arch_of(state, source):
    """vgg19 or vgg16, from the conv layers present in a torchvision state_dict."""
    conv_indices = {int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight")}
    for arch in ("vgg19", "vgg16"):
        expected = {i for i, m in enumerate(_vgg_conv_stack(arch)) if isinstance(m, nn.Conv2d)}
        if conv_indices == expected:
            return arch
    raise VGGWeightsError(
        f"--vgg_weights {source}: not a torchvision vgg16/vgg19 state_dict (conv keys features.N.weight with "
        f"N in {sorted(conv_indices)[:20]})"
    )


class VGGFeatures(nn.Module):
    """Frozen VGG feature extractor returning the ReLU outputs named in `layers`.

    weights: "imagenet" (torchvision VGG19 ImageNet weights via the torch hub cache), a path to a
    torchvision vgg19/vgg16 state_dict, or "random" (allowed for offline smoke tests; warns). Only the
    layers up to the deepest one requested are kept. Input: (N,3,H,W) already ImageNet-normalised.
    """

    def __init__(self, weights="imagenet", layers=tuple(VGG_LAYER_WEIGHTS)):
        super().__init__()
        weights = str(weights)
        if weights == "imagenet":
            state, arch = _imagenet_state_dict(), "vgg19"
        elif weights == "random":
            msg = ("--vgg_weights random: VGG has random weights, so the perceptual and contrastive losses "
                   "do not measure perceptual similarity; use only for offline smoke tests")
            warnings.warn(msg, stacklevel=2)  # once: a print beside it said the same thing twice
            state, arch = None, "vgg19"
        elif os.path.isfile(weights):
            state = _file_state_dict(weights)
            arch = _arch_of(state, weights)
        else:
            raise VGGWeightsError(f"--vgg_weights {weights!r}: not 'imagenet', 'random' or an existing file\n"
                                  f"{VGG_WEIGHTS_HINT}")
        unknown = [name for name in layers if name not in VGG_LAYER_INDEX[arch]]
        if unknown or not layers:
            raise ValueError(f"VGG layers {list(layers)}: choose from {list(VGG_LAYER_INDEX[arch])}")
        features = _vgg_conv_stack(arch)
        if state is not None:
            features_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            features.load_state_dict(features_state, strict=True)
        self.arch, self.weights_source = arch, weights
        self.layer_names = tuple(layers)
        self.layer_indices = tuple(VGG_LAYER_INDEX[arch][name] for name in layers)
        self.low_precision_last = VGG_LAYER_INDEX[arch][FP32_AFTER]
        deepest = max(self.layer_indices)
        self.features = features[: deepest + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # features we return must not be overwritten by a later layer
        self.requires_grad_(False)
        self.eval()
        self.forward_count = 0

    def train(self, mode=True):
        # Frozen feature extractor: stays in eval mode whatever the enclosing module does.
        return super().train(False)

    def forward(self, x, dtype=None):
        """The requested ReLU outputs of x. dtype (bf16/fp16): the layers up to relu4_1 run under autocast at dtype,
        the deeper ones in float32 (see FP32_AFTER)."""
        self.forward_count += 1
        wanted = set(self.layer_indices)
        out = {}
        for i, module in enumerate(self.features):
            if dtype is not None and i <= self.low_precision_last:
                with torch.autocast(x.device.type, dtype=dtype):
                    x = module(x)
            else:
                x = module(x.float())
            if i in wanted:
                out[i] = x
        return [out[i] for i in self.layer_indices]


def cloud_intensity(target, cloud_mask=None, cloudy=None):
    """(N,1,H,W) cloud intensity in [0,1]: the soft cloud mask, or when there is none the per-image
    max-normalised |cloudy - target| averaged over bands (a cloud is where the input differs from truth)."""
    if cloud_mask is not None:
        if cloud_mask.dim() != 4 or cloud_mask.shape[1] != 1 or cloud_mask.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"cloud_mask must be (N,1,{target.shape[-2]},{target.shape[-1]}), "
                             f"got {tuple(cloud_mask.shape)}")
        return cloud_mask.float().clamp(0.0, 1.0)
    if cloudy is None:
        raise ValueError("cloud intensity needs cloud_mask or cloudy (neither was given)")
    diff = (cloudy.float() - target.float()).abs().mean(dim=1, keepdim=True)
    return diff / (diff.amax(dim=(2, 3), keepdim=True) + EPS)


class CloudFocusedLoss(nn.Module):
    """Pixel-weighted L1 with weight = 1 + cloud_weight_factor * cloud_intensity.

    Normalised per image by the mean weight, so a uniform weight gives exactly plain L1 and the term
    only redistributes emphasis towards clouds inside each image; images count equally in the batch.
    """

    def __init__(self, cloud_weight_factor=CLOUD_WEIGHT_FACTOR):
        super().__init__()
        if cloud_weight_factor < 0:
            raise ValueError(f"cloud_weight_factor must be >= 0, got {cloud_weight_factor}")
        self.cloud_weight_factor = float(cloud_weight_factor)

    def forward(self, pred, target, cloud_mask=None, cloudy=None):
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            return self.from_error((pred - target).abs(), target, cloud_mask, cloudy)

    def from_error(self, abs_error, target, cloud_mask=None, cloudy=None):
        """The loss from |pred - target| already at hand (CRLoss computes it once for all its terms)."""
        weight = 1.0 + self.cloud_weight_factor * cloud_intensity(target, cloud_mask, cloudy)
        weighted_error = (weight * abs_error).mean(dim=(1, 2, 3))
        return (weighted_error / (weight.mean(dim=(1, 2, 3)) + EPS)).mean()


def fft_l1(diff):
    """L1 of the real and imaginary parts of the orthonormal 2-D FFT of diff = pred - target, in float32; equal to
    the L1 between the FFTs of pred and target (the FFT is linear) at half the transforms.

    Real/imaginary rather than amplitude/phase: the phase is undefined where the amplitude is ~0
    (flat images, high frequencies), and its gradient blows up there. rfft2 holds the same information
    as fft2 for real images at half the cost; "ortho" keeps the scale independent of the image size.
    """
    with torch.autocast(diff.device.type, enabled=False):
        return torch.view_as_real(torch.fft.rfft2(diff.float(), norm="ortho")).abs().mean()


def gradient_l1(diff):
    """Sum of the mean |horizontal| and |vertical| forward differences of diff = pred - target: the L1 between the
    image gradients of pred and target (differencing is linear)."""
    diff = diff.float()
    return (diff[..., :, 1:] - diff[..., :, :-1]).abs().mean() + (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean()


def confidence_loss(confidence, target, cloud_mask=None, cloudy=None, labels=None):
    """BCE between the model's confidence map (0 = clear, 1 = cloudy) and `labels` (N,1,H,W) in [0,1] (the
    training script passes the binary cloud mask, or the true cloud map where one exists); without labels,
    the soft cloud intensity."""
    with torch.autocast(confidence.device.type, enabled=False):
        confidence = confidence.float()
        if confidence.shape[-2:] != target.shape[-2:]:
            confidence = F.interpolate(confidence, size=target.shape[-2:], mode="bilinear", align_corners=False)
        labels = cloud_intensity(target, cloud_mask, cloudy) if labels is None else labels.float()
        return F.binary_cross_entropy(confidence.clamp(EPS, 1.0 - EPS), labels)


def nll_loss(pred, target, log_variance, distribution="laplace"):
    """Mean negative log-likelihood (nats per pixel and band) of target under a per-pixel, per-band distribution
    centred on the detached prediction, with the predicted variance exp(log_variance):
      gaussian: 0.5 (log 2 pi + s + e^2 exp(-s))                       (UnCRtainTS's GNLL)
      laplace:  log(2b) + |e| / b, scale b = sqrt(exp(s) / 2)           (the distribution an L1 fit assumes)
    e = target - pred, s = log_variance. The prediction is detached: its training is left to the other terms (see
    net_CR_CrossAttention.UncertaintyHead), so this term only teaches the head how wrong the prediction is. Float32
    with autocast off: exp(-s) reaches e^18."""
    if distribution not in NLL_DISTRIBUTIONS:
        raise ValueError(f"nll distribution must be one of {NLL_DISTRIBUTIONS}, got {distribution!r}")
    with torch.autocast(pred.device.type, enabled=False):
        error = target.float() - pred.detach().float()
        s = log_variance.float()
        if distribution == "gaussian":
            return 0.5 * (math.log(2 * math.pi) + s + error.square() * torch.exp(-s)).mean()
        log_b = 0.5 * (s - math.log(2.0))
        return (math.log(2.0) + log_b + error.abs() * torch.exp(-log_b)).mean()


# ----------------------------------------------------------------------------- the declared loss configuration

class LossInputs:
    """What the terms of one step read, in float32: the images, their difference, the labels, the model's outputs
    (aux: a net_CR_CrossAttention.ModelOutputs, or None) and the VGG distances, computed once for the two terms that
    share them."""

    def __init__(self, criterion, pred, target, cloudy, cloud_mask, confidence_target, aux,
                 date_confidence_target=None):
        self.criterion, self.pred, self.target, self.cloudy = criterion, pred, target, cloudy
        self.diff = pred - target  # every pixel-space term reads this one image
        self.cloud_mask, self.confidence_target, self.aux = _fp32(cloud_mask), confidence_target, aux
        self.date_confidence_target = date_confidence_target
        self.options = criterion.config.options

    @functools.cached_property
    def vgg_distances(self):
        """(perceptual, contrastive) from one VGG pass over target (and cloudy) without gradient, one over pred."""
        return self.criterion._vgg_terms(self.pred, self.target, self.cloudy)


def _cloud_focused_term(x):
    return CloudFocusedLoss(x.options["cloud_weight_factor"]).from_error(x.diff.abs(), x.target, x.cloud_mask,
                                                                         x.cloudy)


def _confidence_term(x):
    return confidence_loss(x.aux.confidence, x.target, x.cloud_mask, x.cloudy, labels=x.confidence_target)


def _date_confidence_term(x):
    if x.date_confidence_target is None:
        raise ValueError("the date_confidence term needs each input date's cloud labels (date_confidence_target)")
    return confidence_loss(x.aux.date_confidence.flatten(0, 1), x.target,
                           labels=x.date_confidence_target.flatten(0, 1))


def _residual_term(x):
    # L1 of the prediction the residual would give with the confidence at 1 everywhere: the residual learns on every
    # pixel, while the confidence decides where it is applied.
    return ((x.aux.corrected + x.aux.residual).float() - x.target).abs().mean()


def _nll_term(x):
    return nll_loss(x.pred, x.target, x.aux.log_variance, x.options["nll_distribution"])


@dataclass(frozen=True)
class Option:
    """A setting of one term that is not its weight (a training flag of its own)."""
    default: object
    help: str
    choices: tuple | None = None


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss: everything CRLoss, the training flags, checkpoints and docs/losses.md know of
    it. The term is on when its weight is > 0; its flag is --<name>_weight, and its key in CRLoss's terms (and
    TensorBoard's train/loss_<name>) is its name."""
    name: str
    weight: float  # its default weight, and the weight its alias switches it on at
    help: str
    loss: Callable  # loss(LossInputs) -> 0-d float32 tensor, unweighted
    on: bool = True  # on by default (False: only when asked for, by its weight flag or its alias)
    # The ModelConfig switch of the model part the term reads (None: any model): the default weight where the model
    # has that part, 0 where not; a weight > 0 without the part is an error.
    needs: str | None = None
    part: str = ""  # that part in words, for messages and the docs
    reads: tuple = ()  # the model's outputs the term reads (fields of net_CR_CrossAttention.ModelOutputs)
    alias: str | None = None  # the design document's switch --use_X: turns the term on at `weight`
    replaces: str | None = None  # the term this one replaces: on, it takes that term's weight and that term is off
    part_needs_it: bool = False  # the part learns from this term alone: the part with the weight at 0 is an error
    vgg: bool = False  # reads the frozen VGG's features
    options: dict = field(default_factory=dict)  # {flag name: Option}

    @property
    def default_text(self):
        """The default in words (the flag's help and docs/losses.md's table)."""
        if self.needs:
            return f"{self.weight:g} for a model with {self.part} (`{self.needs}`), else 0"
        if self.on:
            return f"{self.weight:g}"
        if not self.alias:
            return "0 (off)"
        at = f"`--{self.replaces}_weight`'s value, and `{self.replaces}` off" if self.replaces else f"{self.weight:g}"
        return f"0 (off); `--{self.alias}` turns it on at {at}"


# The one declaration of the loss terms, in the order they are summed. A new term is one entry here (and its
# function above); the flags, CRLoss, checkpoints and docs/losses.md's table follow from it.
LOSS_TERMS = (
    LossTerm("l1", 1.0, "mean absolute error to the cloud-free target", lambda x: x.diff.abs().mean()),
    LossTerm("cloud_focused", 1.0, "L1 with per-pixel weight 1 + cloud_weight_factor * cloud intensity, divided per "
             "image by the mean weight (no clouds: exactly L1); replaces l1, which would count clear pixels twice",
             _cloud_focused_term, on=False, alias="use_cloud_focused_loss", replaces="l1",
             options={"cloud_weight_factor": Option(CLOUD_WEIGHT_FACTOR, "extra weight of fully cloudy pixels in the "
                                                    "cloud-focused L1 (2.5: the design document's training command; "
                                                    "its usage example shows 2.0)")}),
    LossTerm("perceptual", 0.5, "L1 between VGG19 features of the RGB bands", lambda x: x.vgg_distances[0],
             vgg=True),
    LossTerm("contrastive", 0.1, "AECR-Net's contrastive term in VGG space: pull towards the target, push away "
             "from the cloudy input", lambda x: x.vgg_distances[1], on=False, alias="use_contrastive_loss", vgg=True),
    LossTerm("fft", 0.3, "L1 between the real and imaginary parts of the 2-D FFTs", lambda x: fft_l1(x.diff),
             on=False, alias="use_fft_loss"),
    LossTerm("gradient", 0.2, "L1 between the horizontal and vertical image gradients", lambda x: gradient_l1(x.diff),
             on=False, alias="use_gradient_loss"),
    # The cloud-aware residual's two terms (BENCHMARKS.md, "Learning and ablations"): supervising the map makes it a
    # cloud map (ROC AUC against the true clouds 0.91 -> 0.99, +1.5 dB overall), and the residual term lets the gated
    # residual learn on clear pixels too (+1.3 dB overall, +1.9 dB on cloudy pixels); three seeds each.
    LossTerm("confidence", 0.5, "BCE that teaches the confidence map where clouds are (the true cloud map of "
             "synthetic data, else the cloud mask)", _confidence_term, needs="use_cloud_predictor",
             part="the cloud confidence map", reads=("confidence",)),
    # Several dates: each date's own map, which weighs that date in the fusion and the base (BENCHMARKS.md, "Time
    # series"); without it the dates' maps learn only from the reconstruction.
    LossTerm("date_confidence", 0.5, "BCE that teaches each input date's confidence map where that date's clouds are "
             "(its true cloud map, else its cloud mask): the maps that weigh the dates in the temporal fusion and the "
             "base", _date_confidence_term, needs="input_t", part="several input dates",
             reads=("date_confidence",)),
    LossTerm("residual", 0.5, "L1 of corrected + residual (the prediction with the confidence at 1) on every pixel, "
             "so the residual learns on clear pixels too", _residual_term, needs="use_cloud_predictor",
             part="the cloud confidence map", reads=("corrected", "residual")),
    # The weight docs/uncertainty.md's measurements used. The term reaches the head alone and training clips the
    # head's gradient apart from the network's, so the weight moves nothing else; AdamW's step hardly depends on a
    # gradient's scale, so it mostly sets whether --grad_clip bites on the head's gradient.
    LossTerm("nll", 0.1, "negative log-likelihood of the target under the uncertainty head's per-pixel variance "
             "(the prediction is detached: it trains the head only)", _nll_term, needs="use_uncertainty_head",
             part="the uncertainty head", reads=("log_variance",), part_needs_it=True,
             options={"nll_distribution": Option("laplace", "error distribution of the NLL term: laplace (the one "
                                                 "the L1 terms assume) or gaussian (UnCRtainTS's); laplace ranked the "
                                                 "error better where both were measured (docs/uncertainty.md)",
                                                 NLL_DISTRIBUTIONS)}),
)
TERMS = {term.name: term for term in LOSS_TERMS}
OPTIONS = {name: option for term in LOSS_TERMS for name, option in term.options.items()}
# What a loss configuration is resolved from (training flags, CRLoss keywords): weights, aliases, options.
GIVEN_NAMES = ([f"{t.name}_weight" for t in LOSS_TERMS] + [t.alias for t in LOSS_TERMS if t.alias] + list(OPTIONS))


@dataclass(frozen=True)
class LossConfig:
    """The resolved losses of a run: every term's weight (0 = off) and the terms' options. CRLoss is built from it
    and a checkpoint stores it (as a dict, "loss_config"), so a resumed run keeps its losses."""
    weights: dict
    options: dict

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(TERMS)) + sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown loss terms or options {unknown}; known: {list(TERMS)}, {list(OPTIONS)}")
        negative = {f"{name}_weight": w for name, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        for name, value in self.options.items():
            if OPTIONS[name].choices and value not in OPTIONS[name].choices:
                raise ValueError(f"{name} must be one of {OPTIONS[name].choices}, got {value!r}")
        if self.options.get("cloud_weight_factor", 0) < 0:
            raise ValueError(f"cloud_weight_factor must be >= 0, got {self.options['cloud_weight_factor']}")

    @property
    def enabled(self):
        """{term: weight} of the terms that are on, in LOSS_TERMS's order."""
        return {name: float(self.weights[name]) for name in TERMS if self.weights.get(name, 0) > 0}

    def flat(self):
        """{flag dest: value}: --<term>_weight for every term and every option."""
        return {**{f"{name}_weight": float(w) for name, w in self.weights.items()}, **self.options}

    @classmethod
    def from_stored(cls, stored):
        """From a checkpoint's dict: a term added after it was written was not trained with (0), an option takes
        its default."""
        return cls({name: stored["weights"].get(name, 0.0) for name in TERMS},
                   {name: stored["options"].get(name, o.default) for name, o in OPTIONS.items()})


def has_part(model, switch):
    """Whether a model config (ModelConfig, DSen2CRConfig, a dict of its fields; None: no model) has the part that
    the switch turns on; switch None: any model."""
    if switch is None:
        return True
    if model is None:
        return False
    return bool(model.get(switch, False) if isinstance(model, dict) else getattr(model, switch, False))


def _apply_given(term, given, weights):
    """The term's weight after the given flags: --<name>_weight wins; its alias switches it on at its default
    weight (a replacing term at the replaced term's weight) unless it is on already; alias=False (a keyword) is off."""
    explicit, switch = given.get(f"{term.name}_weight"), given.get(term.alias) if term.alias else None
    if switch is False:
        return 0.0
    if explicit is not None:
        return float(explicit)
    if switch and weights[term.name] == 0:
        return weights[term.replaces] if term.replaces else term.weight
    return weights[term.name]


def resolve(given=None, model=None, stored=None):
    """The LossConfig of: `stored` (a resumed run's) or else every term's default for `model` (its config; None: a
    bare criterion, whose model-dependent terms are off), changed by `given` ({name in GIVEN_NAMES: value}, None or
    absent = not given). A replacing term that is on turns the term it replaces off."""
    given = {name: value for name, value in (given or {}).items() if value is not None}
    unknown = sorted(set(given) - set(GIVEN_NAMES))
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; known: {GIVEN_NAMES}")
    if stored is None:
        weights = {t.name: t.weight if t.on and has_part(model, t.needs) else 0.0 for t in LOSS_TERMS}
        options = {name: option.default for name, option in OPTIONS.items()}
    else:
        weights, options = dict(stored.weights), dict(stored.options)
    for term in LOSS_TERMS:
        weights[term.name] = _apply_given(term, given, weights)
        if term.replaces and weights[term.name] > 0:
            weights[term.replaces] = 0.0
    options.update({name: given[name] for name in OPTIONS if name in given})
    return LossConfig(weights, options)


def given_flags(namespace):
    """{name: value} of the loss flags in an argparse namespace (a flag not given is absent or None)."""
    return {name: getattr(namespace, name, None) for name in GIVEN_NAMES}


def check_model(config, model, model_name):
    """ValueError where the terms and the model's parts do not go together: a term on without the part it reads,
    or a part that learns from a term alone with that term off (under DDP its parameters would get no gradient)."""
    for term in LOSS_TERMS:
        weight, has = config.weights[term.name], has_part(model, term.needs)
        if weight > 0 and not has:
            raise ValueError(f"--{term.name}_weight {weight:g} needs {term.part}, which this {model_name} does not "
                             f"have (a CrossAttention model has it with --{term.needs}); set --{term.name}_weight 0")
        if term.part_needs_it and has and weight <= 0:
            raise ValueError(f"the model has {term.part} but --{term.name}_weight is 0, so it would not learn; pass "
                             f"--{term.name}_weight > 0 (or --no-{term.needs})")


def terms_markdown():
    """docs/losses.md's table of terms, made from LOSS_TERMS (tests/test_losses.py holds the docs to it)."""
    rows = ["| term (key in `terms`) | flags | default weight | reads from the model | what it is |",
            "| --- | --- | --- | --- | --- |"]
    for t in LOSS_TERMS:
        flags = [f"--{t.name}_weight", *([f"--{t.alias}"] if t.alias else []), *(f"--{o}" for o in t.options)]
        reads = ", ".join(f"`{key}`" for key in t.reads) or "-"
        rows.append(f"| `{t.name}` | {', '.join(f'`{f}`' for f in flags)} | {t.default_text} | {reads} | {t.help} |")
    return "\n".join(rows)


# Named loss sets, each spelled out once: the demo, benchmark.py and the tests take them from here. Spelled as
# CRLoss keywords (the training flags: weights, the design document's --use_X aliases, options).
LOSS_PRESETS = {
    "default": {},  # every term at its default: L1 + perceptual (+ the model-dependent terms for a model with the part)
    "l1": {"perceptual_weight": 0.0},
    # the design document's training command
    "design": {"l1_weight": 1.0, "perceptual_weight": 0.5, "use_fft_loss": True, "fft_weight": 0.3,
               "use_gradient_loss": True, "gradient_weight": 0.2, "use_contrastive_loss": True,
               "contrastive_weight": 0.1, "use_cloud_focused_loss": True, "cloud_weight_factor": 2.5},
}
# The design's set without its two VGG terms, for runs where pretrained VGG weights cannot be had (random VGG
# features measure nothing perceptual): the demo offline, the learning benchmark, the tests.
LOSS_PRESETS["design_no_vgg"] = {**LOSS_PRESETS["design"], "perceptual_weight": 0.0, "use_contrastive_loss": False}


def loss_options(preset, **overrides):
    """CRLoss keywords: the named preset, then `overrides` (loss flags, or vgg_weights)."""
    if preset not in LOSS_PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; known: {sorted(LOSS_PRESETS)}")
    unknown = sorted(set(overrides) - set(GIVEN_NAMES) - {"vgg_weights"})
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; known: {GIVEN_NAMES + ['vgg_weights']}")
    return {**LOSS_PRESETS[preset], **overrides}


def preset_flags(preset, **overrides):
    """The training script's flags that give loss_options(preset, **overrides): --<term>_weight and --<option> for
    every value that differs from the defaults (--vgg_weights where given)."""
    options = loss_options(preset, **overrides)
    vgg_weights = options.pop("vgg_weights", VGG_WEIGHTS_DEFAULT)
    wanted, defaults = resolve(options).flat(), resolve().flat()
    flags = [arg for name, value in wanted.items() if value != defaults[name] for arg in (f"--{name}", str(value))]
    return flags + (["--vgg_weights", str(vgg_weights)] if vgg_weights != VGG_WEIGHTS_DEFAULT else [])


class CRLoss(nn.Module):
    """Weighted sum of the terms of a LossConfig that are on (weight > 0), in LOSS_TERMS's order.

    CRLoss(config) or CRLoss(**options), options as for resolve(): e.g. CRLoss(perceptual_weight=0, fft_weight=0.3);
    a bare criterion knows no model, so the terms that need a model part (confidence, residual, nll) are off unless
    given. forward(pred, target, cloudy, cloud_mask=None, confidence_target=None, aux=None) -> (total, terms):
    confidence_target (N,1,H,W) labels the confidence term (default: the soft cloud intensity); aux is the model's
    ModelOutputs (`reads` names the fields the terms read: confidence, corrected, residual, log_variance); terms maps
    each enabled term's name to its weighted, detached value. vgg_weights: where the VGG terms' weights come from
    (VGGFeatures); vgg_dtype: torch.bfloat16 / torch.float16 runs the VGG layers up to relu4_1 under autocast (the
    training script passes its AMP dtype; the loss matches float32 VGG to the tolerance tests/test_losses.py
    states), None keeps them in float32.
    """

    def __init__(self, config=None, vgg_layers=tuple(VGG_LAYER_WEIGHTS), vgg_dtype=None,
                 vgg_weights=VGG_WEIGHTS_DEFAULT, **options):
        super().__init__()
        if config is not None and options:
            raise TypeError(f"pass a LossConfig or loss options, not both (got {sorted(options)})")
        self.config = resolve(options) if config is None else config
        self.weights = self.config.enabled
        if not self.weights:
            raise ValueError("every loss term is disabled (all weights 0): nothing to train on")
        self.terms = [TERMS[name] for name in self.weights]
        self.reads = tuple(dict.fromkeys(key for term in self.terms for key in term.reads))
        self.layer_weights = tuple(VGG_LAYER_WEIGHTS[name] for name in vgg_layers)
        uses_vgg = any(term.vgg for term in self.terms)
        self.vgg = VGGFeatures(vgg_weights, vgg_layers) if uses_vgg else None
        self.vgg_dtype = vgg_dtype
        # Built once and moved with the module (.to(device)), not rebuilt on every call.
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def vgg_forward_count(self):
        return 0 if self.vgg is None else self.vgg.forward_count

    def _vgg_features(self, x):
        """VGG features of 13-band images, the convolutions up to relu4_1 at vgg_dtype (float32 when None)."""
        rgb = rgb_for_vgg(x, self.imagenet_mean, self.imagenet_std)
        if self.vgg.features[0].weight.is_contiguous(memory_format=torch.channels_last):
            rgb = rgb.contiguous(memory_format=torch.channels_last)
        return self.vgg(rgb, dtype=self.vgg_dtype)

    def _vgg_terms(self, pred, target, cloudy):
        """Perceptual and contrastive terms: target (and cloudy) features in one forward without gradient, the
        prediction's in one with; distances in float32."""
        with_negative = "contrastive" in self.weights
        n = pred.shape[0]
        with torch.no_grad():
            reference = self._vgg_features(torch.cat([target, cloudy]) if with_negative else target)
        perceptual = pred.new_zeros(())
        contrastive = pred.new_zeros(())
        for w, f_pred, f_ref in zip(self.layer_weights, self._vgg_features(pred), reference):
            f_pred = f_pred.float()
            d_positive = F.l1_loss(f_pred, f_ref[:n].float())
            perceptual = perceptual + w * d_positive
            if with_negative:
                d_negative = F.l1_loss(f_pred, f_ref[n:].float())
                contrastive = contrastive + w * d_positive / (d_negative + EPS)
        return perceptual, contrastive

    def forward(self, pred, target, cloudy, cloud_mask=None, confidence_target=None, aux=None,
                date_confidence_target=None):
        if pred.shape != target.shape or pred.shape != cloudy.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and cloudy "
                             f"{tuple(cloudy.shape)} must have the same shape")
        with torch.autocast(pred.device.type, enabled=False):
            x = LossInputs(self, pred.float(), target.float(), cloudy.float(), cloud_mask, confidence_target, aux,
                           date_confidence_target)
            weighted = {term.name: self.weights[term.name] * self._term(term, x) for term in self.terms}
            total = sum(weighted.values())
        return total, {name: value.detach() for name, value in weighted.items()}

    @staticmethod
    def _term(term, x):
        missing = [key for key in term.reads if x.aux is None or getattr(x.aux, key) is None]
        if missing:
            raise ValueError(f"{term.name}_weight > 0 but the model returned no {', '.join(missing)} output (the "
                             f"term needs {term.part}): set --{term.name}_weight 0")
        return term.loss(x)


def build_criterion(args, vgg_dtype=None, model=None):
    """CRLoss from the training script's argparse namespace (flags not given take their defaults for `model`, a
    model config; None: the model-dependent terms are off); vgg_dtype: the precision of the VGG convolutions
    (training passes its autocast dtype; None = float32)."""
    return CRLoss(resolve(given_flags(args), model), vgg_dtype=vgg_dtype,
                  vgg_weights=getattr(args, "vgg_weights", VGG_WEIGHTS_DEFAULT))
