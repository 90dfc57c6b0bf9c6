"""notebooks/kaggle.ipynb, executed in a real Jupyter kernel (nbclient + ipykernel) on synthetic data with tiny
settings: a first session (no GPU: a short run) dry-runs, trains, evaluates and predicts a scene; a second session,
started from the first one's output as Kaggle attaches it (read-only), continues the training instead of restarting
it. Its first cells alone: what it says with no GPU, on a P100 with and without kernels for it, and offline."""
import ast
import csv
import json
import stat
import sys
from pathlib import Path

import nbformat
import pytest
import rasterio
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from test_train import DESIGN_FLAGS

import synthetic_sets
import train_CR_kaggle

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kaggle.ipynb"
RUN = Path("checkpoints") / "glf_cr_enhanced_v3"
RESULTS = Path("results") / "glf_cr_enhanced_v3"


def tiny_parameters(data, out, **changes):
    """Every parameter of the notebook, set for seconds-long steps on 64 px patches, offline, on the CPU."""
    return {"OFFLINE": True, "WHEELS_DIR": "", "REPO_DIR": str(ROOT), "DATA_DIR": str(data), "OUT_DIR": str(out),
            "PREVIOUS_OUTPUT": "", "HOURS_LEFT": 1.0, "RESERVE_HOURS": 0.25, "EPOCHS": 1, "CPU_EPOCHS": 1,
            "PRECOMPUTE_MASKS": True,
            "RUN_LEAK_CHECK": True,
            "SPLIT": "random", "INPUT_T": 1, "BATCH_SIZE": 2, "LOAD_SIZE": 64, "CROP_SIZE": 32, "VGG_WEIGHTS": "random",
            "AMP": "off", "EXPERIMENT": "glf_cr_enhanced_v3", "NUM_SAVED": 2, "SCENE_MAX_PX": 96, "TILE": 32,
            **changes}


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0] is next(c for c in nb.cells if c.cell_type == "code")
    return cells[0]


