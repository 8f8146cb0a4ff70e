"""Trace and score, once: the guide traced, the model replayed on its draws, every site's
log density read with its mask and scale. Objectives, evaluation, diagnostics and the
generic guides all go through here; and which rows of a data split a command on a
fitted model reads (:func:`split_rows`).

The data plate and its mini-batches
-----------------------------------
A model observes its rows inside ``pyro.plate(plate, len(x))`` (or a plate declared with
the full training size N; any name, ``"data"`` by default). The workbench calls the model
and the guide with a batch of B rows and says which rows they are with :class:`Batch`, a
Pyro messenger around the call:

* the plate's indices (``with pyro.plate(...) as rows``) become the batch rows'
  positions in the training set (0..B-1 for a set of its own), so per-datapoint
  parameters are indexed as Pyro users index them;
* every site inside the plate is scaled so that the batch stands for the N rows it was
  drawn from (N/B), whether the plate was declared with B or with N rows; sites outside
  it (global latents) are not scaled. A set of its own (validation, test) is scaled 1.

Shapes: K particles are an outermost vectorized plate (``PARTICLES_PLATE``, dim
-(max_plate_nesting + 1)); per-row quantities are (K, B).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

from elbolab.inference.errors import UsageError
from elbolab.models.protocol import SequentialParticles

DATA_PLATE = "data"
PARTICLES_PLATE = "particles"


# ----------------------------------------------------------------------------- the batch


class Batch(Messenger):
    """Run a model or guide on a batch of ``n_rows`` rows of its data plate ``plate``:
    the plate's indices are ``rows`` (positions in the training set; None: 0..B-1) and
    every site inside the plate is scaled so that the batch stands for ``size`` rows
    (None: the batch is a set of its own, scale 1)."""

    def __init__(self, plate: str, n_rows: int, rows: torch.Tensor | None = None, size: int | None = None):
        super().__init__()
        if rows is not None and int(rows.shape[0]) != int(n_rows):
            raise UsageError(f"{rows.shape[0]} row indices for a batch of {n_rows} rows")
        self.plate, self.n_rows, self.rows = plate, int(n_rows), rows
        self.size = int(n_rows) if size is None else int(size)
        self.declared: int | None = None  # the plate's declared size, seen when it is built

    def indices(self) -> torch.Tensor:
        return torch.arange(self.n_rows) if self.rows is None else self.rows

    def _process_message(self, msg) -> None:
        # (one method for the two duties, without Messenger's dispatch by message type)
        if msg["type"] != "sample":
            return
        if isinstance(msg["fn"], _Subsample):
            if msg["name"] == self.plate:
                self._subsample(msg)
            return
        if self.declared is not None and self.size != self.declared and any(
                f.name == self.plate for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * (self.size / self.declared)

    def _subsample(self, msg) -> None:
        """The data plate's index site: its value is the batch's rows."""
        fn = msg["fn"]
        if fn.subsample_size is not None and fn.subsample_size != self.n_rows and fn.subsample_size < fn.size:
            raise UsageError(
                f"pyro.plate({self.plate!r}) subsamples {fn.subsample_size} of {fn.size} rows itself; elbolab "
                f"mini-batches the data: declare pyro.plate({self.plate!r}, len(x)) without subsample_size")
        if fn.size != self.n_rows and fn.size < self.n_rows:
            raise UsageError(f"pyro.plate({self.plate!r}) declares {fn.size} rows but the batch holds {self.n_rows}")
        self.declared = int(fn.size)
        rows = self.indices()
        msg["value"] = rows if rows.device == fn.device else rows.to(fn.device)


_ACTIVE: list[Batch] = []


@contextlib.contextmanager
def batch(model, x: torch.Tensor, rows: torch.Tensor | None = None):
    """The rows x of ``model``'s training set at ``rows`` (a mini-batch, scaled to the
    ``model.n_data`` training rows), or a set of their own (``rows`` None)."""
    b = Batch(model.data_plate, int(x.shape[0]), rows, model.n_data if rows is not None else None)
    _ACTIVE.append(b)
    try:
        with b:
            yield b
    finally:
        _ACTIVE.pop()


def batch_rows(x: torch.Tensor) -> torch.Tensor:
    """The positions in the training set of the rows x being run (0..B-1 outside a fit):
    what a per-datapoint table reads when it cannot enter the plate first."""
    b = _ACTIVE[-1] if _ACTIVE else None
    if b is None or b.n_rows != int(x.shape[0]):
        return torch.arange(int(x.shape[0]))
    return b.indices()


# ----------------------------------------------------------------------------- sites


def in_plate(site, plate: str = DATA_PLATE) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"])


def is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def is_scored(site) -> bool:
    """A sample site that has a density (every one but a plate's index site)."""
    return site["type"] == "sample" and not site_is_subsample(site)


def site_log_prob(site, fn=None) -> torch.Tensor:
    """The site's log density at its value, masked, unscaled. A masked-out entry is 0
    (``where``, not a product: a masked-out -inf must give 0, not NaN)."""
    fn = site["fn"] if fn is None else fn
    lp = fn.log_prob(site["value"])
    mask = site["mask"]
    if mask is not None:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    return lp


def per_row(site, K: int, B: int, plate: str = DATA_PLATE, fn=None) -> torch.Tensor:
    """A site's log density per particle and row (K, B), unscaled; the site must lie in
    the data plate (a global latent has no per-row density)."""
    if not in_plate(site, plate):
        raise UsageError(
            f"site {site['name']!r} is outside plate({plate!r}); per-datapoint importance weights need every "
            "sampled site to be local to a datapoint (global latents have no per-datapoint weight)")
    return site_log_prob(site, fn).expand(K, B)


def per_particle(site, K: int, nesting: int) -> torch.Tensor:
    """A site's log density summed over everything but the particles plate, scaled (K,)."""
    lp = site_log_prob(site)
    lp = lp.reshape((1,) * max(0, nesting + 1 - lp.dim()) + tuple(lp.shape))
    lp = lp.movedim(lp.dim() - nesting - 1, 0)
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(K) * site["scale"]


# ----------------------------------------------------------------------------- traces


def particles(K: int, nesting: int, vectorize: bool = True):
    """The particles plate (outermost, dim -(nesting + 1)); nothing for one unvectorized draw."""
    if not vectorize:
        return contextlib.nullcontext()
    return pyro.plate(PARTICLES_PLATE, int(K), dim=-(int(nesting) + 1))


class Sites(Messenger):
    """The sample sites of one run of a program (a model or a guide): ``nodes``, site
    name -> the site's message, in the order the program samples them; with ``replay``
    (another run's ``nodes``, e.g. the guide's), the program's latent sites take that
    run's values. For sample sites what ``poutine.trace`` records (a Pyro ``Trace``'s
    nodes, without its ``_INPUT``/``_RETURN`` and param nodes) and what
    ``poutine.replay`` does, as one messenger that keeps each message instead of copying
    it into a graph: 0.1 ms a step less for a VAE (``tests/test_perf.py`` checks the
    sites against Pyro's traces). :func:`as_trace` makes a Pyro ``Trace`` of them."""

    def __init__(self, replay: dict | None = None):
        super().__init__()
        self.nodes: dict[str, dict] = {}
        self.replay = replay

    def _process_message(self, msg) -> None:
        if self.replay is None or msg["type"] != "sample" or msg["is_observed"]:
            return
        site = self.replay.get(msg["name"])
        if site is not None:  # as poutine.replay: the value and its inference flags
            if site["is_observed"]:
                raise RuntimeError(f"site {msg['name']} must be sampled in trace")
            msg["done"] = True
            msg["value"] = site["value"]
            msg["infer"] = site["infer"]

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["infer"].get("_do_not_trace"):
            return
        name = msg["name"]
        if name in self.nodes:
            raise RuntimeError(f"Multiple sample sites named '{name}'")
        self.nodes[name] = msg

    def run(self, fn: Callable, args: tuple):
        """Run ``fn(*args)`` recording its sites; a ValueError or RuntimeError raised inside
        carries the table of the sites' shapes (as under ``poutine.trace``)."""
        with self:
            try:
                return fn(*args)
            except (ValueError, RuntimeError) as e:
                raise type(e)(f"{e}\n{as_trace(self).format_shapes()}").with_traceback(e.__traceback__) from e


def as_trace(sites) -> poutine.Trace:
    """A Pyro ``Trace`` of the sample sites of :class:`Sites` (or a Trace itself)."""
    if isinstance(sites, poutine.Trace):
        return sites
    tr = poutine.Trace()
    for name, site in sites.nodes.items():
        tr.add_node(name, **site)
    return tr


def trace_pair(model_fn: Callable, guide_fn: Callable, args: tuple, K: int = 1, nesting: int = 1,
               vectorize: bool = True) -> tuple[Sites, Sites]:
    """(guide sites, model sites) (:class:`Sites`): the guide run with K vectorized
    particles, the model replayed on its draws; ``args`` are passed to both."""
    with particles(K, nesting, vectorize):
        guide_tr = Sites()
        guide_tr.run(guide_fn, args)
        model_tr = Sites(replay=guide_tr.nodes)
        model_tr.run(model_fn, args)
    return guide_tr, model_tr


def particle_traces(model_fn: Callable, guide_fn: Callable, args: tuple, K: int, nesting: int,
                    vectorize: bool = True) -> list[tuple[Sites, Sites, int]]:
    """[(guide sites, model sites, particles in them)]: one pair with K vectorized particles,
    or (``vectorize`` False: a model not written for a particles plate, e.g. ``X @ w`` with
    w a latent) K pairs of one particle each, without the plate."""
    if vectorize:
        return [(*trace_pair(model_fn, guide_fn, args, K, nesting), K)]
    return [(*trace_pair(model_fn, guide_fn, args, 1, nesting, vectorize=False), 1) for _ in range(int(K))]


def vectorizes(model) -> bool:
    """Whether a workbench model takes its particles as a vectorized plate (every built-in
    model does; a user's model may not: ``models.protocol.SequentialParticles``)."""
    return not (isinstance(model, SequentialParticles) and model.sequential_particles)


def guess_max_plate_nesting(model_fn: Callable, guide_fn: Callable, args: tuple, kwargs: dict | None = None) -> int:
    """The deepest vectorized plate of one run of the guide and the model replayed on it
    (what Pyro's ELBOs guess when not told)."""
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad(), torch.random.fork_rng():
        guide_tr = poutine.trace(guide_fn).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model_fn, trace=guide_tr)).get_trace(*args, **kwargs)
    return plate_nesting(guide_tr, model_tr)


