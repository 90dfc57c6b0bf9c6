"""notebooks/kaggle.ipynb, executed in a real Jupyter kernel (nbclient + ipykernel) on synthetic data with tiny
settings: a first session trains, evaluates and predicts a scene; a second session, started from the first one's
output as Kaggle attaches it (read-only), continues the training instead of restarting it."""
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
from test_train import DESIGN_FLAGS

import dataloader

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kaggle.ipynb"
RUN = Path("checkpoints") / "glf_cr_enhanced_v3"
RESULTS = Path("results") / "glf_cr_enhanced_v3"


def tiny_parameters(data, out, **changes):
    """Every parameter of the notebook, set for seconds-long steps on 64 px patches, offline, on the CPU."""
    return {"REPO_DIR": str(ROOT), "DATA_DIR": str(data), "OUT_DIR": str(out), "PREVIOUS_OUTPUT": "",
            "HOURS_LEFT": 1.0, "RESERVE_HOURS": 0.25, "EPOCHS": 1, "PRECOMPUTE_MASKS": True,
            "RUN_LEAK_CHECK": True,
            "SPLIT": "random", "BATCH_SIZE": 2, "LOAD_SIZE": 64, "CROP_SIZE": 32, "VGG_WEIGHTS": "random",
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


def execute(kernel_name, cwd, parameters):
    """Run the whole notebook with the parameters cell's source replaced; a failing cell raises here."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
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
    assert '"--max_epochs", EPOCHS, "--batch_sz", BATCH_SIZE' in train_cell.source


@pytest.mark.slow
def test_notebook_runs_end_to_end_and_a_later_session_resumes(kernel_name, tmp_path):
    data = tmp_path / "input" / "sen12mscr"
    dataloader.make_synthetic_dataset(data, n=12, size=64, seed=0)
    (data / "data.csv").unlink()  # the notebook lists the data itself
    read_only(tmp_path / "input")  # like /kaggle/input
    first, second = tmp_path / "session1", tmp_path / "session2"
    try:
        cells = execute(kernel_name, tmp_path, tiny_parameters(data, first))
        run = first / RUN
        assert (run / "best.pth").is_file() and (run / "last.pth").is_file()
        assert [int(r["epoch"]) for r in history(run)] == [1]
        summary = json.loads((first / RESULTS / "summary.json").read_text())
        assert summary["n_images"] == 4 and summary["protocol"] == "full"
        assert len(list((first / RESULTS / "png").glob("*.png"))) == 2, "NUM_SAVED bounds the quicklooks"
        with rasterio.open(first / "scene" / "prediction.tif") as scene:
            assert scene.count == 13 and 64 < scene.width <= 96 and 64 < scene.height <= 96  # more than a patch
        assert images_shown(cell_running(cells, "test_CR.format_table")) == 2
        assert images_shown(cell_running(cells, "plt.subplots")) == 1
        assert "best.pth" in text_of(cell_running(cells, "altogether"))

        read_only(first)  # the earlier session's output, attached as an input
        cells = execute(kernel_name, tmp_path, tiny_parameters(data, second, PREVIOUS_OUTPUT=str(first), EPOCHS=2))
        copied = text_of(cell_running(cells, "copy_writable(src, dst)"))
        assert copied.count("copied ") == 3, copied
        assert "(0 made, 12 already there)" in text_of(cell_running(cells, '"masks"'))
        train_log = text_of(cell_running(cells, "DESIGN_FLAGS = "))
        assert "resuming from" in train_log and "(epoch 1 done" in train_log, train_log[-2000:]
        resumed = history(second / RUN)
        assert [int(r["epoch"]) for r in resumed] == [1, 2]
        assert resumed[0] == history(run)[0], "the first epoch is kept, not trained again"
        assert all(p.stat().st_mode & stat.S_IWUSR for p in (second / RUN).rglob("*")), "the copies are writable"
        assert "2 of 2 epochs" in text_of(cell_running(cells, "epochs in {RUN}"))
    finally:
        writable(tmp_path)
