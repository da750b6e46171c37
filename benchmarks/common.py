"""Helpers shared by the benchmark scripts: machine description, result files, model outputs."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def header(title: str, command: str) -> list[str]:
    """First lines of a result table: what, when, on which machine, and the command that made it."""
    return [f"## {title}, {datetime.date.today()} — {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads", f"command: {command}"]


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
