"""Every command-line flag of every script explains itself in --help."""
import argparse
import importlib
from pathlib import Path

import pytest

import bench_learn
import benchmark
import datalist
import dataloader
import net_CR_CrossAttention
import runtime
import synthetic_sets
import test_CR
import train_CR_kaggle

ROOT = Path(__file__).resolve().parents[1]

def _parsers():
    top = [("train_CR_kaggle", train_CR_kaggle.build_parser()), ("test_CR", test_CR.build_parser()),
           ("dataloader", dataloader.build_parser()), ("net_CR_CrossAttention", net_CR_CrossAttention.build_parser())]
    bench = argparse.ArgumentParser()
    sub = bench.add_subparsers()
    for name in benchmark.SUBCOMMANDS:
        add_arguments, _run = benchmark.subcommand(name)
        p = sub.add_parser(name)
        add_arguments(p)
        top.append((f"benchmark {name}", p))
    for name, parser in list(top):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                top.extend((f"{name} {sub_name}", p) for sub_name, p in action.choices.items())
    return top


@pytest.mark.parametrize("name,parser", _parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_has_help(name, parser):
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"{name}: flags without help: {missing}"


# Flags of both scripts that mean different things in each, so each script defines its own.
DIFFERENT_MEANING = {"batch_sz": "training: samples per process, or auto; evaluation: images per forward pass",
                     "crop_size": "training: a random crop to train on; evaluation: the centred crop scored",
                     "input_t": "training: the dates of the network to build (default 1, today's network); "
                                "evaluation: read from the checkpoint, given for --baseline mosaic"}


def _flags(parser):
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def test_flags_both_scripts_take_are_defined_once():
    """Every flag of both scripts is runtime.SHARED_FLAGS' (same type, choices and help, a script adding a note) or
    has a reason to differ."""
    train, evaluation = _flags(train_CR_kaggle.build_parser()), _flags(test_CR.build_parser())
    both = set(train) & set(evaluation)
    assert both - set(runtime.SHARED_FLAGS) == set(DIFFERENT_MEANING)
    assert set(runtime.SHARED_FLAGS) <= both
    for name, spec in runtime.SHARED_FLAGS.items():
        for parser in (train, evaluation):
            flag = parser[name]
            assert flag.option_strings == [f"--{name}"] and flag.help.startswith(spec["help"]), name
            assert (flag.type, flag.choices) == (spec.get("type"), spec.get("choices")), name
    assert train["load_size"].default == 256 and evaluation["load_size"].default is None  # documented in each


def test_shared_flags_take_a_note_and_a_default_of_their_script():
    parser = argparse.ArgumentParser()
    runtime.add_shared_flag(parser, "load_size", note="the script's own", default=64)
    runtime.add_shared_flag(parser, "amp")
    flags = _flags(parser)
    assert flags["load_size"].help == f"{runtime.SHARED_FLAGS['load_size']['help']}; the script's own"
    assert flags["load_size"].default == 64 and flags["amp"].default == "auto"
    assert parser.parse_args(["--amp", "bf16", "--load_size", "32"]).load_size == 32
    with pytest.raises(KeyError):
        runtime.add_shared_flag(parser, "not_a_shared_flag")


def test_model_name_choices_are_the_models():
    assert _flags(train_CR_kaggle.build_parser())["model_name"].choices == list(net_CR_CrossAttention.MODELS)


HELP_COMMANDS = [(net_CR_CrossAttention._smoke_test, []), (train_CR_kaggle.main, []), (test_CR.main, []),
                 (dataloader.main, []), *((dataloader.main, [name]) for name in ("synth", "scan", "check", "masks")),
                 (benchmark.main, []), *((benchmark.main, [name]) for name in benchmark.SUBCOMMANDS)]


def test_each_subcommand_lives_in_the_module_benchmark_names():
    """benchmark.SUBCOMMANDS (name -> module, imported when the subcommand runs) and the modules' COMMANDS agree."""
    modules = set(benchmark.SUBCOMMANDS.values())
    held = {name: module for module in modules for name in importlib.import_module(module).COMMANDS}
    assert held == benchmark.SUBCOMMANDS
    assert {p.stem for p in ROOT.glob("bench_*.py")} >= modules


@pytest.mark.parametrize("main, argv", HELP_COMMANDS, ids=lambda v: v.__module__ if callable(v) else " ".join(v))
def test_help_answers_and_does_nothing_else(main, argv, tmp_path, monkeypatch, capsys):
    """--help prints the usage and exits 0 without running anything (the smoke test used to run on it) and without
    writing a file, run from an empty folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: ") and "Model parameters" not in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_model_script_help_does_not_run_the_smoke_test(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "net_CR_CrossAttention.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: net_CR_CrossAttention.py"), proc.stderr[-2000:]
    assert "Model parameters" not in proc.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_loop_benchmark_times_the_training_loss_it_compares_with(tmp_path):
    """`benchmark.py loop` runs the design loss preset end to end (its bare step is train_step on a loader batch put on
    the device beforehand, with the cloud labels the confidence term reads) and ends with the `loop/step RATIO`
    line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmark.py", "loop", "--size", "32", "--batch", "2", "--steps", "2",
                           "--warmup", "1", "--block", "1", "--unique", "6", "--loss", "design"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("loop/step ") and float(last.split()[1]) > 0, last


def _learn_args(*argv):
    p = argparse.ArgumentParser()
    bench_learn._add_learn_args(p)
    return bench_learn.resolve_learn_setting(p.parse_args(argv))


@pytest.mark.parametrize("setting", [s for s in bench_learn.LEARN_SETTINGS if s != "ts"])
def test_learn_settings_give_train_val_and_test_scenes_of_the_same_pixels(setting, tmp_path):
    args = _learn_args("--setting", setting)
    csv_path = synthetic_sets.make_synthetic_dataset(tmp_path, n=args.n, size=args.size, seed=args.data_seed)
    counts = [sum(t.split == split for t in datalist.read_data_list(csv_path)) for split in (1, 2, 3)]
    assert all(counts), counts
    # as many pixels per run and per step as the 64 px setting, so the two compare at about equal cost
    assert args.n * args.size ** 2 == 80 * 64 ** 2 and args.batch_sz * args.size ** 2 == 4 * 64 ** 2


def test_the_time_series_setting_gives_every_split_and_a_single_date_list_of_the_same_targets(tmp_path):
    args = _learn_args("--setting", "ts")
    csv_path = synthetic_sets.make_synthetic_ts_dataset(tmp_path, n=args.n, size=16, seed=args.data_seed,
                                                    n_dates=bench_learn.TS_DATES)
    series = datalist.read_ts_list(csv_path)
    assert all(sum(s.split == split for s in series) for split in (1, 2, 3))
    single = datalist.read_data_list(bench_learn.ts_single_date_list(csv_path))
    assert [t.split for t in single] == [s.split for s in series]
    for t, s in zip(single, series):  # one of the series' dates in, one other date of it as the target
        assert t.s2_cloudy in s.s2 and t.s2_cloudfree in s.s2 and t.s2_cloudy != t.s2_cloudfree
        assert s.s1[s.s2.index(t.s2_cloudy)] == t.s1


def test_learn_flags_override_the_setting():
    args = _learn_args("--setting", "128", "--n", "24", "--out", "elsewhere")
    assert (args.n, args.size, args.batch_sz, args.out) == (24, 128, 1, "elsewhere")
    assert _learn_args().out != _learn_args("--setting", "128").out  # run names do not hold the size
