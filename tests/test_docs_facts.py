"""The figures the code can produce hold wherever README.md, docs/*.md and the notebook state them: parameter counts,
MACs, flag defaults quoted in prose, the mask files' formats. A failure names the page and line that drifted.

BENCHMARKS.md is left out on purpose: it records what was measured at a stated commit and date (an older network's
parameter count stays true there), and the other pages link to it instead of restating its figures.
"""
import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from test_readme import parser_of, subcommands

import net_CR_CrossAttention as net
import synthetic_sets

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "notebooks" / "kaggle.ipynb"]


def page_lines(page):
    """(where, text) of every line of a page ("docs/x.md:12"; a notebook's cells line by line)."""
    name = page.relative_to(ROOT).as_posix()
    if page.suffix == ".ipynb":
        cells = json.loads(page.read_text())["cells"]
        return [(f"{name} cell {c} line {n}", line.rstrip("\n")) for c, cell in enumerate(cells, 1)
                for n, line in enumerate(cell["source"], 1)]
    return [(f"{name}:{n}", line) for n, line in enumerate(page.read_text().splitlines(), 1)]


def prose_lines(page):
    """page_lines outside fenced code blocks (prose and tables, where a default is stated in words)."""
    out, in_code = [], False
    for where, line in page_lines(page):
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            out.append((where, line))
    return out


def all_lines():
    return [item for page in PAGES for item in page_lines(page)]


# ----------------------------------------------------------------------------------------------- parameter counts

@cache
def parameter_counts():
    """{name: count} of the networks and parts the pages quote."""
    default = net.CloudRemovalCrossAttention()
    return {"default": net.count_parameters(default),
            "design": net.count_parameters(net.CloudRemovalCrossAttention(**net.design_switches())),
            "DSen2-CR": net.count_parameters(net.DSen2CR()),
            "uncertainty head": net.count_parameters(net.UncertaintyHead(default.config.widths[0],
                                                                         default.config.in_optical)),
            "affine head gains": net.count_parameters(default.head) - net.count_parameters(
                net.CloudRemovalCrossAttention(affine_residual=False).head)}


def drifted_counts(lines):
    """(where, stated, the counts it could mean) for every count a line states that misses the count it is close
    to: "6.20M" next to "param", "network" or "model" (millions, 2 decimals), "6,205,839 parameters" / "in total"
    (exact). Counts far (> 10 %) from every network of this project are other methods' (comparing.md): not checked."""
    counts, bad = parameter_counts(), []
    for where, line in lines:
        stated = []
        if re.search(r"param|network|model", line, re.IGNORECASE):
            stated += [(m.group(0), float(m.group(1)) * 1e6, 2)
                       for m in re.finditer(r"(?<![\d.])(\d+\.\d{2})M\b", line)]
        stated += [(m.group(0), float(m.group(1).replace(",", "")), None)
                   for m in re.finditer(r"(?<![\d,])(\d{1,3}(?:,\d{3})+) (?:parameters|in total)", line)]
        for text, value, decimals in stated:
            near = {name: c for name, c in counts.items() if abs(c - value) <= 0.1 * c}
            same = [name for name, c in near.items()
                    if (round(c / 1e6, decimals) == round(value / 1e6, decimals) if decimals else c == value)]
            if near and not same:
                bad.append((where, text, {n: f"{c:,} ({c / 1e6:.2f}M)" for n, c in near.items()}))
    return bad


def test_parameter_counts_stated_in_the_docs_are_the_code_s():
    bad = drifted_counts(all_lines())
    assert not bad, "parameter counts that drifted from the code:\n" + "\n".join(
        f"{where}: states {text}, the code counts {near}" for where, text, near in bad)


def test_a_drifted_parameter_count_is_caught():
    default = parameter_counts()["default"]
    lines = [("x.md:1", f"the default network ({default / 1e6 - 0.01:.2f}M parameters)"),
             ("x.md:2", f"{default + 1:,} parameters"), ("x.md:3", "GLF-CR's 14.83M parameters"),
             ("x.md:4", f"the network's {default / 1e6:.2f}M")]
    assert [where for where, _, _ in drifted_counts(lines)] == ["x.md:1", "x.md:2"]


MODEL_TABLE = {  # docs/model.md's "Parameters" table: row -> parameter_breakdown parts (summed)
    "optical encoder": ("optical_encoder",), "SAR encoder": ("sar_encoder",), "cross-attention fusion": ("fusion",),
    "speckle-aware gate": ("gate",), "refinement": ("refine",), "decoder": ("up2", "up1"),
    "cloud confidence predictor": ("cloud_predictor",), "confidence refinement": ("confidence_refinement",)}


