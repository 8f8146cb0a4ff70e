"""What every program shares: one-line errors with exit status 2, flags generated from
the Configs' fields (a default is declared once, in its Config), the data flags, the
output flags (and what each program writes into its --out), and the thread policy.
The run directory itself (refuse to clobber, lock against a second writer) is
``inference.runs.RunDir``.

Threads: every command runs torch on ``DEFAULT_THREADS`` = 1 CPU thread unless
``--threads N`` is given. The parser applies it (:class:`ArgumentParser`: a program's
``--threads`` left out is 1, whatever default the flag was declared with, and its help
says so), so that no program keeps torch's default of one thread per core: the models
here are small, and on a shared 2-core machine two threads made ``fit`` of the digits VAE
2.9 times slower (88 s against 31 s) and ``diagnose`` with two NUTS chains 6.3 times
(921 s against 146 s), measured side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import types
import typing
from typing import Any, Callable

from elbolab.inference.errors import Interrupted, NonFiniteError, UsageError
from elbolab.inference.runs import DataSpec, LoadedRun, read_run, resolve_binarize
from elbolab.inference.train_config import MAX_SEED, MAX_THREADS, TrainConfig
from elbolab.models.common import field_types
from elbolab.models.datasources import BINARIZE, DATASETS

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C stopped
# what a program's user can do about a non-empty --out
REFUSAL = "pass --overwrite to replace what it holds"
REFUSAL_RUN = "pass --overwrite to replace its run or --resume to continue it"


DEFAULT_THREADS = 1
THREADS_HELP = ("torch CPU threads (default: 1, every command's: the models here are small, and more threads "
                "than one per running program slowed fit and diagnose down 3-6 times on a shared 2-core "
                "machine; give more for a large model on cores of its own)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2), the thread policy (a
    ``--threads`` flag (``dest`` "threads") left out is ``DEFAULT_THREADS``, and its help
    says so; see the module docstring), and the flags every program shares checked the
    same way wherever they appear (:func:`check_shared_flags`)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "threads", DEFAULT_THREADS) is None:
            ns.threads = DEFAULT_THREADS
        try:
            check_shared_flags(ns)
        except UsageError as e:
            self.error(str(e))
        return ns, rest

    def format_help(self) -> str:
        for action in self._actions:
            if action.dest == "threads" and action.help is not argparse.SUPPRESS:
                action.help, action.metavar = THREADS_HELP, "N"
        return super().format_help()


def check_shared_flags(args: argparse.Namespace) -> None:
    """The one check of the flags programs share, whichever program parsed them:
    ``--seed`` an integer in [0, 2**62) (seeds are offset by ranks and splits and must
    stay below torch's 2**64), ``--threads`` in 1..MAX_THREADS, ``--out`` not empty and
    not an existing file. UsageError naming the flag."""
    seed = getattr(args, "seed", None)
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < MAX_SEED):
        raise UsageError(f"argument --seed: seed must be an integer in [0, 2**62), got {seed}")
    threads = getattr(args, "threads", None)
    if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
        raise UsageError(f"argument --threads: threads must be in 1..{MAX_THREADS}, got {threads}")
    out = getattr(args, "out", None)
    if out is not None:
        if not isinstance(out, str) or not out.strip():
            raise UsageError("argument --out: an empty directory name")
        if os.path.lexists(out) and not os.path.isdir(out):
            raise UsageError(f"argument --out: {out} exists and is not a directory")


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for this program: ``threads``, or DEFAULT_THREADS if None."""
    import torch

    torch.set_num_threads(DEFAULT_THREADS if threads is None else threads)


def add_threads_arg(p) -> None:
    """``--threads N`` (a parser or an argument group); left out, DEFAULT_THREADS."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)


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


def guarded(prog: str, resume_flag: str | None = None) -> Callable:
    """Run a program's main and return its exit status, never a traceback for these:

    * user errors (a flag, a file, a value; argparse's own) -> one line, exit 2;
    * a non-finite loss -> one line, exit 1 (the last good checkpoint is kept);
    * a system fault (``OSError``: a full disk, a vanished directory; out of
      memory, torch's failed allocations included) -> one line naming the file, exit 1
      (what was saved stays saved);
    * Ctrl-C (SIGINT) -> one line, exit 130; an interrupted fit's line names its last
      checkpoint and, with ``resume_flag`` (the program's flag that continues a run),
      the command that continues it.
    """

    def deco(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None, **hooks) -> int:  # hooks: for a caller in-process
            try:
                return int(main(argv, **hooks) or 0)
            except SystemExit as e:  # argparse: --help (0) or a usage error (2, its line already printed)
                return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
            except UsageError as e:
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return EXIT_USAGE
            except NonFiniteError as e:
                print(f"{prog}: error: {one_line(e)} (the last checkpoint is the last good state)", file=sys.stderr)
                return EXIT_FAILURE
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                print(one_line(f"{prog}: error: {where}{e.strerror or e}"), file=sys.stderr)
                return EXIT_FAILURE
            except MemoryError:
                print(f"{prog}: error: out of memory", file=sys.stderr)
                return EXIT_FAILURE
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                print(f"{prog}: error: out of memory ({_allocation(e)})", file=sys.stderr)
                return EXIT_FAILURE
            except KeyboardInterrupt as e:
                print(one_line(interrupted_line(prog, e, resume_flag)), file=sys.stderr)
                return EXIT_INTERRUPTED

        return wrapper

    return deco


def one_line(message) -> str:
    """A message as one line: line breaks and other control characters (a file name or a
    JSON key can hold them) written as escapes."""
    text = str(message)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def interrupted_line(prog: str, e: KeyboardInterrupt, resume_flag: str | None = None) -> str:
    """The one line of an interrupted program: what was kept and, for a fit with a run
    directory, the command that continues it."""
    line = f"{prog}: interrupted"
    if isinstance(e, Interrupted):
        line += f"; {e}"
        if resume_flag and e.run_dir is not None:
            line += f"; continue with: {prog} {resume_flag} {e.run_dir}"
    return line


def is_out_of_memory(e: BaseException) -> bool:
    """Whether a RuntimeError is torch's failure to allocate (CPU or CUDA)."""
    text = str(e)
    return any(s in text for s in ("can't allocate memory", "not enough memory", "CUDA out of memory",
                                   "Cannot allocate memory"))


def _allocation(e: BaseException) -> str:
    """What a failed allocation asked for, from torch's message."""
    m = re.search(r"tried to allocate (\d+) bytes", str(e))
    return f"an allocation of {int(m.group(1)):,} bytes failed" if m else "an allocation failed"


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


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        v = integer(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a share in [0, 1)."""
    v = finite_float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
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
    g.add_argument("--test-data", metavar="PATH", default=None,
                   help="your own test rows (with --data, whose rows are then split into training and validation "
                        "rows only)")
    g.add_argument("--labels", metavar="PATH", default=None,
                   help="class labels of --data's rows (a vector of integers): they colour the latent plots")
    g.add_argument("--test-labels", metavar="PATH", default=None, help="class labels of --test-data's rows")
    g.add_argument("--data-dir", metavar="DIR", default=None,
                   help="directory holding train-images-idx3-ubyte[.gz] and the other IDX files")
    g.add_argument("--binarize", default="auto", choices=("auto",) + BINARIZE,
                   help="auto: threshold 0.5 for the digits, dynamic for MNIST-style sets under a "
                        "Bernoulli decoder; none otherwise (default: auto)")
    g.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="share of the training rows (MNIST-style sets, --data) held out for validation; "
                        "the digits split is fixed (1257/270/270) (default: 0.1)")
    g.add_argument("--test-fraction", type=fraction, default=0.1,
                   help="share of --data's rows held out for testing (without --test-data; MNIST-style sets "
                        "have their own test set) (default: 0.1)")


def check_data_args(args: argparse.Namespace) -> None:
    """The data flags that only go together."""
    own = {"--test-data": args.test_data, "--labels": args.labels, "--test-labels": args.test_labels}
    if args.data is None and any(v is not None for v in own.values()):
        given = [k for k, v in own.items() if v is not None]
        raise UsageError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --data (your own matrix)")
    if args.test_labels is not None and args.test_data is None:
        raise UsageError("--test-labels labels the rows of --test-data")


def data_flags(args: argparse.Namespace) -> DataSpec:
    """The data flags as a ``DataSpec``, ``--binarize`` as given (auto: resolved by whoever
    knows the likelihood; ``runs.resolve_binarize``), not yet checked field by field."""
    check_data_args(args)
    return DataSpec(dataset=args.dataset, data_path=args.data, data_dir=args.data_dir, binarize=args.binarize,
                    val_fraction=args.val_fraction, test_fraction=args.test_fraction, test_path=args.test_data,
                    labels_path=args.labels, test_labels_path=args.test_labels)


def data_spec(args: argparse.Namespace, likelihood: str | None) -> DataSpec:
    """The data flags as a ``DataSpec`` (``--binarize auto`` resolved for the likelihood)."""
    spec = data_flags(args)
    return DataSpec.from_dict({
        **dataclasses.asdict(spec), "binarize": resolve_binarize(spec.binarize, spec.dataset, spec.data_path,
                                                                 likelihood)}, "the data flags")


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


# what each program writes into its --out (the flag's help; a program without an entry
# passes ``what`` itself)
OUT_WRITES = {
    "elbolab fit": "the run directory: config.json, metrics.json, history.csv, checkpoint.ckpt and the figures "
                   "(loss_curve.png; for image models prior samples, reconstructions, latent means)",
    "elbolab compare-guides": "compare.md (the inference-gap tables), metrics.json and gaps.png",
    "elbolab demos": "demos.md (the identities' table), metrics.json and the figures iwae_vs_k.png, "
                     "bimodal_fit.png, samples_for_accuracy.png",
    "elbolab report": "report.md, a self-contained report.html, summary.json, and one directory per stage holding "
                      "its runs",
    "elbolab benchmark": "results.json (every timing) and table.md (the ratios)",
    "elbolab bench-distributed": "results.json and table.md (1 against 2 processes, the all-reduce model)",
}


def add_out_args(p: argparse.ArgumentParser, default: str | None = None, resume: bool = False, what: str | None = None,
                 required: bool | None = None, overwrite: bool = True) -> None:
    """The output flags: ``--out DIR`` (its help: ``what`` the program writes there, by
    default its entry in ``OUT_WRITES``), ``--overwrite`` (unless ``overwrite`` is False:
    a program that only adds files beside a run's), ``--seed`` and, for fit, ``--resume``."""
    what = what or OUT_WRITES[p.prog]
    g = p.add_argument_group("output")
    if required is None:
        required = default is None and not resume
    g.add_argument("--out", metavar="DIR", default=default, required=required,
                   help=f"where to write: {what}"
                        + ("; refused if it holds files, unless --overwrite" if overwrite else "")
                        + (f" (default: {default})" if default else ""))
    if overwrite:
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

    set_threads(threads)
    out = out or run_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    tune_malloc()
    return read_run(run_dir), out
