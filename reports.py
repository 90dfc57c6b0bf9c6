"""What an evaluation prints: the tables of test_CR.py's report (and of the notebook), read from summary.json's
figures (scoring.py makes them). Text in, text out: no files, no model.

    print(reports.format_table(summary["mean"], summary["cloud_cover_bins"]))
"""
import io

import scoring


def format_table(summary, bins):
    out = io.StringIO()
    header = f"{'region':<8}{'metric':<7}{'model':>10}{'identity':>10}{'gain':>10}"
    out.write(header + "\n" + "-" * len(header) + "\n")
    fmt = lambda v: f"{v:>10.4f}" if v is not None else f"{'-':>10}"
    for r in scoring.REGIONS:
        for m in scoring.METRIC_NAMES:
            a, b = summary["model"][r][m], summary["identity"][r][m]
            gain = None if a is None or b is None else a - b
            out.write(f"{r:<8}{m:<7}{fmt(a)}{fmt(b)}{fmt(gain)}\n")
    out.write(f"\nby cloud cover (PSNR / SSIM, model vs identity)\n{'bin %':<8}{'n':>4}"
              f"{'PSNR model':>12}{'PSNR ident':>12}{'SSIM model':>12}{'SSIM ident':>12}\n")
    for name, b in bins.items():
        s = b["mean"]
        out.write(f"{name:<8}{b['n']:>4}  {fmt(s['model']['all']['PSNR'])}  {fmt(s['identity']['all']['PSNR'])}"
                  f"  {fmt(s['model']['all']['SSIM'])}  {fmt(s['identity']['all']['SSIM'])}\n")
    return out.getvalue()


def format_truth_bins(bins):
    fmt = lambda v: f"{'-':>9}" if v is None else f"{v:>9.2f}"
    lines = [f"PSNR by true cloud (squared error pooled over each bin's pixels)\n{'pixels':<26}{'n':>8}{'model':>9}"
             f"{'identity':>9}"]
    lines += [f"{name:<26}{b['pixels']:>8}{fmt(b['PSNR_model'])}{fmt(b['PSNR_identity'])}" for name, b in bins.items()]
    return "\n".join(lines)


def format_confidence(summary):
    """Lines saying what the confidence map is worth as a cloud map, and how much clear pixels were changed."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"clear pixels changed by the model: mean |prediction - cloudy| = {fmt(summary['clear_change']['model'])}"
             f" (identity: 0)"]
    c = summary["confidence"]
    if c is not None:
        lines.append(f"confidence map vs the {summary['cloud_detector']} mask: ROC AUC {fmt(c['auc_mask'])} "
                     f"(pooled {fmt(c['auc_mask_pooled'])}), IoU at 0.5 {fmt(c['iou_mask'])}; "
                     f"mean on clear pixels {fmt(c['mean_clear'])}")
        if c["auc_truth"] is not None:
            lines.append(f"confidence map vs the true cloud map: ROC AUC {fmt(c['auc_truth'])} "
                         f"(pooled {fmt(c['auc_truth_pooled'])}), IoU at 0.5 {fmt(c['iou_truth'])}")
    return "\n".join(lines)


def format_uncertainty(u):
    """Lines saying how the predicted uncertainty ranks and matches the error, per region."""
    fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)
    lines = [f"predicted uncertainty: {u['source']}; std of reflectance, {u['pixels_sampled']} pixels pooled "
             f"(at most {u['pixels_per_image_cap']} per image)",
             f"mean std: all {fmt(u['mean_std']['all'])}, cloudy {fmt(u['mean_std']['cloudy'])}, clear "
             f"{fmt(u['mean_std']['clear'])} (cloudy / clear {fmt(u['cloudy_clear_ratio'], '.2f')}); aleatoric "
             f"{fmt(u['aleatoric_std'])}, epistemic {fmt(u['epistemic_std'])}",
             f"{'region':<8}{'Spearman':>9}{'UCE px':>9}{'(const)':>9}{'UCE img':>9}{'(const)':>9}{'area':>7}"
             f"   RMSE change after removing the 5/10/25/50 % most uncertain pixels (the oracle's)"]
    for region in scoring.REGIONS:
        r = u["regions"][region]
        if r is None:
            lines.append(f"{region:<8}  no pixels")
            continue
        drops = "/".join(f"{-v:.0f}" for v in r["rmse_drop_pct"].values())
        oracle = "/".join(f"{-v:.0f}" for v in r["oracle_rmse_drop_pct"].values())
        lines.append(f"{region:<8}{fmt(r['spearman'], '.3f'):>9}{fmt(r['uce_pixels']):>9}"
                     f"{fmt(r['uce_pixels_constant']):>9}{fmt(r['uce_images']):>9}{fmt(r['uce_images_constant']):>9}"
                     f"{r['sparsification_area']:>7.3f}   {drops} % ({oracle} %)")
    theirs = u["regions"]["all"] and u["regions"]["all"].get("uce_uncrtaints")
    if theirs is not None:
        lines.append(f"UnCRtainTS's UCE / AUCE (their released code: whole images, mean signed error), to compare with "
                     f"their tables: {fmt(theirs)} / {fmt(u['regions']['all']['auce_uncrtaints'])}")
    return "\n".join(lines)
