"""The ``elbolab`` command: one subcommand per program, each with its own ``--help``.

``elbolab COMMAND [ARGS]`` runs ``elbolab.scripts.MODULE.main(ARGS)``; its exit status
is the program's (0 done, 1 a fault at run time, 2 bad input, 130 interrupted).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

# subcommand -> (module of elbolab.scripts, what it does)
COMMANDS = {
    "fit": ("fit", "fit a model (built-in, or yours: --model FILE.py:NAME) by SVI; write a run directory"),
    "evaluate": ("evaluate", "re-evaluate a run: importance-sampled log-likelihood with Pareto k, ELBO"),
    "diagnose": ("diagnose", "ArviZ InferenceData, Pareto k, PSIS-LOO, WAIC, predictive checks of a run"),
    "sample": ("sample", "generate from a run with a decoder: prior samples, reconstructions, interpolations, "
                         "latent traversals"),
    "compare-guides": ("compare_guides", "amortized, semi-amortized and per-datapoint guides: the inference gap"),
    "demos": ("demos", "the course notes' identities, both sides measured"),
    "report": ("report", "the whole study on one data set: report.md and a self-contained report.html"),
    "benchmark": ("benchmark", "the training driver against hand-written PyTorch, ratios measured side by side"),
    "bench-distributed": ("bench_distributed", "1 against 2 data-parallel processes"),
    "reproduce-cs236": ("reproduce_cs236", "the Stanford CS236 VAE / GMVAE table on MNIST"),
    "reproduce-iwae": ("reproduce_iwae", "the IWAE paper's Table 1 pattern on MNIST"),
    "reproduce-greylevel": ("reproduce_greylevel", "grey-level MNIST / Fashion-MNIST: VAE likelihoods beside PPCA"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: elbolab COMMAND [--help] [ARGS]", "",
             "A workbench for variational inference on Pyro.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "elbolab COMMAND --help shows a command's arguments and examples."]
    return "\n".join(lines)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from elbolab import __version__

        print(f"elbolab {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.replace("-", "_") == name.replace("-", "_")]
        hint = f" (did you mean {close[0]}?)" if close else f"; choose one of {', '.join(COMMANDS)}"
        print(f"elbolab: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    # A Ctrl-C while the program's modules load (torch, Pyro: seconds) leaves at once with
    # the program's own one line: a KeyboardInterrupt raised inside a half-imported numpy
    # or torch came out as a RecursionError or AttributeError traceback (status 1).
    def interrupted(signum, frame):
        print(f"elbolab {name}: interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)

    main_thread = _main_thread()  # (signal handlers can only be set there)
    if main_thread:
        before = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, interrupted)
    try:
        module = importlib.import_module(f"elbolab.scripts.{COMMANDS[name][0]}")
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, signal.default_int_handler if before is None else before)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
