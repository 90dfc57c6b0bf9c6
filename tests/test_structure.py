"""The house's rooms: what may import what, names used from where they live, one source for shared defaults, old
checkpoints, short functions."""
import ast
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

import losses
import net_CR_CrossAttention as net
import runtime
import scoring
import test_CR
import train_CR_kaggle
import training

ROOT = Path(__file__).resolve().parents[1]
# Layers from the bottom up; a module may import project modules of lower layers only, so modules of one layer do
# not import each other: runtime.py does not import dataloader.py (loading a checkpoint needs no GeoTIFF stack).
LAYERS = {
    "bands": 0, "date_sampling": 0, "files": 0, "metrics": 0, "net_CR_CrossAttention": 0, "splits": 0, "synthetic": 0,
    "losses": 1, "clouds": 1, "datalist": 1, "rasters": 1,
    "net_CR_temporal": 1,  # the time series network, built on the mono-temporal one's parts
    "cloud_masks": 2, "scanning": 2,  # the data layer: lists and rasters below masks and scenes below the Dataset
    "runtime": 3, "sizing": 3, "synthetic_sets": 3,  # synthetic_sets: the synthetic data sets written as files
    "dataloader": 4,  # the Datasets and the data command line (synth writes synthetic_sets')
    "training_setup": 5,  # the pieces a training run is built from
    "inference": 6, "quicklooks": 6, "scoring": 6,
    "training": 6,  # the run, its step and loop: what the training script and the benchmarks both call
    "reports": 7,  # the evaluation's printed tables, from scoring's figures
    "test_CR": 8, "train_CR_kaggle": 8,
    # the benchmark: what its subcommands share, the subcommands, the entry point that imports them by name
    "bench_process": 9, "bench_step": 9,
    "bench_loss": 10, "bench_data": 10, "bench_eval": 10, "bench_train": 10, "bench_memory": 10, "bench_loop": 10,
    "bench_learn": 10, "bench_sparsify": 10,
    "benchmark": 11,
}
BENCHMARK_LAYER = LAYERS["bench_process"]
OLD_CHECKPOINT = ROOT / "tests" / "data" / "checkpoint_before_sar_config.pth"
# The names GLF-CR's own code has, which its users' notebooks call as module.name (docs/data.md, docs/evaluation.md):
# they stay defined in the module GLF-CR has them in. Every other name is used from the module that defines it.
GLFCR_NAMES = {
    "dataloader": ("get_train_val_test_filelists", "AlignedDataset"),
    "metrics": ("PSNR", "SSIM", "SAM", "MAE", "RMSE"),
}
DOC_PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _project_imports(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):  # function-local imports count too
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


MAX_LINES = 700  # one job per file (the anchors' largest: nanoGPT 336, NAFNet 413, UnCRtainTS 852 lines)


def test_no_product_file_is_over_700_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_every_module_has_a_layer():
    assert {p.stem for p in ROOT.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_no_module_imports_upward(module):
    upward = {m for m in _project_imports(module) if LAYERS[m] >= LAYERS[module]}
    assert not upward, f"{module} (layer {LAYERS[module]}) imports {upward}"


def test_only_the_benchmark_imports_the_training_script():
    for module in LAYERS:
        imports = _project_imports(module)
        assert "benchmark" not in imports, module
        if LAYERS[module] < BENCHMARK_LAYER:
            assert "train_CR_kaggle" not in imports, module


# requirements.txt holds what the product imports (the modules and the notebook), requirements-dev.txt adds what the
# tests import and the tools run by name. Import names map to packages through the installed distributions' own
# metadata (skimage -> scikit-image, PIL -> pillow); these are the imports that need another package too.
NEEDS_PACKAGE = {"torch.utils.tensorboard": "tensorboard"}  # torch's SummaryWriter writes with tensorboard
PROVIDED_BY_JUPYTER = {"IPython"}  # the notebook's display(): part of every Jupyter kernel, not a requirement
TOOLS_RUN_BY_NAME = {"ruff", "ipykernel"}  # .ci/run's lint; the kernel tests/test_notebook.py starts
LOCAL_NAMES = {p.stem for p in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]}