def test_model_md_parameter_table_is_the_breakdown():
    parts = net.parameter_breakdown(net.CloudRemovalCrossAttention())
    rows = {}
    for where, line in page_lines(ROOT / "docs" / "model.md"):
        match = re.match(r"\| ([^|(]+?) (?:\([^|]*\))? ?\| ([\d,]+)", line)
        if match and match.group(1) in MODEL_TABLE:
            rows[match.group(1)] = (where, int(match.group(2).replace(",", "")))
    assert set(rows) == set(MODEL_TABLE), f"docs/model.md's table lacks {set(MODEL_TABLE) - set(rows)}"
    for name, (where, stated) in rows.items():
        assert stated == sum(parts[p] for p in MODEL_TABLE[name]), f"{where}: {name} {stated:,}, the code " \
            f"counts {sum(parts[p] for p in MODEL_TABLE[name]):,}"


# ------------------------------------------------------------------------------------------------------------ MACs

@cache
def macs():
    """{name: MACs per 256 px forward} (net_CR_CrossAttention.count_macs: fake tensors, a few seconds each)."""
    return {"default": net.count_macs(net.CloudRemovalCrossAttention()),
            "without affine head": net.count_macs(net.CloudRemovalCrossAttention(affine_residual=False)),
            "DSen2-CR": net.count_macs(net.DSen2CR())}


# (pattern, the network each group states, its format): every match anywhere is checked, and each pattern must match
# somewhere (a reworded sentence fails here, to be pointed at its new wording rather than go unchecked)
MACS_STATED = [
    (r"\| this model \(default\) \|[^|]*\|[^|]*\| (\d+\.\d) \|", ("default",), "{:.1f}"),
    (r"this model's (\d+\.\d) G is counted", ("default",), "{:.1f}"),
    (r"\((\d,\d{3}) G\)", ("DSen2-CR",), "{:,.0f}"),
    (r"(\d+\.\d) GMACs per 256 px forward against (\d+\.\d)", ("default", "without affine head"), "{:.1f}"),
]


@pytest.mark.slow
def test_macs_stated_in_the_docs_are_the_code_s():
    lines, counted = all_lines(), macs()
    for pattern, names, spec in MACS_STATED:
        found = [(where, m) for where, line in lines for m in re.finditer(pattern, line)]
        assert found, f"no page states {pattern!r} any more: point the test at the new wording"
        for where, match in found:
            for name, stated in zip(names, match.groups()):
                want = spec.format(counted[name] / 1e9)
                assert stated == want, f"{where}: {name} stated as {stated} GMACs, count_macs gives {want}"


# ---------------------------------------------------------------------------------------------- flag defaults

@cache
def parsers():
    """Every argparse parser of the scripts: the two scripts' and each dataloader.py subcommand's."""
    return [parser_of("train_CR_kaggle.py"), parser_of("test_CR.py"),
            *subcommands(parser_of("dataloader.py")).values()]


def _declared_weight(term):
    return term.weight if term.on else 0.0


def defaults_of(flag):
    """The parsers' defaults of `flag`; a loss flag's parser default is "not given" (argparse.SUPPRESS), so its
    default is the one losses.py declares (the weight for the model that has the term's part)."""
    import argparse

    import losses

    found = [p._option_string_actions[flag].default for p in parsers() if flag in p._option_string_actions]
    name = flag[2:]
    declared = ([losses.OPTIONS[name].default] if name in losses.OPTIONS else
                [_declared_weight(losses.TERMS[name[:-len("_weight")]])] if name.endswith("_weight")
                and name[:-len("_weight")] in losses.TERMS else [])
    return [d for d in found if d is not argparse.SUPPRESS] + (declared if argparse.SUPPRESS in found else [])


def same_value(stated, default):
    if str(default) == stated:
        return True
    try:
        return float(stated) == float(default)
    except (TypeError, ValueError):
        return False


# How prose states a default: "`--amp auto` (default)", "`--nll_distribution laplace|gaussian` (default laplace)",
# "`--log_every` steps (default 10", "the default `--load_size 256`", "--flag defaults to 4"
DEFAULT_STATED = [
    r"`(--\w+) ([^`|\s]+)` \(default\)",
    r"`(--\w+) [\w.]+(?:\|[\w.]+)+` \(default ([\w.]+)\)",
    r"`(--\w+)`[^`(]{0,40}\(default:? ([\w.]+)[;),]",
    r"the default `(--\w+) ([^`\s]+)`",
    r"(--\w+) defaults to ([\w.]+)(?![\w.])(?! with)",  # "defaults to 0.1 with it": another flag's, not the parser's
]


