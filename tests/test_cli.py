"""Every command-line flag of every script explains itself in --help."""
import argparse

import pytest

import benchmark
import dataloader
import test_CR
import train_CR_kaggle


def _parsers():
    top = [("train_CR_kaggle", train_CR_kaggle.build_parser()), ("test_CR", test_CR.build_parser()),
           ("dataloader", dataloader.build_parser())]
    bench = argparse.ArgumentParser()
    sub = bench.add_subparsers()
    for name, (add_arguments, _run) in benchmark.SUBCOMMANDS.items():
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
