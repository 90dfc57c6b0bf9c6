"""The cloud-aware residual measured against the truth: true cloud maps of the synthetic data, precomputed detector
masks, confidence-map metrics, the date correction and the confidence target of training."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torchmetrics.functional.classification import binary_auroc

import bands
import cloud_masks
import clouds
import datalist
import dataloader as D
import files
import metrics
import net_CR_CrossAttention as net
import rasters
import runtime
import scoring
import synthetic
import test_CR
import train_CR_kaggle as train
import training

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- true cloud maps

def test_truth_is_written_beside_the_cloudy_image_with_its_georeference(synthetic_dataset):
    root, csv_path = synthetic_dataset
    for t in datalist.read_data_list(csv_path):
        path = root / rasters.truth_path(t.s2_cloudy)
        assert "cloud_truth" in str(path) and path.is_file()
        with rasterio.open(path) as truth, rasterio.open(root / t.s2_cloudy) as cloudy:
            assert truth.count == 2 and truth.dtypes == ("float32", "float32")
            assert truth.descriptions == rasters.TRUTH_BANDS
            assert truth.crs == cloudy.crs and truth.transform == cloudy.transform and truth.shape == cloudy.shape
            values = truth.read()
        assert values.min() >= 0 and values.max() <= 1
    assert rasters.truth_path("s2_cloudy/p.tif") == "cloud_truth/p.tif"
    assert rasters.truth_path("cloudy/p.tif") is None  # a layout without the word has no truth (not the image itself)


def test_truth_explains_the_cloudy_image(synthetic_dataset):
    """Where the truth says clear, the cloudy image is the cloud-free one times the date's per-band gain; where it
    says cloud, the cloudy image is brighter in the visible bands."""
    root, csv_path = synthetic_dataset
    cloudy_seen = 0
    for t in datalist.read_data_list(csv_path):
        clear = bands.normalize_s2(rasters.read_raster(root / t.s2_cloudfree, 13))
        cloudy = bands.normalize_s2(rasters.read_raster(root / t.s2_cloudy, 13))
        opacity, shadow = rasters.read_raster(root / rasters.truth_path(t.s2_cloudy), 2)
        free = (opacity == 0) & (shadow == 0)
        if free.sum() > 100:
            ratio = cloudy[:, free] / np.maximum(clear[:, free], 1e-3)
            bright = clear[:, free] > 0.05  # skip dark bands, where the uint16 rounding dominates the ratio
            for band in range(13):
                r = ratio[band][bright[band]]
                if r.size:
                    assert np.median(np.abs(r - np.median(r))) < 0.01, band  # one gain per band
        thick = opacity > 0.5
        if thick.sum() > 50:
            cloudy_seen += 1
            assert (cloudy[1:4, thick] > clear[1:4, thick]).mean() > 0.9
    assert cloudy_seen > 0


def test_dataset_returns_the_truth_augmented_with_the_images(synthetic_dataset):
    root, csv_path = synthetic_dataset
    triplets = datalist.read_data_list(csv_path)
    plain = D.SEN12MSCRDataset(triplets, root, augment=False)
    torch.manual_seed(5)
    augmented = D.SEN12MSCRDataset(triplets, root, augment=True, crop_size=32)
    for i in range(len(triplets)):
        a = augmented[i]
        assert a["cloud_truth"].shape == (2, 32, 32)
        # the same flips and rotations: the truth map still explains the cloudy crop
        cloudy = a["cloudy_data"][1:4].mean(0)
        clear = a["cloudfree_data"][1:4].mean(0)
        thick = a["cloud_truth"][0] > 0.5
        if thick.sum() > 20:
            assert (cloudy[thick] > clear[thick]).float().mean() > 0.9
    assert plain[0]["cloud_truth"].shape == (2, 64, 64)


def test_a_partial_truth_set_is_an_error(synthetic_dataset, tmp_path):
    import shutil
    root, csv_path = synthetic_dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    triplets = datalist.read_data_list(copy / "data.csv")
    (copy / rasters.truth_path(triplets[3].s2_cloudy)).unlink()
    with pytest.raises(files.DataError, match="cloud_truth"):
        D.SEN12MSCRDataset(triplets, copy)
    for t in triplets:  # none at all: real data, no truth key
        (copy / rasters.truth_path(t.s2_cloudy)).unlink(missing_ok=True)
    assert "cloud_truth" not in D.SEN12MSCRDataset(triplets, copy)[0]


def test_land_cover_table_is_the_clustering_of_the_real_sample(real_sample_dir):
    t = datalist.read_data_list(real_sample_dir / "data.csv")[0]
    s2 = bands.normalize_s2(rasters.read_raster(real_sample_dir / t.s2_cloudfree, 13))
    clusters = synthetic.land_covers_from_sample(s2, rasters.read_raster(real_sample_dir / t.s1, 2), k=5)
    for (spectrum, backscatter, _), name in zip(clusters, ("real_1", "real_2", "real_3", "real_4", "real_5")):
        table_spectrum, table_backscatter = synthetic.LAND_COVERS[name]
        np.testing.assert_allclose(spectrum, table_spectrum, atol=0.0006)
        np.testing.assert_allclose(backscatter, table_backscatter, atol=0.06)


# ----------------------------------------------------------------------------------------------- precomputed masks

@pytest.mark.slow
def test_masks_cli_precomputes_resumes_and_feeds_the_dataset(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    out = tmp_path / "masks"
    cmd = [sys.executable, "dataloader.py", "masks", "--data_list_filepath", str(csv_path), "--input_data_folder",
           str(root), "--detector", "rule", "--out", str(out), "--workers", "2"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    triplets = datalist.read_data_list(csv_path)
    assert "(12 made, 0 already there)" in first.stdout
    assert json.loads((out / cloud_masks.MASKS_INFO).read_text())["detector"] == "rule"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temp files left behind"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "(0 made, 12 already there)" in again.stdout  # resumable: nothing is done twice
    # the dataset reads them instead of running the detector: exactly the rule score of the whole raster
    ds = D.SEN12MSCRDataset(triplets, root, cloud_mask_dir=out)
    for i in (0, 5):
        whole = clouds.rule_cloud_score(bands.normalize_s2(rasters.read_raster(root / triplets[i].s2_cloudy, 13)))
        np.testing.assert_array_equal(ds[i]["cloud_mask"][0].numpy(), whole)
    assert ds.cloud_detector == "rule"
    # a missing mask names the file and the command that makes it; another detector in the same folder is refused
    (out / triplets[2].s2_cloudy).unlink()
    with pytest.raises(files.DataError, match="dataloader.py masks"):
        D.SEN12MSCRDataset(triplets, root, cloud_mask_dir=out)
    with pytest.raises(files.DataError, match="rule masks"):
        cloud_masks.make_cloud_masks(triplets, root, out, "s2cloudless", progress=False)


# ----------------------------------------------------------------------------------------------- metrics

def test_roc_auc_and_iou_against_torchmetrics():
    torch.manual_seed(0)
    score = torch.rand(3, 1, 16, 16)
    score[0, 0, :6] = 0.5  # ties count half
    label = torch.rand(3, 1, 16, 16) + 0.4 * score > 0.7
    auc = metrics.roc_auc(score, label)
    for i in range(3):
        assert math.isclose(float(auc[i]), float(binary_auroc(score[i].flatten(), label[i].flatten().long())),
                            abs_tol=1e-6)
    pos, neg = metrics.auc_histograms(score, label)
    pooled = float(binary_auroc(score.flatten(), label.flatten().long()))
    assert abs(metrics.auc_from_histograms(pos, neg) - pooled) < 2e-3  # bins of 1/1000
    assert torch.isnan(metrics.roc_auc(score[:1], torch.ones_like(label[:1])))[0]  # one class: no AUC
    assert float(metrics.roc_auc(label[:1].float(), label[:1])[0]) == 1.0
    inter = (score[:1] >= 0.5) & label[:1]
    union = (score[:1] >= 0.5) | label[:1]
    assert math.isclose(float(metrics.iou(score[:1] >= 0.5, label[:1])[0]), inter.sum().item() / union.sum().item(),
                        rel_tol=1e-6)
    assert torch.isnan(metrics.iou(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)))[0]


# ----------------------------------------------------------------------------------------------- model

def test_date_correction_starts_at_identity_and_is_counted():
    torch.manual_seed(0)
    plain = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4)
    torch.manual_seed(0)
    corrected = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4, use_date_correction=True)
    parts = net.parameter_breakdown(corrected)
    assert parts["date_correction"] == net.count_parameters(corrected) - net.count_parameters(plain) > 0
    cloudy, sar = torch.rand(2, 13, 16, 16), torch.rand(2, 2, 16, 16)
    corrected.load_state_dict({**plain.state_dict(), **{k: v for k, v in corrected.state_dict().items()
                                                         if k.startswith("date_correction")}})
    with torch.no_grad():
        a, b = plain(cloudy, sar), corrected(cloudy, sar)
    assert torch.allclose(a, b)  # zero-initialised: gain 1, offset 0


def test_zero_confidence_gives_the_date_corrected_input():
    torch.manual_seed(0)
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4, use_date_correction=True).eval()
    with torch.no_grad():
        for p in model.date_correction.parameters():
            p.normal_(0, 0.5)
        model.cloud_predictor.net[-1].bias.fill_(-50.0)  # sigmoid -> 0
        model.cloud_predictor.net[-1].weight.zero_()
        cloudy = torch.rand(2, 13, 16, 16)
        prediction, aux = model(cloudy, torch.rand(2, 2, 16, 16), return_aux=True)
    assert not torch.allclose(aux.corrected, cloudy)  # a real correction ...
    assert torch.allclose(prediction, aux.corrected, atol=1e-6)  # ... and nothing else where confidence is 0
    # one gain and offset per band and image, not per pixel: corrected is an exact affine map of cloudy
    x, y = cloudy.flatten(2), aux.corrected.flatten(2)
    xc, yc = x - x.mean(2, keepdim=True), y - y.mean(2, keepdim=True)
    gain = (xc * yc).sum(2, keepdim=True) / (xc * xc).sum(2, keepdim=True)
    assert (yc - gain * xc).abs().max() < 1e-5 and not torch.allclose(gain, torch.ones_like(gain))


def test_sar_skips_feed_full_resolution_radar_to_the_decoder():
    torch.manual_seed(0)
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4, use_sar_skips=True)
    cloudy, sar = torch.rand(1, 13, 16, 16), torch.rand(1, 2, 16, 16, requires_grad=True)
    model(cloudy, sar)[0, :, 5, 5].sum().backward()
    # a full-resolution skip: the output pixel depends most on the SAR pixels right under it
    grad = sar.grad.abs().sum(1)[0]
    assert grad[4:7, 4:7].sum() > grad[:2, :2].sum()


def _fused_and_o3(model, cloudy, sar):
    o3, s3 = model.optical_encoder(cloudy)[2], model.sar_encoder(sar)[2]
    return model.fusion(o3, s3) * model.gate(o3, s3), o3


def test_confidence_refinement_starts_at_the_design_map_and_sharpens_at_full_resolution():
    torch.manual_seed(0)
    design = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4).eval()
    refined = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4, use_confidence_refinement=True).eval()
    refined.load_state_dict({**design.state_dict(), **{k: v for k, v in refined.state_dict().items()
                                                       if k.startswith("confidence_refinement")}})
    cloudy, sar = torch.rand(1, 13, 16, 16), torch.rand(1, 2, 16, 16)
    with torch.no_grad():
        a, b = (design(cloudy, sar, return_aux=True)[1].confidence,
                refined(cloudy, sar, return_aux=True)[1].confidence)
        # zero-initialised: the predictor's map, upsampled as logits instead of probabilities
        padded = net._pad_to_multiple(cloudy, 4).shape[-2:]
        logits = torch.nn.functional.interpolate(
            design.cloud_predictor.logits(design.refine(*_fused_and_o3(design, cloudy, sar))), size=padded,
            mode="bilinear", align_corners=False)
    assert torch.allclose(b, torch.sigmoid(logits)[..., :16, :16], atol=1e-6)
    assert torch.allclose(a, b, atol=0.05)
    assert net.parameter_breakdown(refined)["confidence_refinement"] > 0
    # trained, it can change single pixels, which the 1/4-resolution predictor cannot
    with torch.no_grad():
        refined.confidence_refinement.net[-1].weight.normal_(0, 1.0)
        c = refined(cloudy, sar, return_aux=True)[1].confidence
    # and it trains under bf16 autocast without NaN (a logit of a bf16 probability of exactly 1 would give one)
    refined.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = refined(cloudy * 10, sar, return_aux=True)[1].confidence
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in refined.parameters() if p.grad is not None)
    step = (c[..., :, 1:] - c[..., :, :-1]).abs().max()
    assert step > 4 * (a[..., :, 1:] - a[..., :, :-1]).abs().max()
    plain = net.create_model("CrossAttention", use_cloud_predictor=False, use_confidence_refinement=True)
    assert plain.confidence_refinement is None and not plain.config.use_confidence_refinement


# ----------------------------------------------------------------------------------------------- training target

def test_confidence_target_is_the_truth_where_there_is_one():
    truth = torch.zeros(2, 2, 8, 8)
    truth[0, 0, :4] = 0.3   # cloud
    truth[1, 1, :, :2] = 0.5  # shadow
    truth[1, 0, 7, 7] = 0.01  # haze below the threshold
    cloud_binary = torch.ones(2, 1, 8, 8)
    target = training.confidence_targets({"cloud_truth": truth, "cloud_binary": cloud_binary}, torch.device("cpu"),
                                          {"confidence": 0.5})[0]
    assert target[0, 0, :4].eq(1).all() and target[0, 0, 4:].eq(0).all()
    assert target[1, 0, :, :2].eq(1).all() and target[1, 0, 7, 7] == 0
    detector_only = training.confidence_targets({"cloud_binary": cloud_binary}, torch.device("cpu"), {"confidence": 1})
    assert torch.equal(detector_only[0], cloud_binary)


# ----------------------------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def confidence_run(synthetic_dataset, tmp_path_factory):
    root, csv_path = synthetic_dataset
    save = tmp_path_factory.mktemp("conf_ckpt")
    assert train.main(["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
                       str(save), "--experiment_name", "c", "--max_epochs", "1", "--batch_sz", "2", "--load_size", "64",
                       "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0", "--perceptual_weight", "0",
                       "--amp", "off", "--num_quicklooks", "0", "--confidence_weight", "0.5",
                       "--use_date_correction"]) == 0
    results = tmp_path_factory.mktemp("conf_results")
    argv = ["--checkpoint", str(save / "c" / "last.pth"), "--data_list_filepath", str(csv_path), "--input_data_folder",
            str(root), "--split", "test", "--results_dir", str(results), "--num_workers", "0", "--amp", "off",
            "--save_confidence", "--batch_sz", "3"]
    summary = test_CR.evaluate(test_CR.build_parser().parse_args(argv))
    return save / "c" / "last.pth", results, summary


@pytest.mark.slow
def test_evaluation_scores_the_confidence_map(confidence_run, synthetic_dataset):
    import csv
    ckpt, results, summary = confidence_run
    rows = list(csv.DictReader(open(results / "metrics.csv")))
    for key in scoring.CONFIDENCE_COLUMNS:
        assert key in rows[0]
    conf = summary["confidence"]
    assert set(conf) >= {"auc_mask", "iou_mask", "auc_truth", "iou_truth", "mean_clear", "auc_truth_pooled"}
    assert 0 <= conf["auc_truth_pooled"] <= 1 and 0 <= conf["mean_clear"] <= 1
    assert summary["clear_change"]["identity"] == 0.0

    # recompute one image by hand from the saved confidence map and a fresh forward pass
    root, csv_path = synthetic_dataset
    test_rows = datalist.select_split(datalist.read_data_list(csv_path), "test")
    sample = D.SEN12MSCRDataset(test_rows, root, augment=False)[0]
    row = next(r for r in rows if r["file_name"] == sample["file_name"])
    model, _ = runtime.load_model(ckpt, torch.device("cpu"))
    with torch.no_grad():
        prediction, aux = model(sample["cloudy_data"][None], sample["SAR_data"][None], return_aux=True)
    saved = rasters.read_raster(results / "confidence" / sample["file_name"], 1)
    np.testing.assert_allclose(saved[0], aux.confidence[0, 0].numpy(), atol=1e-5)
    clear = ~rasters.truth_mask(sample["cloud_truth"][None])
    change = (bands.finish_s2(prediction) - bands.finish_s2(sample["cloudy_data"][None])).abs().mean(1, keepdim=True)
    assert math.isclose(float(row["model_clear_change"]), float(change[clear].mean()), rel_tol=1e-4)
    if clear.any() and not clear.all():
        auc = float(binary_auroc(aux.confidence.flatten(), (~clear).flatten().long()))
        assert math.isclose(float(row["conf_auc_truth"]), auc, abs_tol=1e-4)
    with rasterio.open(results / "confidence" / sample["file_name"]) as out, \
            rasterio.open(sample["cloudy_path"]) as src:
        assert out.crs == src.crs and out.dtypes == ("float32",)


@pytest.mark.slow
def test_models_without_confidence_report_none(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    assert train.main(["--data_list_filepath", str(csv_path), "--input_data_folder", str(root), "--save_model_dir",
                       str(tmp_path), "--experiment_name", "p", "--max_epochs", "1", "--batch_sz", "2", "--load_size",
                       "64", "--crop_size", "32", "--val_crop_size", "32", "--num_workers", "0", "--perceptual_weight",
                       "0", "--amp", "off", "--num_quicklooks", "0", "--no-use_cloud_predictor"]) == 0
    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(tmp_path / "p" / "last.pth"), "--data_list_filepath", str(csv_path),
        "--input_data_folder", str(root), "--split", "test", "--results_dir", str(tmp_path / "r"),
        "--num_workers", "0", "--amp", "off", "--save_confidence"]))
    assert summary["confidence"] is None and summary["clear_change"]["model"] > 0
    assert not (tmp_path / "r" / "confidence").exists() or not any((tmp_path / "r" / "confidence").iterdir())


def test_residual_term_trains_the_ungated_residual_on_every_pixel():
    import losses
    target = torch.rand(2, 13, 8, 8)
    cloudy = target + 0.2
    crit = losses.CRLoss(perceptual_weight=0, residual_weight=0.5)
    assert crit.reads == ("corrected", "residual")  # the ungated prediction corrected + residual, whatever the map
    exact, terms = crit(target, target, cloudy, aux=net.ModelOutputs(corrected=cloudy, residual=target - cloudy))
    assert float(terms["residual"]) == 0.0 and float(exact) == 0.0
    off, terms = crit(target, target, cloudy, aux=net.ModelOutputs(corrected=cloudy, residual=target - cloudy + 0.1))
    assert math.isclose(float(terms["residual"]), 0.5 * 0.1, rel_tol=1e-4)
    with pytest.raises(ValueError, match="residual_weight"):
        crit(target, target, cloudy)  # a model without a gate has no ungated prediction
    # DSen2CR returns a residual but no corrected input: the term cannot be had from it
    _, aux = net.create_model("DSen2CR", feature_sizes=8, num_layers=1)(
        torch.rand(1, 13, 8, 8), torch.rand(1, 2, 8, 8), return_aux=True)
    with pytest.raises(ValueError, match="no corrected"):
        crit(aux.residual, target[:1], cloudy[:1], aux=aux)


def test_truth_bins_split_pixels_by_true_opacity_and_distance_from_the_cloud_edge():
    truth = torch.zeros(2, 2, 12, 12)
    truth[0, 0, :, 6:] = 0.95            # image 0: opaque cloud over the right half, columns 6-11
    truth[0, 0, :, 5] = 0.5              # a 0.3-0.7 column at its edge
    truth[0, 1, 0, 0] = 0.2              # one shadowed clear pixel
    truth[1, 0] = 0.2                    # image 1: thin cloud everywhere, no clear pixel
    masks = scoring.truth_bin_masks(truth)
    assert masks["clear"][0].sum() == 12 * 5 - 1 and masks["shadow, no cloud"][0, 0, 0]
    assert masks["opacity 0.05-0.3"][1].all() and masks["opacity 0.9-1.0"][0].sum() == 12 * 6
    assert masks["opacity 0.3-0.7"][0].sum() == 12
    # column 5 is 1 px from clear column 4, column 9 is 5 px away: edge <= 4 px holds columns 5-8
    edge, inside = masks[f"cloud, edge {scoring.EDGE_PX} px"], masks["cloud, inside"]
    assert edge[0, :, 5:9].all() and not edge[0, :, 9:].any() and inside[0, :, 9:].all()
    # a patch without clear pixels has no visible edge: all of its cloud is inside
    assert inside[1].all() and not edge[1].any()
    for name in ("opacity 0.05-0.3", "opacity 0.3-0.7", "opacity 0.7-0.9", "opacity 0.9-1.0"):
        assert not (masks[name] & masks["clear"]).any()
    assert scoring.summarise_truth_bins(scoring.Totals()) is None


@pytest.mark.slow
def test_evaluation_scores_pixels_by_their_true_cloud(confidence_run, synthetic_dataset):
    _, _, summary = confidence_run
    bins = summary["truth_bins"]
    root, csv_path = synthetic_dataset
    dataset = D.SEN12MSCRDataset(datalist.select_split(datalist.read_data_list(csv_path), "test"), root, augment=False)
    samples = [dataset[i] for i in range(len(dataset))]
    truth = torch.stack([s["cloud_truth"] for s in samples])
    cloudy = bands.finish_s2(torch.stack([s["cloudy_data"] for s in samples]))
    target = torch.stack([s["cloudfree_data"] for s in samples])
    masks = scoring.truth_bin_masks(truth)
    assert sum(bins[name]["pixels"] for name in ("clear", "shadow, no cloud", *(
        f"opacity {lo}-{hi}" for lo, hi in scoring.OPACITY_BINS))) == truth[:, 0].numel()
    for name, mask in masks.items():
        assert bins[name]["pixels"] == int(mask.sum())
        if mask.any():  # the identity's PSNR by hand: squared error pooled over the bin's pixels and bands
            mse = float(((cloudy - target) ** 2).permute(1, 0, 2, 3)[:, mask].double().mean())
            assert math.isclose(bins[name]["PSNR_identity"], -10 * math.log10(mse), abs_tol=1e-6)
            assert bins[name]["PSNR_model"] is not None
        else:
            assert bins[name]["PSNR_identity"] is None
