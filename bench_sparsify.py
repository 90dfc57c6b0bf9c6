"""`benchmark.py sparsify`: how far an uncertainty head's own stds can go (sparsification of the model's errors
against errors drawn from the predicted distribution)."""
import contextlib
from pathlib import Path

import numpy as np
import torch

import datalist
import dataloader
import inference
import metrics
import runtime

# ----------------------------------------------------------------------------------------- uncertainty: sparsification
# How far can a head's own stds go? The RMSE fall when the most uncertain pixels are removed, for the model's real
# errors and for errors drawn from the distributions the head predicts (what a perfectly calibrated head with the
# same stds would give): if both fall alike, the limit is the spread of the stds, not their calibration.

def _add_sparsify_args(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with the uncertainty head")
    parser.add_argument("--data_list_filepath", required=True, help="CSV list of the data set")
    parser.add_argument("--split", default="test", help="rows of the list to use")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn errors")


def bench_sparsify(args):
    """Sparsification of a head's stds: the model's errors against errors drawn from the predicted Laplace."""
    model, _ = runtime.load_model(args.checkpoint, torch.device("cpu"))
    rows = datalist.select_split(datalist.read_data_list(args.data_list_filepath), args.split)
    dataset = dataloader.SEN12MSCRDataset(rows, str(Path(args.data_list_filepath).parent), augment=False)
    rng, std, se, drawn = np.random.default_rng(args.seed), [], [], []
    for sample in (dataset[i] for i in range(len(dataset))):
        out = inference.forward_all(model, sample["cloudy_data"][None], sample["SAR_data"][None],
                                  contextlib.nullcontext())
        band_std = out["variance"][0].sqrt().numpy()
        error = (out["prediction"][0] - sample["cloudfree_data"]).numpy()
        std.append(band_std.mean(0).ravel())
        se.append((error ** 2).mean(0).ravel())
        drawn.append((rng.laplace(0.0, band_std / np.sqrt(2.0)) ** 2).mean(0).ravel())  # Laplace scale = std / sqrt 2
    std = np.concatenate(std)
    figures = {"std_percentiles_50_90_99": np.percentile(std, [50, 90, 99]).tolist()}
    for name, squared in (("model", np.concatenate(se)), ("drawn_laplace", np.concatenate(drawn))):
        curve = metrics.sparsification(std, squared)
        at = curve["removed"].index(0.10)
        figures[name] = {"fall_10_pct": 100 * (1 - curve["rmse"][at] / curve["rmse"][0]),
                         "oracle_fall_10_pct": 100 * (1 - curve["oracle_rmse"][at] / curve["oracle_rmse"][0]),
                         "spearman": metrics.spearman(std, np.sqrt(squared))}
        print(f"{name:<14} RMSE fall with the 10 % most uncertain pixels removed {figures[name]['fall_10_pct']:.1f} % "
              f"(oracle {figures[name]['oracle_fall_10_pct']:.1f} %), Spearman {figures[name]['spearman']:.3f}")
    print(f"std percentiles 50 / 90 / 99: {' / '.join(f'{v:.4f}' for v in figures['std_percentiles_50_90_99'])}")
    return figures


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"sparsify": (_add_sparsify_args, bench_sparsify)}
