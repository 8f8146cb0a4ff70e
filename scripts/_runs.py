"""Reading a finished run directory back: its config.json, its data and its model at
the checkpoint's parameters (for scripts that re-evaluate or diagnose a run)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from elbolab import models
from elbolab.inference.errors import UsageError
from elbolab.models.datasources import DataSplits
from elbolab.inference.checkpoints import CHECKPOINT, load_checkpoint
from elbolab.scripts import _cli

STATE_PREFIX = "model."  # the Lightning module holds the model as its attribute ``model``


@dataclass
class Run:
    path: str
    spec: dict
    data: DataSplits
    model: torch.nn.Module
    step: int


def read_spec(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no config.json there (not a run directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    for key in ("model", "model_config", "data", "train"):
        if key not in spec:
            raise UsageError(f"{path}: no {key!r} entry (not written by scripts.fit)")
    if spec["model"] not in models.REGISTRY:
        raise UsageError(f"{path}: unknown model {spec['model']!r}")
    return spec


def open_run(run_dir: str, out: str | None, threads: int | None) -> tuple[Run, str]:
    """What a script that re-reads a run does first: torch's thread count, the output
    directory (``out``, by default the run's own; refused if it is a file), glibc's
    allocator tuned, and the run loaded. Returns (run, output directory)."""
    from elbolab.inference.evaluate import tune_malloc

    if threads is not None:
        torch.set_num_threads(threads)
    out = out or run_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    tune_malloc()
    return load_run(run_dir), out


def load_run(run_dir: str) -> Run:
    """The run's spec, its data (loaded as the run loaded it) and its model with the
    checkpoint's parameters, in eval mode."""
    spec = read_spec(run_dir)
    model_cls = models.REGISTRY[spec["model"]][1]
    data = _cli.load_data(spec["data"], model_cls.likelihood)
    model = models.build_model(spec["model"], spec["model_config"], data.data_dim, data.n_train)
    ckpt = load_checkpoint(os.path.join(run_dir, CHECKPOINT))
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UsageError(f"{run_dir}/{CHECKPOINT}: no state_dict in the checkpoint")
    own = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    with torch.no_grad():  # a warm-up pass creates any lazily built parameters
        model.guide(data.train[:1])
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{run_dir}/{CHECKPOINT}: does not fit the model in config.json ({first[:200]})") from None
    model.eval()
    return Run(run_dir, spec, data, model, int(ckpt.get("global_step", 0)))