def assigned_names(source):
    tree = ast.parse(source)
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            for t in (target.elts if isinstance(target, ast.Tuple) else [target])}


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter (the test's virtual environment), found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "glfcr-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "the tests' Python", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "glfcr-test"


def execute(kernel_name, cwd, parameters, until=None, then=()):
    """Run the notebook with the parameters cell's source replaced (up to the cell whose source holds `until`,
    followed by the cells `then`, when given); a failing cell raises here."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    if until is not None:
        nb.cells = nb.cells[:nb.cells.index(cell_running(nb.cells, until)) + 1]
        nb.cells += [nbformat.v4.new_code_cell(source) for source in then]
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    return code


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def cell_running(cells, needle):
    return next(c for c in cells if needle in c.source)


def images_shown(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.outputs if o.output_type == "display_data")


def history(run_dir):
    return list(csv.DictReader((run_dir / "history.csv").read_text().splitlines()))


def read_only(folder):
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(folder):
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert assigned_names(parameters_cell(nb).source) == set(tiny_parameters("d", "o")), \
        "the test sets every parameter the notebook has"
    markdown = [c for c in nb.cells if c.cell_type == "markdown"][1:]
    assert all(len(c.source.splitlines()) == 1 for c in markdown), "one line of prose per step"


def test_notebook_trains_with_the_design_flags():
    """The design's command minus what the parameters set (epochs, batch, paths, name) and --train_from_scratch,
    which would restart the run each session instead of resuming it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    train_cell = next(c for c in nb.cells if "DESIGN_FLAGS = " in c.source)
    flags = next(ast.literal_eval(node.value.func.value) for node in ast.parse(train_cell.source).body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "DESIGN_FLAGS").split()
    design = " ".join(DESIGN_FLAGS)
    for set_by_the_notebook in ("--max_epochs 30 ", "--batch_sz 6 ", "--experiment_name glf_cr_enhanced_v3 ",
                                "--train_from_scratch"):
        assert set_by_the_notebook in design
        design = design.replace(set_by_the_notebook, "")
    assert " ".join(flags) == design.split(" --notes")[0].strip()
    assert '"--max_epochs", TRAIN_EPOCHS, "--batch_sz",' in train_cell.source


def test_the_notebook_dry_runs_the_training_command_before_training():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    dry, train = code.index(next(s for s in code if "--dry_run" in s)), code.index("sh(*train_command())")
    assert dry < train and 'sh(*train_command(), "--dry_run")' in code[dry], "the same command, --dry_run added"


# The notebook's dry-run cell calls train_CR_kaggle.py --dry_run, which branch `sizing` adds (issue 26): until it is
# merged, the notebook stops there, so the test that runs all of it waits for the flag.
needs_dry_run = pytest.mark.skipif(
    "--dry_run" not in train_CR_kaggle.build_parser()._option_string_actions,
    reason="the notebook runs train_CR_kaggle.py --dry_run, which the `sizing` branch adds (issue 26)")


@pytest.mark.slow
@needs_dry_run
def test_notebook_runs_end_to_end_and_a_later_session_resumes(kernel_name, tmp_path):
    data = tmp_path / "input" / "sen12mscr"
    synthetic_sets.make_synthetic_dataset(data, n=12, size=64, seed=0)
    (data / "data.csv").unlink()  # the notebook lists the data itself
    read_only(tmp_path / "input")  # like /kaggle/input
    first, second = tmp_path / "session1", tmp_path / "session2"
    try:
        cells = execute(kernel_name, tmp_path, tiny_parameters(data, first, EPOCHS=3, VGG_WEIGHTS=""))
        run = first / RUN
        said = text_of(cell_running(cells, "N_GPUS = "))
        assert "no GPU: this notebook will train on the CPU" in said and "a short run of 1 of 3 epochs" in said
        assert "training without the perceptual and contrastive terms" in said
        plan = text_of(cell_running(cells, "def train_command"))
        assert "--dry_run" in plan and "nothing written" in plan, "the plan is shown before training"
        assert (run / "best.pth").is_file() and (run / "last.pth").is_file()
        assert [int(r["epoch"]) for r in history(run)] == [1]
        summary = json.loads((first / RESULTS / "summary.json").read_text())
        assert summary["n_images"] == 4 and summary["protocol"] == "full"
        assert len(list((first / RESULTS / "png").glob("*.png"))) == 2, "NUM_SAVED bounds the quicklooks"
        with rasterio.open(first / "scene" / "prediction.tif") as scene:
            assert scene.count == 13 and 64 < scene.width <= 96 and 64 < scene.height <= 96  # more than a patch
        assert images_shown(cell_running(cells, "reports.format_table")) == 2
        assert images_shown(cell_running(cells, "plt.subplots")) == 1
        assert "best.pth" in text_of(cell_running(cells, "altogether"))
        assert "the CPU's short run (CPU_EPOCHS = 1)" in text_of(cell_running(cells, "epochs in {RUN}"))

        read_only(first)  # the earlier session's output, attached as an input
        cells = execute(kernel_name, tmp_path, tiny_parameters(data, second, PREVIOUS_OUTPUT=str(first), EPOCHS=2,
                                                               CPU_EPOCHS=2, VGG_WEIGHTS="", RUN_LEAK_CHECK=False))
        copied = text_of(cell_running(cells, "copy_writable(src, dst)"))
        assert copied.count("copied ") == 3, copied
        assert "(0 made, 12 already there)" in text_of(cell_running(cells, '"masks"'))
        train_log = text_of(cell_running(cells, "sh(*train_command())"))
        assert "resuming from" in train_log and "(epoch 1 done" in train_log, train_log[-2000:]
        resumed = history(second / RUN)
        assert [int(r["epoch"]) for r in resumed] == [1, 2]
        assert resumed[0] == history(run)[0], "the first epoch is kept, not trained again"
        assert all(p.stat().st_mode & stat.S_IWUSR for p in (second / RUN).rglob("*")), "the copies are writable"
        assert "2 of 2 epochs" in text_of(cell_running(cells, "epochs in {RUN}"))
    finally:
        writable(tmp_path)


# The first cells alone (parameters, install, the machine), then a cell that shows what they decided.
MACHINE = "N_GPUS = "
SHOW_PLAN = "print('PLAN', TRAIN_EPOCHS, [str(f) for f in VGG_FLAGS])"


def first_cells_said(kernel_name, tmp_path, then=(), **changes):
    cells = execute(kernel_name, tmp_path, tiny_parameters(tmp_path / "data", tmp_path / "out", **changes),
                    until=MACHINE, then=then)
    return "".join(text_of(c) for c in cells)


@pytest.mark.slow
def test_with_no_gpu_it_says_so_and_trains_a_short_run_without_vgg_offline(kernel_name, tmp_path, monkeypatch):
    """No GPU here, as torch reports; offline with VGG_WEIGHTS "imagenet" and an empty torch cache: the perceptual
    terms go, said; a larger CPU_EPOCHS asks for more epochs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_cache"))
    said = first_cells_said(kernel_name, tmp_path, [SHOW_PLAN], EPOCHS=30, VGG_WEIGHTS="imagenet")
    assert said.index("no GPU: this notebook will train on the CPU, about ") < said.index("PLAN")
    assert "times slower" in said and "a short run of 1 of 30 epochs unless you set CPU_EPOCHS" in said
    assert "OFFLINE, and torch's cache has no vgg19-dcbb9e9d.pth" in said
    assert "PLAN 1 ['--perceptual_weight', '0', '--contrastive_weight', '0']" in said
    attached = tmp_path / "input" / "vgg19-dcbb9e9d.pth"  # the notebook checks it is there; the script reads it
    attached.parent.mkdir()
    attached.write_bytes(b"")
    said = first_cells_said(kernel_name, tmp_path, [SHOW_PLAN], EPOCHS=30, CPU_EPOCHS=5, VGG_WEIGHTS=str(attached))
    assert "a short run of 5 of 30 epochs" in said and f"PLAN 5 ['--vgg_weights', '{attached}']" in said


def pretend_gpu(name, capability, arch_list):
    """A cell that makes torch report one card of this capability and a build with these kernels (hardware and
    build facts only; the notebook's own code decides)."""
    return (f"import types\nimport torch\ntorch.cuda.device_count = lambda: 1\n"
            f"torch.cuda.get_device_properties = lambda i=0: types.SimpleNamespace(name={name!r}, "
            f"major={capability[0]}, minor={capability[1]}, total_memory=16 * 2**30)\n"
            f"torch.cuda.get_arch_list = lambda: {arch_list!r}")


P100 = ("Tesla P100-PCIE-16GB", (6, 0))
# Kaggle's image of 2026 (CUDA 12.8 build, Kaggle/docker-python#1546), and a CUDA 12.6 build's list.
KAGGLE_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.slow
def test_on_a_p100_it_stops_before_training_where_torch_lacks_its_kernels(kernel_name, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = nb.cells.index(cell_running(nb.cells, MACHINE))
    nb.cells.insert(index, nbformat.v4.new_code_cell(pretend_gpu(*P100, KAGGLE_ARCHS)))
    nb.cells = nb.cells[:index + 2]
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in
                                           tiny_parameters(tmp_path / "d", tmp_path / "o").items())
    with pytest.raises(CellExecutionError) as failed:
        NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    message = str(failed.value)
    assert "GPU 0: Tesla P100-PCIE-16GB, compute capability 6.0" in message and "has no kernels for it" in message
    assert "GPU T4 x2" in message and "sm_70 sm_75" in message


@pytest.mark.slow
def test_on_a_p100_with_its_kernels_it_trains_eager(kernel_name, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = nb.cells.index(cell_running(nb.cells, MACHINE))
    nb.cells.insert(index, nbformat.v4.new_code_cell(pretend_gpu(*P100, CU126_ARCHS)))
    nb.cells = nb.cells[:index + 2] + [nbformat.v4.new_code_cell(SHOW_PLAN)]
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in
                                           tiny_parameters(tmp_path / "d", tmp_path / "o", EPOCHS=30).items())
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    said = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "Tesla P100-PCIE-16GB, compute capability 6.0, 16.0 GiB: this PyTorch has its kernels" in said
    assert "torch.compile stays off" in said and "no GPU" not in said and "PLAN 30 " in said


@pytest.mark.slow
def test_offline_a_missing_package_stops_the_install_with_what_to_do(kernel_name, tmp_path):
    """Internet off: pip gets no index (it would hang or fail on a Kaggle session), so a package neither installed
    nor among WHEELS_DIR's wheels ends the notebook at the install, naming the way out."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train_CR_kaggle.py").write_text("")
    (repo / "requirements.txt").write_text("glfcr-not-a-package-anywhere>=1\n")
    (tmp_path / "wheels").mkdir()
    with pytest.raises(CellExecutionError, match="pip download -r requirements.txt -d wheels"):
        execute(kernel_name, tmp_path, tiny_parameters(tmp_path / "d", tmp_path / "o", REPO_DIR=str(repo),
                                                       WHEELS_DIR=str(tmp_path / "wheels")), until="INDEX = ")
