"""Helpers shared by the benchmark scripts: machine description, result files, model outputs."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

import torch


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def cpu_slug() -> str:
    """The CPU model and core count as a folder name: ``AMD EPYC`` on 2 cores -> ``cpu-amd-epyc-2core``."""
    model = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "unknown"
    return f"cpu-{model}-{os.cpu_count()}core"


def results_dir() -> str:
    """``benchmarks/results/<cpu model>/``, created if missing."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", cpu_slug())
    os.makedirs(path, exist_ok=True)
    return path


def git_commit() -> str:
    """The checked-out commit, with ``+changes`` when tracked files outside ``benchmarks/results/`` (which
    a run appends to) differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(top,exclude)benchmarks/results"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except Exception:
        return "unknown commit"


def header(title: str, command: str) -> list[str]:
    """First lines of a result table: what, when, on which machine and commit, and the command."""
    return [f"## {title}, {datetime.date.today()} — {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, commit {git_commit()}", f"command: {command}"]


def emit(lines: list[str], out: str | None) -> None:
    """Print a table and append it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def model_output(y) -> torch.Tensor:
    """The tensor a model returns: itself, ``.logits`` or ``.last_hidden_state``."""
    if isinstance(y, torch.Tensor):
        return y
    logits = getattr(y, "logits", None)
    return logits if logits is not None else y.last_hidden_state
