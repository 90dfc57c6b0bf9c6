"""Beyond one machine: two torchrun "nodes" on this host (c10d rendezvous, gloo, CPU) train one epoch together."""
import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_train import ROOT, _free_port, tiny

import train_CR_kaggle as train


@pytest.mark.parametrize("world, per_node, launcher", [
    (1, None, "python "),
    (2, "2", "torchrun --nproc_per_node=2 "),
    (8, "4", "torchrun --nnodes=2 --nproc_per_node=4 "),
])
def test_the_printed_resume_command_launches_the_same_processes(world, per_node, launcher, monkeypatch):
    """torchrun tells each process how many run on its node (LOCAL_WORLD_SIZE); across nodes, resuming takes as many
    processes per node, started on every node with the launch's own rendezvous flags."""
    if per_node is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    run = SimpleNamespace(world_size=world, argv=["--max_epochs", "30", "--train_from_scratch", "--time_limit", "11"])
    command = train.resume_command(run)
    assert command.startswith(launcher) and "--max_epochs 30 --time_limit 11" in command
    assert "--train_from_scratch" not in command
    assert ("on every node" in command) == launcher.startswith("torchrun --nnodes")


@pytest.mark.slow
def test_two_nodes_agree_on_validation_and_one_writes_the_checkpoint(synthetic_dataset, tmp_path):
    root, csv_path = synthetic_dataset
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = []
    for node in ("a", "b"):
        # On a cluster the two nodes share one --save_model_dir; here each gets its own folder, so the test sees
        # which node wrote and that the other wrote nothing.
        argv = tiny(csv_path, root, tmp_path / node, "--device", "cpu", "--perceptual_weight", "0")
        argv.remove("--use_contrastive_loss")  # no VGG: the run is about the ranks, not the losses
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes",
               str(ROOT / "train_CR_kaggle.py"), *argv]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in nodes]
    finally:  # a node left waiting at the rendezvous must not outlive the test
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(nodes, outputs):
        assert proc.returncode == 0, out[-3000:]

    folders = [tmp_path / node for node in ("a", "b")]
    writer = [i for i, folder in enumerate(folders) if folder.exists()]
    assert len(writer) == 1, f"exactly one node (rank 0's) writes, found output under {writer}"
    main, other = writer[0], 1 - writer[0]
    run = folders[main] / "glf_cr_enhanced_v3"
    assert sorted(p.name for p in folders[main].rglob("*.pth")) == ["best.pth", "last.pth"]
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert outputs[main].count("done: best validation PSNR") == 1 and "done:" not in outputs[other]
    assert "device cpu x2" in outputs[main]

    history = list(csv.DictReader((run / "history.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in history] == [1]
    rank1_lines = [line for line in outputs[other].splitlines() if line.startswith("rank 1 of 2: epoch 1 validation")]
    assert len(rank1_lines) == 1, outputs[other][-2000:]
    assert rank1_lines[0].split("validation PSNR ")[1].split()[0] == f"{float(history[0]['val_PSNR']):.6f}"
