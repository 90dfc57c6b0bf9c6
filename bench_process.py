"""Measurements in a fresh process: a benchmark worker run by name in a new Python process, and its peak memory."""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def in_fresh_process(function, *args, timeout=None):
    """Run function(*args) in a new Python process and return its result (JSON-serialisable).

    A fresh process per variant gives each its own peak memory (VmHWM) and its own torch state (threads,
    compile caches); the function is an ordinary one of a bench_*.py module, called by name. The new process
    imports that module and what it imports, nothing else, so a worker's peak memory holds what it measures."""
    call = ("import importlib, json, sys; "
            "function = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); "
            "print('RESULT ' + json.dumps(function(*json.loads(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", call, function.__module__, function.__name__, json.dumps(args)],
                          cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(HERE)))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    raise RuntimeError(f"{function.__name__} failed (exit {proc.returncode}): "
                       f"{lines[-1][:300] if lines else 'no output'}")


def peak_rss_mb():
    """High-water mark of this process's resident memory (VmHWM). getrusage's ru_maxrss would also count the
    parent's resident set at fork time, which Linux carries across exec into a child's figure."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent

