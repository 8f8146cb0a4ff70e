"""Reproduce the Stanford CS236 homework's VAE and GMVAE numbers on MNIST.

Protocol (the homework's): latent_dim 10; encoder and decoder 784-300-300 with ELU;
Adam, learning rate 1e-3, batch 100, 20,000 iterations; dynamic binarization of the
training images; the VAE's KL term analytic, the mixture prior's (k = 500 learnable
equal-weight components) by one Monte Carlo sample. Evaluated on the full
10,000-image test set (binarized once with a seed) with 1,000 importance samples per
image: NELBO, its KL and reconstruction terms, and IWAE-1/10/100/1000 (the negative
IWAE bounds, each the mean over the 1000/m groups of m of the same draws). The
published values are the course's grader targets, measured on a 100-image test subset.

Each model's log-likelihood is also estimated by annealed importance sampling on the
first --ais-rows test images (T = --ais-steps, M = --ais-chains, from the encoder), beside
the --n-samples importance estimate on the same images (paired).

Writes --out/table.md (ours beside the published values), --out/metrics.json and one
run directory per model (checkpoint, metrics, pictures, ais.json).
"""

from __future__ import annotations

import sys
import time

import torch

from elbolab.inference.diagnostics import reliability_note
from elbolab.inference.errors import UsageError
from elbolab.inference.evaluate import tune_malloc
from elbolab.inference.train_config import TrainConfig
from elbolab.scripts import _cli, _reproduce

PROG = "elbolab reproduce-cs236"
PUBLISHED = {  # CS236 homework 2 grader targets (nats; lower is better)
    "vae": {"NELBO": 100.0, "KL": 19.5, "Rec": 82.0, "IWAE-1": 99.0, "IWAE-10": 97.0, "IWAE-100": 96.0,
            "IWAE-1000": 95.0},
    "gmvae": {"NELBO": 97.0, "IWAE-1000": 93.0},
}
ROWS = ("NELBO", "KL", "Rec", "IWAE-1", "IWAE-10", "IWAE-100", "IWAE-1000")