def plate_nesting(*traces) -> int:
    """The deepest vectorized plate of the sample sites of these traces (0 if none)."""
    dims = [f.dim for tr in traces for s in tr.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized]
    return -min(dims) if dims else 0


@dataclass
class LogWeights:
    """Per-particle, per-datapoint log densities, each (K, B), unscaled.

    ``log_lik``: observed sites of the model; ``log_prior``: latent sites of the
    model; ``log_q``: the guide. ``scale`` is the data plate's N/B.
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    scale: float
    guide_trace: object = None

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q


def detach_distribution(fn):
    """The same distribution with its parameters detached (for DReG's log q): a Normal or
    MultivariateNormal (or Independent of one), or any distribution that gives itself so
    (``with_detached_parameters()``, e.g. a flow's)."""
    detached = getattr(fn, "with_detached_parameters", None)
    if callable(detached):
        return detached()
    if isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        return dist.Independent(detach_distribution(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    raise UsageError(f"iwae-dreg supports Normal and MultivariateNormal guides, not {type(fn).__name__}")


def log_weights(model_fn: Callable, guide_fn: Callable, x: torch.Tensor, n_particles: int,
                max_plate_nesting: int = 1, plate: str = DATA_PLATE, detach_q_params: bool = False,
                vectorize: bool = True) -> LogWeights:
    """log w_ik = log p(x_i, z_ik) - log q(z_ik | x_i) and its parts for K = ``n_particles``
    draws per row of x (B rows; vectorized, or one at a time: ``particle_traces``): every
    site must lie in the data plate. With ``detach_q_params`` log q is computed with the
    guide's distribution parameters detached (the sample z keeps its path to them)."""
    B = int(x.shape[0])
    parts: dict[str, list[torch.Tensor]] = {"log_lik": [], "log_prior": [], "log_q": []}
    scale = 1.0
    for guide_tr, model_tr, K in particle_traces(model_fn, guide_fn, (x,), n_particles, max_plate_nesting,
                                                 vectorize):
        zeros = x.new_zeros(K, B)
        log_q, log_prior, log_lik = zeros, zeros, zeros
        for site in guide_tr.nodes.values():
            if not is_latent(site):
                continue
            if not site["fn"].has_rsample:
                raise UsageError(f"guide site {site['name']!r} is not reparameterizable; "
                                 "importance-weighted objectives need reparameterized guides")
            fn = detach_distribution(site["fn"]) if detach_q_params else None
            log_q = log_q + per_row(site, K, B, plate, fn)
        for site in model_tr.nodes.values():
            if not is_scored(site):
                continue
            lp = per_row(site, K, B, plate)
            if site["is_observed"]:
                log_lik = log_lik + lp
                scale = float(site["scale"])
            else:
                log_prior = log_prior + lp
        for key, value in (("log_lik", log_lik), ("log_prior", log_prior), ("log_q", log_q)):
            parts[key].append(value)
    cat = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
    return LogWeights(cat["log_lik"], cat["log_prior"], cat["log_q"], scale, guide_tr)


def model_log_weights(model, x: torch.Tensor, rows: torch.Tensor | None, n_particles: int,
                      detach_q_params: bool = False) -> LogWeights:
    """:func:`log_weights` of a workbench model on the rows x at positions ``rows`` of its
    training set (None: a set of its own)."""
    with batch(model, x, rows):
        return log_weights(model.model, model.guide, x, n_particles, model.max_plate_nesting, model.data_plate,
                           detach_q_params, vectorizes(model))


def whole_set_log_weights(model, x: torch.Tensor, rows: torch.Tensor | None, n_particles: int,
                          chunk: int = 100) -> dict[str, torch.Tensor]:
    """log p(X | theta_k), log p(theta_k) and log q(theta_k) of the whole set X (the rows
    of x, scaled by the data plate to the set they stand for), for K independent draws
    theta_k ~ q, vectorized in chunks: each (K,), float64; ``n_rows`` that set's size."""
    nesting = model.max_plate_nesting
    out: dict[str, list[torch.Tensor]] = {"log_lik": [], "log_prior": [], "log_q": []}
    size = float(x.shape[0])
    with torch.no_grad(), batch(model, x, rows):
        for start in range(0, n_particles, chunk):
            pairs = particle_traces(model.model, model.guide, (x,), min(chunk, n_particles - start), nesting,
                                    vectorizes(model))
            for guide_tr, model_tr, K in pairs:
                terms = {k: x.new_zeros(K, dtype=torch.float64) for k in out}
                for site in guide_tr.nodes.values():
                    if is_latent(site):
                        terms["log_q"] = terms["log_q"] + per_particle(site, K, nesting)
                for site in model_tr.nodes.values():
                    if not is_scored(site):
                        continue
                    key = "log_lik" if site["is_observed"] else "log_prior"
                    terms[key] = terms[key] + per_particle(site, K, nesting)
                    if site["is_observed"] and in_plate(site, model.data_plate):
                        size = x.shape[0] * float(site["scale"])
                for k in out:
                    out[k].append(terms[k])
    result = {k: torch.cat(v) for k, v in out.items()}
    result["n_rows"] = torch.tensor(size)
    return result


def logmeanexp(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


# ----------------------------------------------------------------------------- structure


def guide_trace(model, x: torch.Tensor, rows: torch.Tensor | None = None):
    """One trace of the guide on the rows x (no gradient; the random-number stream is
    left as it was; hidden from any enclosing trace)."""
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(), batch(model, x, rows):
        return poutine.trace(model.guide).get_trace(x)


def latent_names(model, x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[list[str], list[str]]:
    """(local, global) latent site names of the guide: inside the data plate or not."""
    tr = guide_trace(model, x, rows)
    local = [n for n, s in tr.nodes.items() if is_latent(s) and in_plate(s, model.data_plate)]
    glob = [n for n, s in tr.nodes.items() if is_latent(s) and not in_plate(s, model.data_plate)]
    return local, glob


def local_site(model, x: torch.Tensor, rows: torch.Tensor | None = None, grad: bool = False,
               program: str = "guide"):
    """The guide's one local latent site on the rows x (its ``fn`` is q(z | x), batch (B,),
    one event dimension). UsageError unless the guide samples exactly one latent (auxiliary
    sites aside), in the data plate, with one event dimension. An automatic guide that
    samples it as a ``Delta`` at the value of a Gaussian auxiliary site (``AutoNormal`` on a
    real-valued latent: the identity transform) gives that Gaussian, under the latent's name.
    ``program="model"``: the same of the model's latent (its ``fn`` the prior)."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    fn = {"guide": model.guide, "model": model.model}[program]
    # hidden from any enclosing trace (a guide may ask for another guide's q while traced)
    with poutine.block(), ctx, torch.random.fork_rng(), batch(model, x, rows):
        tr = poutine.trace(fn).get_trace(x)
    latent = [s for s in tr.nodes.values() if is_latent(s) and not s["infer"].get("is_auxiliary", False)]
    name = type(model).__name__
    if len(latent) != 1:
        raise UsageError(f"{name}'s {program} samples {', '.join(s['name'] for s in latent) or 'nothing'}; this "
                         "needs exactly one local latent site")
    site = latent[0]
    fn = site["fn"]
    base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
    if isinstance(base, dist.Delta):
        aux = [s for s in tr.nodes.values() if is_latent(s) and s["infer"].get("is_auxiliary", False)
               and s["value"].shape == site["value"].shape and torch.equal(s["value"], site["value"])]
        if len(aux) == 1:
            site = {**aux[0], "name": site["name"]}
    if not in_plate(site, model.data_plate) or len(site["fn"].event_shape) != 1:
        raise UsageError(f"{name}'s latent {site['name']!r} must sit in plate({model.data_plate!r}) with one "
                         "event dimension")
    return site


def guide_posterior(model, x: torch.Tensor, rows: torch.Tensor | None = None,
                    grad: bool = False) -> torch.distributions.Distribution:
    """q(z | x) of the guide's one local latent on the rows x: batch (B,), event (k,)."""
    return local_site(model, x, rows, grad)["fn"]


def reads_row_indices(model, x: torch.Tensor) -> bool:
    """Whether the guide reads the rows' positions in the training set (a per-datapoint
    guide: a table indexed by the plate) rather than only their values (an encoder, or
    global latents only). Such a guide cannot infer held-out rows. Measured, not
    declared: the guide is run on one row as training row 0 and as a row past the end
    of the training set; a guide that indexes anything by the position fails on the
    second (an index out of range), one that does not runs both."""
    x0 = x[:1]

    def run(position: int) -> None:
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(), batch(model, x0, torch.tensor([position])):
            poutine.trace(model.guide).get_trace(x0)

    run(0)  # a guide that fails on a training row fails here, with its own error
    try:
        run(int(model.n_data) + 7)
    except (IndexError, RuntimeError, ValueError):
        return True
    return False


def check_new_rows(model, x: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Refuse to run a guide that reads the rows' positions (a per-datapoint table) on rows
    given without their positions in its training set (``rows`` None): it would read other
    rows' entries."""
    if rows is None and reads_row_indices(model, x):
        raise UsageError(f"{type(model).__name__}'s guide is per-datapoint (it reads the rows' positions in the "
                         "training set) and cannot infer other rows; give the training rows with their positions")


def infers_new_rows(model, x: torch.Tensor) -> bool:
    """Whether the guide gives q(z | x) for rows it was not trained on (held-out rows):
    it has local latents and does not read the rows' positions (an encoder). x: some
    training rows (two are read)."""
    local, _ = latent_names(model, x[:2])
    return bool(local) and not reads_row_indices(model, x)


# ----------------------------------------------------------------------------- which rows a command reads


SPLITS = ("train", "val", "test")
FIXED_DRAW_SEED = 0  # the seed of the one draw of dynamically binarized training rows that commands read


@dataclass
class SplitRows:
    """The rows of one split a command works on: ``split`` (its name), ``x`` (N, D),
    ``rows`` (their positions in the training set for training rows, else None) and
    ``labels`` (N,) or None."""

    split: str
    x: torch.Tensor
    rows: torch.Tensor | None
    labels: torch.Tensor | None


def training_rows(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows as every command after the fit reads them, with their positions
    (``torch.arange(n_train)``): for dynamic binarization (``data.train`` holds grey
    levels) one fixed draw, ``torch.bernoulli`` with a generator seeded
    :data:`FIXED_DRAW_SEED`, the same draw whatever the command and its own seed."""
    x = data.train
    if data.binarize == "dynamic":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(FIXED_DRAW_SEED))
    return x, torch.arange(data.n_train)


def split_rows(model, data, split: str | None = None, *, where: str = "the run", verb: str = "use",
               empty_hint: str = "") -> SplitRows:
    """The rows of ``data`` (a ``DataSplits``) that a command on the fitted ``model`` works
    on, by the one rule that ``elbolab diagnose``, ``sample`` and ``evaluate`` and the
    fit's pictures follow (the fit's metrics read the training rows of
    :func:`training_rows` too):

    * ``split`` None: the test split if the guide infers new rows (an encoder,
      :func:`infers_new_rows`) and the data have test rows, else the training rows;
    * ``split`` must be one of :data:`SPLITS`; a split other than train is refused for a
      guide that does not infer new rows (a per-datapoint table knows only its training
      rows): "``where``: the run's guide is per-datapoint and cannot infer ``split`` rows;
      ``verb`` the train split";
    * an empty split is refused ("``where``: the ``split`` split has no rows", then
      ``empty_hint``);
    * training rows come with their positions and, for dynamic binarization, as the one
      fixed draw of :func:`training_rows`; validation and test rows as they are (binarized
      once by the loader), without positions.

    A guide with global latents only (a posterior given the training rows) does not infer
    new rows either: it gets the training rows by default and the refusal above for
    another split (``inference.diagnosis`` refuses that split in words of its own first)."""
    if split is not None and split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split is None:
        split = "test" if data.test.shape[0] and infers_new_rows(model, data.train) else "train"
    elif split != "train" and not infers_new_rows(model, data.train):
        raise UsageError(f"{where}: the run's guide is per-datapoint and cannot infer {split} rows; "
                         f"{verb} the train split")
    if getattr(data, split).shape[0] == 0:
        raise UsageError(f"{where}: the {split} split has no rows{empty_hint}")
    x, rows = training_rows(data) if split == "train" else (getattr(data, split), None)
    return SplitRows(split, x, rows, getattr(data, f"{split}_labels", None))