def _package(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_packages(sources):
    """{package: [where]} for the third-party imports of (name, code) pairs."""
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for where, code in sources:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL_NAMES or top in PROVIDED_BY_JUPYTER:
                    continue
                assert top in distributions, f"{where} imports {top}, which no installed package provides"
                packages = [*distributions[top], *[p for m, p in NEEDS_PACKAGE.items() if module.startswith(m)]]
                for package in packages:
                    found.setdefault(_package(package), []).append(where)
    return found


def _requirements(path):
    """Package names in a requirements file, with those of the files it includes (-r)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= _requirements(path.parent / line[3:].strip())
        elif line:
            names.add(_package(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def _product_sources():
    notebook = json.loads((ROOT / "notebooks" / "kaggle.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    return [(p.name, p.read_text()) for p in sorted(ROOT.glob("*.py"))] + [("notebooks/kaggle.ipynb", "\n".join(cells))]


def test_requirements_hold_what_the_product_imports_and_no_more():
    runtime_packages = _requirements(ROOT / "requirements.txt")
    imported = _imported_packages(_product_sources())
    assert set(imported) <= runtime_packages, {p: w for p, w in imported.items() if p not in runtime_packages}
    unused = runtime_packages - set(imported)
    assert not unused, f"requirements.txt lists {unused}, which no product module imports (tools: requirements-dev.txt)"


def test_dev_requirements_add_what_the_tests_import_and_the_tools():
    runtime_packages, dev = _requirements(ROOT / "requirements.txt"), _requirements(ROOT / "requirements-dev.txt")
    imported = _imported_packages((f"tests/{p.name}", p.read_text()) for p in sorted((ROOT / "tests").glob("*.py")))
    assert set(imported) <= dev, {p: w[:3] for p, w in imported.items() if p not in dev}
    assert dev - runtime_packages == (set(imported) - runtime_packages) | TOOLS_RUN_BY_NAME


def test_the_requirement_check_sees_renamed_and_indirect_packages():
    found = _imported_packages([("a.py", "import skimage.metrics\nfrom PIL import Image\nimport os\nimport bands\n"
                                          "from torch.utils.tensorboard import SummaryWriter")])
    assert set(found) == {"scikit-image", "pillow", "torch", "tensorboard"}
    with pytest.raises(AssertionError, match="no installed package provides"):
        _imported_packages([("a.py", "import glfcr_not_a_package")])

def _modules_loaded_by(statement):
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.slow
def test_losses_loads_no_geotiff_stack():
    loaded = _modules_loaded_by("import losses")
    assert not {"rasterio", "scipy", "dataloader"} & loaded


@pytest.mark.slow
def test_evaluation_loads_no_training_code():
    loaded = _modules_loaded_by("import test_CR")
    assert not {"train_CR_kaggle", "losses", "torchvision"} & loaded


@pytest.mark.slow
def test_the_scene_benchmark_worker_loads_what_evaluation_loads():
    """`benchmark.py eval` reports the peak memory of whole-scene prediction from a fresh process that imports the
    worker's module only (bench_process.in_fresh_process): it must load what `test_CR.py --predict` loads and no more
    (no training script, no losses and their torchvision, no FLOP counter); small standard-library modules aside."""
    extra = _modules_loaded_by("import bench_eval") - _modules_loaded_by("import test_CR")
    assert {m for m in extra if m.split(".")[0] not in sys.stdlib_module_names} == {"bench_eval", "bench_process"}


def test_no_product_function_is_longer_than_80_lines():
    long = []
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long


def test_loss_defaults_have_one_source():
    # the loss flags hold no defaults of their own: not given, they are absent and the terms' table decides
    args = train_CR_kaggle.build_parser().parse_args([])
    assert not set(losses.GIVEN_NAMES) & set(vars(args))
    assert losses.resolve(losses.given_flags(args), net.ModelConfig()).weights == {
        t.name: t.weight if t.on and losses.has_part(net.ModelConfig(), t.needs) else 0.0 for t in losses.LOSS_TERMS}
    assert losses.CRLoss(perceptual_weight=0).weights == {"l1": 1.0}  # a bare criterion needs no confidence map
    assert losses.OPTIONS["cloud_weight_factor"].default == 2.5  # the design document's training command
    assert losses.CloudFocusedLoss().cloud_weight_factor == 2.5
    crit = losses.CRLoss(use_cloud_focused_loss=True, perceptual_weight=0)
    assert crit.config.options["cloud_weight_factor"] == 2.5 and crit.weights == {"cloud_focused": 1.0}
    with pytest.raises(TypeError, match="unknown loss options"):
        losses.CRLoss(cloud_weigth_factor=3)


def _literal_cloud_thresholds(code):
    """Where code spells the cloud threshold's value as a literal default (a parameter named *threshold*, a
    --cloud_threshold flag, getattr(opts, "cloud_threshold", ...)) instead of naming clouds.CLOUD_THRESHOLD."""
    import clouds
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            pairs = [*zip(a.args[len(a.args) - len(a.defaults):], a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]
            values = [d for arg, d in pairs if d is not None and "threshold" in arg.arg]
        elif isinstance(node, ast.Call) and any(isinstance(v, ast.Constant) and "cloud_threshold" in str(v.value)
                                                for v in node.args):
            values = [*node.args, *(k.value for k in node.keywords)]
        else:
            continue
        found += [f"line {v.lineno}" for v in values
                  if isinstance(v, ast.Constant) and type(v.value) is float and v.value == clouds.CLOUD_THRESHOLD]
    return found


def test_the_literal_threshold_check_sees_each_way_of_spelling_a_default():
    assert _literal_cloud_thresholds("def f(s2, threshold=0.2): pass\n"
                                     "def g(*, cloud_threshold=0.2): pass\n"
                                     "p.add_argument('--cloud_threshold', type=float, default=0.2)\n"
                                     "getattr(opts, 'cloud_threshold', 0.2)") == [f"line {n}" for n in (1, 2, 3, 4)]
    assert not _literal_cloud_thresholds("import clouds\ndef f(threshold=clouds.CLOUD_THRESHOLD, low=0.2): pass\n"
                                         "getattr(opts, 'cloud_threshold', clouds.CLOUD_THRESHOLD)")


def test_cloud_threshold_has_one_source(synthetic_dataset):
    """DSen2-CR's binarisation threshold is clouds.CLOUD_THRESHOLD; every default of a cloud threshold reads it."""
    import inspect
    from types import SimpleNamespace

    import clouds
    import dataloader
    assert clouds.CLOUD_THRESHOLD == 0.2
    literal = {p.name: _literal_cloud_thresholds(p.read_text()) for p in ROOT.glob("*.py")}
    assert not {name: lines for name, lines in literal.items() if lines}
    root, csv_path = synthetic_dataset
    train, _, _ = dataloader.get_train_val_test_filelists(csv_path)
    assert {inspect.signature(clouds.rule_cloud_mask).parameters["threshold"].default,
            inspect.signature(clouds.cloud_shadow_mask).parameters["threshold"].default,
            inspect.signature(dataloader.SEN12MSCRDataset).parameters["cloud_threshold"].default,
            dataloader.AlignedDataset(SimpleNamespace(input_data_folder=root), train).cloud_threshold,  # GLF-CR opts
            test_CR.build_parser().get_default("cloud_threshold")} == {clouds.CLOUD_THRESHOLD}


