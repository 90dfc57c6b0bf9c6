"""README.md, BENCHMARKS.md and docs/*.md cannot drift from the code.

Every `python X.py ...` line of their ```bash blocks must name a script that exists and use only flags (and, where a
flag has choices, values) that the script's parser accepts; every relative link must reach a file, and a heading
where it names one; every `module.name` a ```python block uses must exist. The README's first command runs (slow).
"""
import argparse
import ast
import difflib
import importlib
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = {"python", "python3"}
LAUNCHERS = {"torchrun", "srun", "mpirun"}  # the script is their first *.py argument; what precedes is theirs
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # PATH, ROOT, HOURS: a value the reader fills in


def bash_lines(page):
    """(line number, command line) of every ```bash block of a page; continuation lines joined."""
    lines, out, in_block, pending, start = page.read_text().splitlines(), [], False, "", 0
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if not in_block:
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", 0
    return out


def tokens_of(line):
    """Shell words of a line, comments dropped, with `&&`, `||`, `;` and `|` as their own tokens."""
    # "...the design's flags...": prose, whose apostrophe is no shell quote
    line = re.sub(r"\.\.\.[^.]*\.\.\.", lambda m: m.group(0).replace("'", ""), line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def script_calls(line):
    """(script, its arguments) for every script a command line runs: `python X.py ...`, `torchrun ... X.py ...`,
    `python -m torch.distributed.run ... X.py ...`. Other programs (pip, tensorboard, python -c/-m) are not ours."""
    words, segments = tokens_of(line), [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append([])
        else:
            segments[-1].append(word)
    calls = []
    for seg in filter(None, segments):
        program = Path(seg[0]).name
        launched = program in LAUNCHERS or (program in PYTHONS and seg[1:3] == ["-m", "torch.distributed.run"])
        if launched:
            scripts = [i for i, w in enumerate(seg) if w.endswith(".py")]
            assert scripts, f"a launcher without a script: {line}"
            calls.append((seg[scripts[0]], seg[scripts[0] + 1:]))
        elif program in PYTHONS and len(seg) > 1 and seg[1] not in ("-m", "-c"):
            calls.append((seg[1], seg[2:]))
    return calls


def documented_calls():
    return [pytest.param(script, args, id=f"{page.name}:{number}")
            for page in PAGES for number, line in bash_lines(page) for script, args in script_calls(line)]


class _Built(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _raise_built(parser, *args, **kwargs):
    raise _Built(parser)


@cache
def parser_of(script):
    """The script's argparse parser: its build_parser(), or the one its main() builds (caught at parse_args)."""
    module = importlib.import_module(Path(script).stem)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _raise_built):
        try:
            module.main([])
        except _Built as built:
            return built.parser
    raise AssertionError(f"{script}: neither build_parser() nor a main() that builds a parser")


def subcommands(parser):
    """{name: parser} of a parser's subcommands (argparse keeps them in a private action)."""
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def is_value_to_check(word):
    return not word.startswith("-") and "..." not in word and not PLACEHOLDER.fullmatch(word)


def check_arguments(script, parser, args):
    """Every flag is one of the parser's option strings (spelled out: argparse would also take a prefix, which
    a renamed flag must not pass as), and a value given to a flag with choices is one of them."""
    name, commands = script, subcommands(parser)
    if commands:
        positional = [a for a in args if not a.startswith("-") and "..." not in a]  # "...same flags...": the reader's
        assert positional and positional[0] in commands, f"{script}: {positional[:1]} is not in {list(commands)}"
        parser, name = commands[positional[0]], f"{script} {positional[0]}"
        args = args[args.index(positional[0]) + 1:]
    options, i = parser._option_string_actions, 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not arg.startswith("-") or re.fullmatch(r"-\d.*", arg):
            continue  # a positional argument, a negative number, or the reader's own "...same flags..."
        flag, equals, attached = arg.partition("=")
        assert flag in options, f"{flag} is not a flag of {name} (closest: {difflib.get_close_matches(flag, options)})"
        action, values = options[flag], [attached] if equals else []
        if not equals:  # the words the flag takes as its values, as argparse would (a value may start with "--")
            takes = {None: 1, "?": 1, "*": len(args), "+": len(args)}.get(action.nargs, action.nargs)
            while len(values) < takes and i < len(args) and (action.nargs is None or not args[i].startswith("-")):
                values.append(args[i])
                i += 1
        for value in filter(is_value_to_check, values if action.choices is not None else []):
            assert value in {str(c) for c in action.choices}, f"{name}: {flag} {value} not in {action.choices}"


@pytest.mark.parametrize("script, args", documented_calls())
def test_documented_command_uses_only_flags_the_script_accepts(script, args):
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if args:
        check_arguments(script, parser_of(script), args)


def test_the_commands_are_found():
    """The extraction itself: the README's two first commands, a launcher line and a continued line are seen."""
    readme = [call for _, line in bash_lines(ROOT / "README.md") for call in script_calls(line)]
    assert readme[0] == ("train_CR_kaggle.py", ["--demo"])
    assert ("train_CR_kaggle.py", ["...same", "flags..."]) in readme  # torchrun's line: its flags are not ours
    continued = [args for script, args in readme if script == "test_CR.py" and "--predict" in args]
    assert continued and "--overlap" in continued[0]
    assert script_calls("pip install -r requirements.txt && python -m pytest -q tests") == []
    assert script_calls("torchrun --nproc_per_node=2 train_CR_kaggle.py --batch_sz 6 ...same flags...") == [
        ("train_CR_kaggle.py", ["--batch_sz", "6", "...same", "flags..."])]


def test_a_renamed_flag_or_a_wrong_choice_fails():
    parser = parser_of("test_CR.py")
    check_arguments("test_CR.py", parser, ["--protocol", "glfcr", "--results_dir", "results/x"])
    with pytest.raises(AssertionError, match="--result_dir is not a flag"):
        check_arguments("test_CR.py", parser, ["--result_dir", "results/x"])
    with pytest.raises(AssertionError, match="--protocol uncrtaints not in"):
        check_arguments("test_CR.py", parser, ["--protocol", "uncrtaints"])
    with pytest.raises(AssertionError, match="is not in"):
        check_arguments("dataloader.py", parser_of("dataloader.py"), ["sacn", "ROOT", "--out", "x.csv"])


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        match = re.match(r"#{1,6} (.+)", line) if not in_code else None
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_reach_a_file_and_heading(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: {linked} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_use_names_that_exist(page):
    project = {p.stem for p in ROOT.glob("*.py")}
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE):
        tree = ast.parse(block)
        imported = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names if alias.name in project}  # the name used -> the module
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
                module = importlib.import_module(imported[node.value.id])
                assert hasattr(module, node.attr), f"{page.name}: {node.value.id}.{node.attr} does not exist"


@pytest.mark.slow
def test_the_readme_first_command_and_the_command_it_prints_run(tmp_path):
    """README's first command (the demo), shortened to one epoch and saving under tmp_path, then the evaluation
    command it prints; both from tmp_path, with the scripts named by their path in the checkout."""
    first = next(line for _, line in bash_lines(ROOT / "README.md"))
    script, args = script_calls(first)[0]
    # No network: a proxy on a closed port makes the VGG weights probe fail at once, so the demo takes its offline
    # path (as on Kaggle without internet) rather than downloading 548 MB; cached weights are used as they are.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **{name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")}}
    train = subprocess.run([sys.executable, str(ROOT / script), *args, "--max_epochs", "1",
                            "--save_model_dir", str(tmp_path / "checkpoints")],
                           check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    printed = train.stdout.strip().splitlines()[-1].strip()
    words = shlex.split(printed)
    assert words[:2] == ["python", "test_CR.py"], printed
    evaluate = subprocess.run([sys.executable, str(ROOT / words[1]), *words[2:]], cwd=tmp_path, env=env,
                              check=False, capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    results = tmp_path / "results" / "demo"
    assert (results / "summary.json").is_file() and any((results / "png").glob("*.png"))