EXAMPLES = """examples:
  elbolab reproduce-cs236 --data-dir ~/data/mnist --out runs/cs236 --threads 1
  elbolab reproduce-cs236 --steps 2000 --n-samples 100 --out runs/cs236-short
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    _reproduce.add_common_args(p, out="runs/cs236")
    p.add_argument("--steps", type=_cli.positive_int, default=20_000, help="optimizer steps per model")
    p.add_argument("--n-samples", type=_cli.positive_int, default=1000,
                   help="importance samples per test image (IWAE-m for every m = 10^i dividing it)")
    p.add_argument("--n-components", type=_cli.positive_int, default=500, help="mixture prior components")
    p.add_argument("--models", default="vae,gmvae", help="comma-separated subset of vae,gmvae")
    _reproduce.add_ais_args(p)
    return p


def ours(metrics: dict) -> dict[str, tuple[float, float]]:
    """The table's quantities (negative bounds, nats) from a run's test_importance entry."""
    t = metrics["diagnostics"]["test_importance"]
    out = {"NELBO": (-t["elbo"]["value"], t["elbo"]["se"]), "KL": (t["kl"]["value"], t["kl"]["se"]),
           "Rec": (-t["recon"]["value"], t["recon"]["se"])}
    for m, e in t["iwae"].items():
        out[f"IWAE-{m}"] = (-e["value"], e["se"])
    return out


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = sorted(set(names) - set(PUBLISHED))
    if bad or not names:
        raise UsageError(f"--models must be a subset of vae,gmvae, got {args.models!r}")
    _reproduce.check_out(args)
    torch.set_num_threads(args.threads)
    tune_malloc()
    t0 = time.perf_counter()
    data = _reproduce.mnist_spec(args.data_dir)
    results = {}
    for name in names:
        config = {"latent_dim": 10, "hidden": [300, 300], "activation": "elu", "guide": "amortized"}
        if name == "gmvae":
            config["n_components"] = args.n_components
        train = TrainConfig(objective="elbo-analytic", n_particles=1, lr=1e-3, batch_size=100, steps=args.steps,
                            epochs=None, seed=args.seed, threads=args.threads, progress=args.progress)
        results[name] = _reproduce.train(name, name, config, train, data, args.n_samples, args)
    ais = {name: _reproduce.ais_beside_is(name, args, args.n_samples) for name in names}
    vals = {name: ours(m) for name, m in results.items()}
    cmd = "elbolab reproduce-cs236 " + " ".join(argv if argv is not None else sys.argv[1:])
    header = ["quantity (nats, lower is better)"]
    for name in names:
        label = "VAE" if name == "vae" else f"GMVAE (k = {args.n_components})"
        header += [f"{label}: published", f"{label}: ours ± s.e."]
    rows = []
    for q in ROWS:
        row = [q]
        for name in names:
            pub = PUBLISHED[name].get(q)
            cell = _reproduce.pm(*vals[name][q]) if q in vals[name] else "—"
            pk = results[name]["diagnostics"].get("test_pareto_k")
            if q == f"IWAE-{args.n_samples}" and pk and pk.get("reliable") is False:
                cell += " (UNRELIABLE: Pareto k)"
            row += ["—" if pub is None else f"{pub:g}", cell]
        rows.append(row)
    extra = []
    for name in names:
        m = results[name]
        au = m["diagnostics"].get("test_active_units", {})
        steps = m["run"]["steps"]
        epochs = steps * m["config"]["train"]["batch_size"] / m["data"]["n_train"]
        extra.append(f"- {name}: {steps} steps ({epochs:.1f} epochs of {m['data']['n_train']} images) in "
                     f"{m['run']['seconds']:.0f} s of training; {au.get('active_units')} of {au.get('latent_dim')} "
                     f"active units; {m['quantities']['test_log_likelihood']['K']} importance samples per test "
                     f"image, Pareto k of their weights: {reliability_note(m['diagnostics'].get('test_pareto_k'))}"
                     f"; {m['run']['convergence']['verdict']}.")
    lines = [
        "# CS236 homework protocol on MNIST: ours beside the published values", "",
        f"Command: `{cmd.strip()}`", "",
        "Published: the course's grader targets on a 100-image test subset. Ours: the full "
        f"{results[names[0]]['data']['n_test']}-image test set, binarized once with a seed; each value a mean "
        "over the test images with its standard error (over images). NELBO, KL and Rec come from the same "
        f"{args.n_samples} draws per image as IWAE-{args.n_samples}; IWAE-m is the mean of the IWAE bounds of the "
        f"{args.n_samples}/m groups of m draws, so IWAE-1 equals the NELBO here.", "",
        *(tab := _reproduce.table(header, rows)), "",
        *extra, "",
        *_reproduce.ais_lines({("VAE" if n == "vae" else f"GMVAE (k = {args.n_components})"): ais[n] for n in names},
                              args),
        *[f"![{n} prior samples]({n}/prior_samples.png) ![{n} reconstructions]({n}/reconstructions.png)"
          for n in names], "",
        f"_Wall time {time.perf_counter() - t0:.0f} s with {args.threads} thread(s)._",
    ]
    _reproduce.write(args.out, lines, {
        "protocol": "cs236", "command": cmd.strip(), "published": PUBLISHED, "units": "nats per datapoint",
        "ours": {n: {q: {"mean": v[0], "se": v[1]} for q, v in vals[n].items()} for n in names},
        "runs": {n: run_summary(results[n]) for n in names},
        "ais": {n: ais[n] for n in names},
    })
    print("\n".join(tab))
    print(f"-> {args.out}/table.md")
    return 0


def run_summary(m: dict) -> dict:
    """A fit's steps, epochs, training seconds, test log-likelihood and active units, from
    its metrics."""
    out = {k: m["run"][k] for k in ("steps", "epochs", "seconds")}
    if "test_log_likelihood" in m["quantities"]:
        out["test_log_likelihood"] = m["quantities"]["test_log_likelihood"]
    if "test_active_units" in m["diagnostics"]:
        out["test_active_units"] = m["diagnostics"]["test_active_units"]
    return out


if __name__ == "__main__":
    sys.exit(main())