def test_history_and_metric_names_have_one_source():
    import metrics
    assert scoring.METRIC_NAMES == metrics.METRIC_NAMES
    assert [f for f in training.HISTORY_FIELDS if f.startswith("val_")] == [
        f"val_{m}" for m in metrics.METRIC_NAMES]


@pytest.mark.parametrize("module", sorted(GLFCR_NAMES))
def test_glf_cr_names_import_from_glf_cr_modules(module):
    for name in GLFCR_NAMES[module]:
        thing = getattr(importlib.import_module(module), name)  # what `from dataloader import AlignedDataset` gets
        assert thing.__module__ == module, f"{module}.{name} is defined in {thing.__module__}"


def _top_level_statements(body):
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _top_level_statements(getattr(node, field, []))


@cache
def _borrowed(module):
    """Names a project module's top level binds only by importing them: reachable as module.name, defined elsewhere."""
    defined, imported = set(), set()
    for node in _top_level_statements(ast.parse((ROOT / f"{module}.py").read_text()).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return imported - defined


def _misplaced(module, name):
    """True unless `name` is defined in project module `module` (absent, or there only by an import)."""
    return name in _borrowed(module) or not hasattr(importlib.import_module(module), name)


def _module_names(tree):
    """(module, name, where) for each name of a project module that code uses, however the module is imported."""
    aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if a.name in LAYERS}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in LAYERS:
            yield from ((node.module, a.name, f"line {node.lineno}, import") for a in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield aliases[node.value.id], node.attr, f"line {node.lineno}"
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "setattr" and len(node.args) > 1
              and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
              and isinstance(node.args[1], ast.Constant)):  # monkeypatch.setattr(module, "name", ...)
            yield aliases[node.args[0].id], node.args[1].value, f"line {node.lineno}, setattr"


