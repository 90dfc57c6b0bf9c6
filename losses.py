"""Training losses for SAR-optical cloud removal: L1 (or cloud-focused L1), perceptual, FFT, gradient,
AECR-Net contrastive regularisation, optional confidence-map and residual terms, and the negative log-likelihood
that trains the uncertainty head (docs/uncertainty.md).

    criterion = build_criterion(args)                     # args: the training script's argparse namespace
    total, terms = criterion(pred, target, cloudy, cloud_mask=cloud_mask, confidence=confidence)

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
import math
import os
import socket
import urllib.request
import warnings

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

# The one table of loss defaults: CRLoss, build_criterion and the training script's flags all read it.
LOSS_DEFAULTS = {
    "l1_weight": 1.0,
    "perceptual_weight": 0.5,
    "use_fft_loss": False,
    "fft_weight": 0.3,
    "use_gradient_loss": False,
    "gradient_weight": 0.2,
    "use_contrastive_loss": False,
    "contrastive_weight": 0.1,
    "use_cloud_focused_loss": False,
    # 2.5 as in the design document's training command (its "Usage" example shows 2.0); the ablation table in
    # BENCHMARKS.md was measured with 2.5.
    "cloud_weight_factor": 2.5,
    # Terms that need the model's confidence map: off here (a criterion cannot know the model); training turns
    # them on for a model that has one, with MAP_LOSS_DEFAULTS.
    "confidence_weight": 0.0,
    "residual_weight": 0.0,
    # The NLL term needs the model's uncertainty head: off here, on for a model with one (HEAD_LOSS_DEFAULTS).
    "nll_weight": 0.0,
    "nll_distribution": "laplace",
    "vgg_weights": "imagenet",
}
NLL_DISTRIBUTIONS = ("gaussian", "laplace")


# Named loss sets, each spelled out once: the demo, benchmark.py and the tests take them from here.
LOSS_PRESETS = {
    "default": {},  # LOSS_DEFAULTS as they stand: L1 + perceptual (+ MAP_LOSS_DEFAULTS for a model with a map)
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
    """Every CRLoss option: LOSS_DEFAULTS, then the named preset, then `overrides`."""
    if preset not in LOSS_PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; known: {sorted(LOSS_PRESETS)}")
    unknown = sorted(set(overrides) - set(LOSS_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; known: {sorted(LOSS_DEFAULTS)}")
    return {**LOSS_DEFAULTS, **LOSS_PRESETS[preset], **overrides}


def preset_flags(preset, **overrides):
    """The training script's command-line flags that give loss_options(preset, **overrides): every option that
    differs from its default, as --use_X for switches and --name value for the rest."""
    flags = []
    for name, value in loss_options(preset, **overrides).items():
        if value == LOSS_DEFAULTS[name]:
            continue
        if isinstance(value, bool):
            if not value:  # every switch defaults to off, so an "off" always equals its default
                raise ValueError(f"{name}=False cannot be written as a flag")
            flags.append(f"--{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


class VGGWeightsError(RuntimeError):
    """The VGG weights asked for cannot be had (offline without a cached copy, unreadable or foreign file)."""


# The cloud-aware residual (BENCHMARKS.md, "Learning and ablations"), the training defaults for a model with a
# confidence map: supervising the map makes it a cloud map (ROC AUC against the true clouds 0.91 -> 0.99, +1.5 dB
# overall), and the residual term lets the gated residual learn on clear pixels too (+1.3 dB overall, +1.9 dB on
# cloudy pixels); three seeds each, the default model with and without each term.
MAP_LOSS_DEFAULTS = {"confidence_weight": 0.5, "residual_weight": 0.5}
# The training default for a model with an uncertainty head (the weight docs/uncertainty.md's measurements used). The
# term reaches the head alone and training clips the head's gradient apart from the network's, so the weight moves
# nothing else; AdamW's step hardly depends on a gradient's scale, so it mostly sets whether --grad_clip bites on
# the head's gradient.
HEAD_LOSS_DEFAULTS = {"nll_weight": 0.1}
# The terms whose training default depends on the model (its flag defaults to None until the model is known).
PER_MODEL_DEFAULTS = {**MAP_LOSS_DEFAULTS, **HEAD_LOSS_DEFAULTS}


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

    def __init__(self, cloud_weight_factor=LOSS_DEFAULTS["cloud_weight_factor"]):
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


class CRLoss(nn.Module):
    """Weighted sum of the enabled terms. A term is enabled when its flag is on and its weight > 0.

    forward(pred, target, cloudy, cloud_mask=None, confidence=None, confidence_target=None, ungated=None,
    log_variance=None) -> (total, terms): confidence_target (N,1,H,W) labels the confidence term (default: the soft
    cloud intensity); ungated is the prediction with the confidence at 1 everywhere, which the residual term scores;
    log_variance (N,13,H,W) is the uncertainty head's output, which the NLL term scores. terms maps each enabled
    term's name ("l1" or "cloud_focused", "perceptual", "fft", "gradient", "contrastive", "confidence", "residual",
    "nll") to its weighted, detached value. The cloud-focused loss REPLACES plain L1 and is
    weighted by l1_weight (it equals plain L1 when there are no clouds, so adding both would double-count).
    vgg_dtype: torch.bfloat16 / torch.float16 runs the VGG layers up to relu4_1 under autocast (the training
    script passes its AMP dtype; the loss matches float32 VGG to the tolerance tests/test_losses.py states), None
    keeps them in float32.
    """

    def __init__(self, vgg_layers=tuple(VGG_LAYER_WEIGHTS), vgg_dtype=None, **options):
        super().__init__()
        unknown = sorted(set(options) - set(LOSS_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown loss options {unknown}; known: {sorted(LOSS_DEFAULTS)}")
        o = {**LOSS_DEFAULTS, **options}
        negative = {k: v for k, v in o.items() if k.endswith("_weight") and v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        switched = {  # term -> (its switch, its weight); the cloud-focused L1 replaces plain L1
            "cloud_focused" if o["use_cloud_focused_loss"] else "l1": (True, o["l1_weight"]),
            "perceptual": (True, o["perceptual_weight"]),
            "fft": (o["use_fft_loss"], o["fft_weight"]),
            "gradient": (o["use_gradient_loss"], o["gradient_weight"]),
            "contrastive": (o["use_contrastive_loss"], o["contrastive_weight"]),
            "confidence": (True, o["confidence_weight"]),
            "residual": (True, o["residual_weight"]),
            "nll": (True, o["nll_weight"]),
        }
        self.weights = {name: float(w) for name, (on, w) in switched.items() if on and w > 0}
        if not self.weights:
            raise ValueError("every loss term is disabled (all weights 0): nothing to train on")
        if o["nll_distribution"] not in NLL_DISTRIBUTIONS:
            raise ValueError(f"nll_distribution must be one of {NLL_DISTRIBUTIONS}, got {o['nll_distribution']!r}")
        self.nll_distribution = o["nll_distribution"]
        self.cloud_focused = CloudFocusedLoss(o["cloud_weight_factor"]) if o["use_cloud_focused_loss"] else None
        self.layer_weights = tuple(VGG_LAYER_WEIGHTS[name] for name in vgg_layers)
        uses_vgg = "perceptual" in self.weights or "contrastive" in self.weights
        self.vgg = VGGFeatures(o["vgg_weights"], vgg_layers) if uses_vgg else None
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

    def forward(self, pred, target, cloudy, cloud_mask=None, confidence=None, confidence_target=None, ungated=None,
                log_variance=None):
        if pred.shape != target.shape or pred.shape != cloudy.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and cloudy "
                             f"{tuple(cloudy.shape)} must have the same shape")
        with torch.autocast(pred.device.type, enabled=False):
            pred, target, cloudy = pred.float(), target.float(), cloudy.float()
            diff = pred - target  # every pixel-space term reads this one image
            raw = {}
            if "l1" in self.weights:
                raw["l1"] = diff.abs().mean()
            if "cloud_focused" in self.weights:
                raw["cloud_focused"] = self.cloud_focused.from_error(diff.abs(), target, _fp32(cloud_mask), cloudy)
            if self.vgg is not None:
                perceptual, contrastive = self._vgg_terms(pred, target, cloudy)
                if "perceptual" in self.weights:
                    raw["perceptual"] = perceptual
                if "contrastive" in self.weights:
                    raw["contrastive"] = contrastive
            if "fft" in self.weights:
                raw["fft"] = fft_l1(diff)
            if "gradient" in self.weights:
                raw["gradient"] = gradient_l1(diff)
            if "confidence" in self.weights:
                if confidence is None:
                    raise ValueError("confidence_weight > 0 but the model returned no confidence map "
                                     "(DSen2CR, or CrossAttention without its cloud predictor): "
                                     "set --confidence_weight 0")
                raw["confidence"] = confidence_loss(confidence, target, _fp32(cloud_mask), cloudy,
                                                    labels=confidence_target)
            if "residual" in self.weights:
                if ungated is None:
                    raise ValueError("residual_weight > 0 but the model returned no residual (DSen2CR, or "
                                     "CrossAttention without its cloud predictor): set --residual_weight 0")
                # L1 of the prediction the residual would give with the confidence at 1 everywhere: the residual
                # learns on every pixel, while the confidence decides where it is applied.
                raw["residual"] = (ungated.float() - target).abs().mean()
            if "nll" in self.weights:
                if log_variance is None:
                    raise ValueError("nll_weight > 0 but the model returned no log-variance (a model without the "
                                     "uncertainty head): set --nll_weight 0 or train with --use_uncertainty_head")
                raw["nll"] = nll_loss(pred, target, log_variance, self.nll_distribution)
            weighted = {name: self.weights[name] * value for name, value in raw.items()}
            total = sum(weighted.values())
        return total, {name: value.detach() for name, value in weighted.items()}


def build_criterion(args, vgg_dtype=None):
    """CRLoss from the training script's argparse namespace (missing attributes take LOSS_DEFAULTS); vgg_dtype: the
    precision of the VGG convolutions (training passes its autocast dtype; None = float32)."""
    opts = {name: getattr(args, name, default) for name, default in LOSS_DEFAULTS.items()}
    return CRLoss(vgg_dtype=vgg_dtype, **opts)
