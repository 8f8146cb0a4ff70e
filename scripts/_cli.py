"""What every program shares: one-line errors with exit status 2, flags generated from
the Configs' fields (a default is declared once, in its Config), the data flags and the
output flags. The run directory itself (refuse to clobber, lock against a second
writer) is ``inference.runs.RunDir``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import types
import typing
from typing import Any, Callable

from elbolab.inference.errors import NonFiniteError, UsageError
from elbolab.inference.runs import DataSpec, LoadedRun, read_run, resolve_binarize
from elbolab.inference.train_config import TrainConfig
from elbolab.models.common import field_types
from elbolab.models.datasources import BINARIZE, DATASETS

EXIT_USAGE = 2
EXIT_FAILURE = 1
# what a program's user can do about a non-empty --out
REFUSAL = "pass --overwrite to replace what it holds"
REFUSAL_RUN = "pass --overwrite to replace its run or --resume to continue it"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default shown, unless it is None (the flag's absence means
    something its help says) or the help states it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" not in text and "%(default)" not in text and action.default is not None
                and action.default is not argparse.SUPPRESS and action.option_strings
                and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            text += " (default: %(default)s)"
        return text


def parser(prog: str, description: str, epilog: str = "") -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def guarded(prog: str) -> Callable:
    """Run a program's main and return its exit status, never a traceback for these:

    * user errors (a flag, a file, a value; argparse's own) -> one line, exit 2;
    * a non-finite loss -> one line, exit 1 (the last good checkpoint is kept);
    * a system fault (``OSError``: a full disk, a vanished directory; out of
      memory) -> one line naming the file, exit 1 (what was saved stays saved).
    """

    def deco(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None, **hooks) -> int:  # hooks: for a caller in-process
            try:
                return int(main(argv, **hooks) or 0)
            except SystemExit as e:  # argparse: --help (0) or a usage error (2, its line already printed)
                return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
            except UsageError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return EXIT_USAGE
            except NonFiniteError as e:
                print(f"{prog}: error: {e} (the last checkpoint is the last good state)", file=sys.stderr)
                return EXIT_FAILURE
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
                return EXIT_FAILURE
            except MemoryError:
                print(f"{prog}: error: out of memory", file=sys.stderr)
                return EXIT_FAILURE
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return wrapper

    return deco


# ----------------------------------------------------------------------------- values


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    v = integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, e.g. 300,300; "none" is the empty list."""
    if text.strip().lower() == "none":
        return ()
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


# ----------------------------------------------------------------------------- flags from Configs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _union_args(kind) -> tuple:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return ()


def _parser_for(kind, positive: bool):
    """The argparse ``type`` of a Config field's annotation (``X | None`` also takes "none")."""
    args = _union_args(kind)
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if typing.get_origin(base) is tuple:
        parse = int_list
    elif base is int:
        parse = positive_int if positive else integer
    elif base is float:
        parse = positive_float if positive else finite_float
    else:
        parse = str
    if type(None) not in args:
        return parse

    def parse_optional(text: str):
        return None if text.strip().lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _describe_default(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return "none" if v is None else str(v)


def add_config_args(group, classes: dict[str, type], *, only=None, exclude=(), defaults: dict | None = None,
                    positive=()) -> list[str]:
    """A flag ``--field-name`` for each field of the Config dataclasses ``classes`` (label ->
    class; a field several have gets one flag): its help is the field's ``help`` with each
    class's default (``defaults``: what a program uses instead) and the field's choices;
    its value is checked by the Config when that is built. The flags default to None: a
    value the user did not give is the Config's (or the program's) default. ``positive``:
    fields whose value must be >= 1 (integers) or > 0 (numbers), checked here. Returns
    the field names."""
    seen: dict[str, list] = {}
    for label, cls in classes.items():
        kinds = field_types(cls)
        for f in dataclasses.fields(cls):
            if (only is not None and f.name not in only) or f.name in exclude:
                continue
            seen.setdefault(f.name, []).append((label, f, kinds[f.name]))
    defaults = defaults or {}
    for name, where in seen.items():
        _, f, kind = where[0]
        text = f.metadata.get("help", name.replace("_", " "))
        notes = []
        if len(where) < len(classes):
            notes.append(f"{', '.join(label for label, _, _ in where)} only")
        if name in defaults:
            notes.append(f"default: {_describe_default(defaults[name])}")
        else:
            values = {label: fl.default for label, fl, _ in where}
            if len(set(map(_describe_default, values.values()))) == 1:
                value = next(iter(values.values()))
                if value is not None:  # None: the help says what the field's absence means
                    notes.append(f"default: {_describe_default(value)}")
            else:
                notes.append("default: " + ", ".join(f"{label} {_describe_default(v)}" for label, v in values.items()))
        if notes:
            text += f" ({'; '.join(notes)})"
        choices = [c for _, fl, _ in where for c in fl.metadata.get("choices", ())]
        if choices:
            text += "; one of " + ", ".join(dict.fromkeys(choices))
        if kind is bool or set(_union_args(kind)) == {bool, type(None)}:
            group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag(name), dest=name, type=_parser_for(kind, name in positive), default=None,
                               metavar=name.upper(), help=text)
    return list(seen)


def config_args(args: argparse.Namespace, cls: type, names, label: str = "") -> dict[str, Any]:
    """The values given on the command line (not None) among the flags ``names`` that are
    fields of ``cls``; a flag given for a field ``cls`` does not have is refused."""
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    stray = sorted(set(given) - fields)
    if stray:
        raise UsageError(f"{', '.join(flag(n) for n in stray)} does not apply{' to ' + label if label else ''}")
    return given


# ----------------------------------------------------------------------------- data


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="built-in digits (8x8, scikit-learn), or MNIST / Fashion-MNIST IDX files in --data-dir "
                        "(default: digits)")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="your own matrix (.npy, .npz or .csv, one row per datapoint); wins over --dataset")
    g.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding train-images-idx3-ubyte[.gz] and the other IDX files")
    g.add_argument("--binarize", default="auto", choices=("auto",) + BINARIZE,
                   help="auto: threshold 0.5 for the digits, dynamic for MNIST-style sets under a "
                        "Bernoulli decoder; none otherwise")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training rows (MNIST-style sets, --data) held out for validation; "
                        "the digits split is fixed (1257/270/270) (default: 0.1)")