def _misplaced_uses(tree):
    return [f"{module}.{name} ({where})" for module, name, where in _module_names(tree) if _misplaced(module, name)]


def test_code_uses_names_from_the_module_that_defines_them():
    """No re-exports: `dataloader.normalize_s2` would work only while dataloader happens to import it."""
    misplaced = {}
    for path in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        uses = _misplaced_uses(ast.parse(path.read_text()))
        if uses:
            misplaced[str(path.relative_to(ROOT))] = uses
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # its code cells call the modules as a user's would
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
        uses = _misplaced_uses(ast.parse(code))
        if uses:
            misplaced[str(notebook.relative_to(ROOT))] = uses
    assert not misplaced, misplaced


def test_docs_name_things_in_the_module_that_defines_them():
    """Every `module.name` of README.md, BENCHMARKS.md and docs/*.md, in prose or a ```python block, is defined in
    that module (`metrics.csv`, `test_CR.py` are files, not names)."""
    wrong = []
    for page in DOC_PAGES:
        text = page.read_text()
        for block in re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
            wrong += [f"{page.name}: {use}" for use in _misplaced_uses(ast.parse(block))]
        for module, name in re.findall(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?![\w.])", text):
            if module in LAYERS and name not in ("py", "csv") and _misplaced(module, name):
                wrong.append(f"{page.name}: `{module}.{name}`")
    assert not wrong, wrong


def test_sar_input_is_part_of_the_model_config():
    torch.manual_seed(0)
    model = net.create_model("CrossAttention", widths=(8, 16, 32), heads=4, sar_input="zeros").eval()
    assert model.config.sar_input == "zeros"
    cloudy = torch.rand(1, 13, 16, 16)
    with torch.no_grad():
        a, b = model(cloudy, torch.rand(1, 2, 16, 16)), model(cloudy, torch.rand(1, 2, 16, 16))
    assert torch.equal(a, b)  # the radar is ignored, whatever is passed in
    with pytest.raises(ValueError, match="sar_input"):
        net.create_model("DSen2CR", sar_input="off")


def test_checkpoint_from_before_the_sar_config_loads_and_evaluates(synthetic_dataset, tmp_path):
    """tests/data/checkpoint_before_sar_config.pth was written by the code of commit 4bb3e5e (a small
    CrossAttention, widths 8/16/32, trained with --sar_input zeros, which that code kept only in ckpt["args"])."""
    ckpt = runtime.load_checkpoint(OLD_CHECKPOINT)
    assert "sar_input" not in ckpt["model_config"] and ckpt["args"]["sar_input"] == "zeros"
    model, _ = runtime.load_model(OLD_CHECKPOINT, torch.device("cpu"))
    assert model.config.sar_input == "zeros"
    root, csv_path = synthetic_dataset
    summary = test_CR.evaluate(test_CR.build_parser().parse_args([
        "--checkpoint", str(OLD_CHECKPOINT), "--data_list_filepath", str(csv_path), "--input_data_folder",
        str(root), "--split", "test", "--results_dir", str(tmp_path), "--num_workers", "0", "--amp", "off"]))
    assert summary["sar_input"] == "zeros" and summary["n_images"] > 0


def test_one_autocast_context_is_reusable():
    ctx = runtime.autocast(torch.device("cpu"), torch.bfloat16)
    for _ in range(2):
        with ctx:
            assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
    assert isinstance(runtime.autocast(torch.device("cpu"), None), type(__import__("contextlib").nullcontext()))


def test_docs_switch_table_is_model_configs_flags():
    """docs/model.md's switch table has one row per ModelConfig field that is a training flag, with its default."""
    text = (ROOT / "docs" / "model.md").read_text()
    table = text[text.index("| switch | default |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    fields = {f.name: f.default for f in net.flag_fields()}
    assert set(rows) == set(fields), f"docs/model.md's switch table lacks {set(fields) - set(rows)}, " \
                                     f"has extra {set(rows) - set(fields)}"
    for name, default in fields.items():
        assert rows[name] == (f'`"{default}"`' if isinstance(default, str) else str(default)), name