def stated_defaults(lines):
    """(where, flag, stated value) of every default a page states in one of the DEFAULT_STATED forms, plus the
    values of training.md's "Data flags." list, which are its defaults."""
    out = []
    for where, line in lines:
        for pattern in DEFAULT_STATED:
            out += [(where, m.group(1), m.group(2)) for m in re.finditer(pattern, line)]
    return out


def data_flag_defaults():
    text = (ROOT / "docs" / "training.md").read_text()
    paragraph = text[text.index("**Data flags.**"):].split("\n\n")[0]
    line = text[:text.index("**Data flags.**")].count("\n") + 1
    return [(f"docs/training.md:{line} (Data flags)", m.group(1), m.group(2))
            for m in re.finditer(r"`(--\w+) (\d+)`", paragraph)]


def test_flag_defaults_stated_in_the_docs_are_the_parsers():
    stated = stated_defaults(all_lines()) + data_flag_defaults()
    assert len(stated) >= 8, f"only {len(stated)} stated defaults found: is DEFAULT_STATED still matching?"
    bad = [f"{where}: {flag} stated as default {value!r}, the parsers' defaults: {defaults_of(flag) or 'no such flag'}"
           for where, flag, value in stated if not any(same_value(value, d) for d in defaults_of(flag))]
    assert not bad, "\n".join(bad)


def test_a_drifted_default_is_caught():
    lines = [("x.md:1", "`--amp bf16` (default) picks"), ("x.md:2", "every `--log_every` steps (default 11; points"),
             ("x.md:3", "`--amp auto` (default)"), ("x.md:4", "--nll_weight defaults to 0.1 with it")]
    found = stated_defaults(lines)
    assert [(w, f, v) for w, f, v in found] == [("x.md:1", "--amp", "bf16"), ("x.md:2", "--log_every", "11"),
                                                ("x.md:3", "--amp", "auto")]
    assert [w for w, f, v in found if not any(same_value(v, d) for d in defaults_of(f))] == ["x.md:1", "x.md:2"]


# ---------------------------------------------------------------------------------------------- mask file formats

@pytest.fixture(scope="module")
def mask_dtypes(tmp_path_factory):
    """{detector: numpy dtype name} of the files `dataloader.py masks` writes, on a synthetic 32 px patch."""
    import rasterio

    import cloud_masks
    root = tmp_path_factory.mktemp("masks")
    synthetic_sets.make_synthetic_dataset(root / "data", n=1, size=32, seed=0)
    cloudy = next(p for p in (root / "data").rglob("*.tif") if "s2_cloudy" in p.parent.name)
    dtypes = {}
    for detector in cloud_masks.MASK_DETECTORS:
        out = cloud_masks.write_cloud_mask(cloudy, root / f"{detector}.tif", detector) or root / f"{detector}.tif"
        with rasterio.open(out) as src:
            dtypes[detector] = src.dtypes[0]
    return dtypes


@pytest.mark.slow  # runs s2cloudless (LightGBM) once: ~10 s
def test_mask_formats_stated_in_the_docs_are_what_masks_writes(mask_dtypes):
    checked = 0
    for where, line in all_lines():
        # "the 0/1 mask as uint8 for `s2cloudless`, the soft score as float32 for `rule` and `s2cloudless_prob`"
        for match in re.finditer(r"as (uint8|float32) for ((?:`\w+`(?:,? and |, )?)+)", line):
            for detector in re.findall(r"`(\w+)`", match.group(2)):
                checked += 1
                assert mask_dtypes.get(detector) == match.group(1), (
                    f"{where}: {detector} masks stated as {match.group(1)}, `dataloader.py masks` writes "
                    f"{mask_dtypes.get(detector)}")
        # the former encoding (uint8 score x255) may only be named as the former one
        if re.search(r"x ?255", line) and not re.search(r"before|old|former|refus|legacy|LEGACY", line):
            pytest.fail(f"{where}: names the uint8 x255 mask encoding as if current: {line.strip()}")
    assert checked >= 3, "no page states the mask files' formats in the checked form any more"
    assert set(mask_dtypes) == {"rule", "s2cloudless", "s2cloudless_prob"}
    assert np.dtype(mask_dtypes["s2cloudless"]) == np.uint8