def data_spec(args: argparse.Namespace, likelihood: str | None) -> DataSpec:
    """The data flags as a ``DataSpec`` (``--binarize auto`` resolved for the likelihood)."""
    return DataSpec.from_dict({
        "dataset": args.dataset, "data_path": args.data, "data_dir": args.data_dir,
        "binarize": resolve_binarize(args.binarize, args.dataset, args.data, likelihood),
        "val_fraction": args.val_fraction}, "the data flags")


# ----------------------------------------------------------------------------- training and output


TRAIN_POSITIVE = ("n_particles", "lr", "lr_final", "batch_size", "epochs", "steps", "clip_norm", "val_every",
                  "patience", "val_particles", "checkpoint_every", "threads", "devices", "num_nodes")
DISTRIBUTED = ("devices", "num_nodes", "strategy", "accelerator")


def add_train_args(p: argparse.ArgumentParser, defaults: dict | None = None, only=None) -> list[str]:
    """The training flags, generated from ``TrainConfig``'s fields (the distributed ones in
    a group of their own; ``--seed`` is an output flag). Returns the field names."""
    names = add_config_args(p.add_argument_group("training"), {"train": TrainConfig}, only=only,
                            exclude=DISTRIBUTED + ("seed",), defaults=defaults, positive=TRAIN_POSITIVE)
    if only is None or any(n in only for n in DISTRIBUTED):
        names += add_config_args(p.add_argument_group("distributed (passed to Lightning)"), {"train": TrainConfig},
                                 only=[n for n in DISTRIBUTED if only is None or n in only], defaults=defaults,
                                 positive=TRAIN_POSITIVE)
    return names


def train_values(args: argparse.Namespace, names, defaults: dict | None = None) -> dict[str, Any]:
    """TrainConfig's fields from the flags ``names`` that were given (over ``defaults``),
    and the seed."""
    values = {**(defaults or {}), **config_args(args, TrainConfig, names)}
    values["seed"] = args.seed
    return values


def add_out_args(p: argparse.ArgumentParser, default: str | None = None, resume: bool = False,
                 what: str = "the run directory: config.json, metrics.json, history.csv, the checkpoint and figures"
                 ) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=default, required=default is None and not resume,
                   help=f"{what}; refused if it holds files, unless --overwrite"
                        + (f" (default: {default})" if default else ""))
    g.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    g.add_argument("--seed", type=integer, default=0, help="random seed (default: 0)")
    if resume:
        g.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last checkpoint (its own config.json is used)")


def open_run(run_dir: str, out: str | None, threads: int | None) -> tuple[LoadedRun, str]:
    """What a program that re-reads a run does first: torch's thread count, the output
    directory (``out``, by default the run's own; refused if it is a file), glibc's
    allocator tuned, and the run loaded. Returns (run, output directory)."""
    import os

    import torch

    from elbolab.inference.evaluate import tune_malloc

    if threads is not None:
        torch.set_num_threads(threads)
    out = out or run_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    tune_malloc()
    return read_run(run_dir), out
