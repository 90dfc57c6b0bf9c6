"""`benchmark.py eval`: evaluation images/s and whole-scene prediction time and peak memory on CPU."""
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
import torch
from rasterio.transform import from_origin

import bench_process
import inference
import net_CR_CrossAttention as net
import runtime
import synthetic_sets
import test_CR

# ------------------------------------------------------------------------------ evaluation, whole-scene prediction

def scene_worker(ckpt, cloudy, sar, out, tile, overlap, batch, amp, threads):
    """Whole-scene prediction in a fresh process (in_fresh_process): seconds and peak memory of that alone."""
    torch.set_num_threads(threads)
    model, _ = runtime.load_model(ckpt, torch.device("cpu"))
    amp_dtype = runtime.resolve_amp(amp, torch.device("cpu"))[0]
    rss_model = bench_process.peak_rss_mb()
    t0 = time.perf_counter()
    inference.predict_scene(model, cloudy, sar, out, tile=tile, overlap=overlap, batch_sz=batch, amp_dtype=amp_dtype,
                          progress=False)
    return {"seconds": time.perf_counter() - t0, "rss_after_model_mb": rss_model,
            "peak_rss_mb": bench_process.peak_rss_mb()}


def _add_eval_args(parser):
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to time (default: a randomly initialised default CrossAttention; speed "
                             "does not depend on the weights)")
    parser.add_argument("--n", type=int, default=8, help="synthetic patches evaluated for images/s (default 8)")
    parser.add_argument("--size", type=int, default=256, help="synthetic patch side (default 256, as real data)")
    parser.add_argument("--batch", type=int, default=4, help="images / tiles per forward pass (default 4)")
    parser.add_argument("--scenes", default="1024,2048", help="comma list of square scene sides to predict")
    parser.add_argument("--tile", type=int, default=256, help="whole-scene tile side (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="whole-scene tile overlap (default 32)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                        help="autocast on CPU (auto = the training script's CPU choice)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def bench_eval(args):
    """Evaluation images/s (test_CR.evaluate) and whole-scene prediction time and peak RSS on CPU."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            model = net.create_model("CrossAttention")
            ckpt = tmp / "random.pth"
            torch.save({"model": model.state_dict(), "model_name": "CrossAttention",
                        "model_config": asdict(model.config), "epoch": 0}, ckpt)
        csv_path = synthetic_sets.make_synthetic_dataset(tmp / "data", n=args.n, size=args.size, seed=0,
                                                     val_frac=0.0, test_frac=0.0)
        # Evaluate every patch: the synthetic list puts them all in split 1 (train) with these fractions.
        summary = test_CR.evaluate(test_CR.build_parser().parse_args([
            "--checkpoint", str(ckpt), "--data_list_filepath", str(csv_path), "--input_data_folder",
            str(tmp / "data"), "--split", "train", "--results_dir", str(tmp / "results"), "--batch_sz",
            str(args.batch), "--num_workers", "0", "--device", "cpu", "--amp", args.amp]))
        figures = {"checkpoint": str(args.checkpoint or "random CrossAttention (default config)"),
                   "threads": args.threads, "amp": summary["amp"], "eval_images": summary["n_images"],
                   "eval_size": args.size, "eval_images_per_s": summary["images_per_s"],
                   "eval_model_images_per_s": summary["model_images_per_s"], "scenes": {}}
        rng = np.random.default_rng(0)
        for side in (int(s) for s in args.scenes.split(",")):
            cloudy, sar = tmp / f"s2_{side}.tif", tmp / f"s1_{side}.tif"
            georef = dict(driver="GTiff", height=side, width=side, crs="EPSG:32631",
                          transform=from_origin(500000.0, 5600000.0, 10.0, 10.0))
            with rasterio.open(cloudy, "w", count=13, dtype="uint16", **georef) as s2, \
                    rasterio.open(sar, "w", count=2, dtype="float32", **georef) as s1:
                for y in range(0, side, 256):  # written in strips: the parent stays small too
                    h = min(256, side - y)
                    win = rasterio.windows.Window(0, y, side, h)
                    s2.write(rng.integers(0, 6000, (13, h, side), dtype=np.uint16), window=win)
                    s1.write(rng.uniform(-30, 0, (2, h, side)).astype(np.float32), window=win)
            r = bench_process.in_fresh_process(scene_worker, str(ckpt), str(cloudy), str(sar),
                                               str(tmp / f"out_{side}.tif"), args.tile, args.overlap, args.batch,
                                               args.amp, args.threads)
            n_tiles = len(inference.tile_starts(side, args.tile, args.overlap)) ** 2
            r.update(tiles=n_tiles, megapixels_per_s=side * side / 1e6 / r["seconds"],
                     full_scene_fp32_accumulator_mb=(13 + 1) * side * side * 4 / 2 ** 20)
            figures["scenes"][side] = r
            for p in (cloudy, sar, tmp / f"out_{side}.tif"):
                p.unlink()
    print(f"model: {figures['checkpoint']}; CPU, {args.threads} threads, amp {figures['amp']}")
    print(f"evaluation: {figures['eval_images']} patches of {args.size} px, batch {args.batch}: "
          f"{figures['eval_images_per_s']:.2f} images/s end to end "
          f"({figures['eval_model_images_per_s']:.2f} images/s in the forward pass alone)")
    print(f"whole scene, tile {args.tile}, overlap {args.overlap}, batch {args.batch}; peak RSS of a fresh process "
          f"(VmHWM of /proc/self/status)")
    print(f"{'scene':<11}{'tiles':>6}{'seconds':>10}{'Mpx/s':>8}{'RSS model MB':>14}{'peak RSS MB':>13}"
          f"{'scene-size acc. MB':>20}")
    for side, r in figures["scenes"].items():
        print(f"{f'{side}x{side}':<11}{r['tiles']:>6}{r['seconds']:>10.1f}{r['megapixels_per_s']:>8.3f}"
              f"{r['rss_after_model_mb']:>14.0f}{r['peak_rss_mb']:>13.0f}{r['full_scene_fp32_accumulator_mb']:>20.0f}")
    return figures


# name -> (add_arguments(parser), run(args) -> dict of figures); benchmark.SUBCOMMANDS names this module
COMMANDS = {"eval": (_add_eval_args, bench_eval)}
