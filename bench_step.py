"""The training step as training runs it, for the benchmarks that time it: a run holding what
train_CR_kaggle.train_step reads, random batches put on the device, device synchronisation."""

import torch

import runtime
import train_CR_kaggle as train
import training
import training_setup

# ------------------------------------------------------------------------------ the training step, as training runs it
# Every timed training step below is train_CR_kaggle.train_step on a batch already on the device: forward under the
# run's autocast, the criterion, backward, gradient clipping, the optimizer step and the batch PSNR, as training
# runs them.

def step_run(model, criterion, device, amp, channels_last, train_model=None):
    """A train_CR_kaggle.Run holding what train_step reads, made from the parts setup() makes it from (the training
    flags' defaults, runtime.resolve_amp, train_CR_kaggle.build_optimizer, a GradScaler for fp16) but without a data
    list or a run folder: `loss` and `train` time the step on batches of their own. No learning-rate warm-up."""
    args = train.build_parser().parse_args(["--amp", amp, "--warmup_epochs", "0"])
    amp_dtype, use_scaler = runtime.resolve_amp(amp, device)
    run = training.Run(args=args, argv=[], device=device, amp_dtype=amp_dtype, ctx=runtime.autocast(device, amp_dtype),
                    channels_last=channels_last, criterion=criterion, model=model,
                    train_model=model if train_model is None else train_model)
    run.optimizer, run.scheduler = training_setup.build_optimizer(args, model, device)
    run.clip_groups = training.clip_groups(model)
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return run


def random_batch(n, size, device, channels_last, input_t=1):
    """A training batch of random reflectances (cloudy brighter than cloud-free), put on the device by the
    training's own train_CR_kaggle.to_device; input_t > 1: input_t dates per sample (N,T,C,H,W)."""
    dates = (n,) if input_t == 1 else (n, input_t)
    batch = {"cloudy_data": torch.rand(*dates, 13, size, size) * 0.8,
             "cloudfree_data": torch.rand(n, 13, size, size) * 0.3,
             "SAR_data": torch.rand(*dates, 2, size, size), "cloud_mask": torch.rand(*dates, 1, size, size)}
    return training.to_device(batch, device, channels_last)


def synchronizer(device):
    """A function that waits for the device's queued work (CUDA); on CPU the work is done when the call returns."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

