"""Checkpoints: written atomically (temporary file, fsync, rename), read with
``torch.load(weights_only=True)`` so that a checkpoint file cannot run code, and checked
against the model they are loaded into; the per-step history beside them."""

from __future__ import annotations

import csv
import os
from typing import Any

import torch

from elbolab.inference.errors import UsageError
from elbolab.inference.files import atomic_write

CHECKPOINT = "checkpoint.ckpt"
HISTORY = "history.csv"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through ``atomic_write``: the old checkpoint or the new one, never a partial file."""
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code runs); errors are UsageErrors."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: refused to load the checkpoint ({first[:200]})") from None


CHECKPOINT_KEYS = ("state_dict", "global_step", "epoch", "loops", "optimizer_states", "elbolab")


def check_checkpoint(path: str, model: torch.nn.Module) -> dict:
    """Load ``path`` (weights only) and check it is a checkpoint of this driver for
    ``model``: its keys, and parameter names and shapes. Returns it; UsageError if not."""
    ck = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UsageError(f"{path}: not a checkpoint of this program (no {', '.join(missing)})")
    want = {"model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in ck["state_dict"].items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise UsageError(f"{path}: its parameters do not match the model ({', '.join(diff[:3])}"
                         f"{', ...' if len(diff) > 3 else ''})")
    return ck


def checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            atomic_torch_save(checkpoint, str(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return load_checkpoint(str(path))

    return AtomicCheckpointIO()



def history_to_tensor(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["step"], r["epoch"], r["loss"], r["seconds"]] for r in rows],
                        dtype=torch.float64).reshape(-1, 4)


def history_from_tensor(t: torch.Tensor) -> list[dict]:
    return [{"step": int(s), "epoch": int(e), "loss": float(l), "seconds": float(sec)}
            for s, e, l, sec in t.tolist()]



def write_history(rows: list[dict], validations: list[dict], path: str) -> None:
    """history.csv: one row per step, nats per datapoint, higher is better: the training
    bound (the objective's value on the step's mini-batch, scaled to the data set), and the
    validation ELBO with its standard error where measured."""
    val_at = {v["step"]: v for v in validations}
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "train_bound", "seconds", "val_elbo", "val_elbo_se"])
        for r in rows:
            v = val_at.get(r["step"])
            w.writerow([r["step"], r["epoch"], f"{-r['loss']:.6f}", f"{r['seconds']:.4f}",
                        "" if v is None else f"{v['val_elbo']:.6f}",
                        "" if v is None else f"{v['val_elbo_se']:.6f}"])

