"""A training step's loss recorded once and replayed: Pyro's per-step work taken out of
the steps of a model that declares them static (``models.protocol.StaticSteps``).

Pyro builds the loss anew at every step: the guide and the model run through its
messengers, every sample site is a message, every distribution an object, every log
density is scaled and masked in Python. On the CS236 VAE that is about 0.8 ms of a
6.4 ms step, and on a small model as much as its matrix products. Yet for most models
the tensor operations are the same at every step, given the batch's shape; only their
inputs (the rows, the parameters' values, the random draws) change.

:class:`ReplayedLoss` records those operations once per batch shape, below autograd, as
a graph of ATen operations (a ``torch.fx`` graph, written by :class:`Recorder` while the
eager loss runs), and runs the graph instead of the model and guide from then on:

* the parameters stay the model's own tensors (the graph holds them, not copies), so
  the optimizer's in-place updates are what the next replay reads;
* a random draw stays a draw from torch's generator: the same calls with the same
  shapes in the same order, so the same numbers as the eager step would draw;
* the rows and their positions in the training set are the graph's inputs;
* autograd records the replayed operations as it records the eager ones, so the
  gradient is computed by the same backward functions.

A recorded graph is used only after it has earned it. It is recorded on one batch
(whose loss is the eager one), and on the next batch of that shape, with other rows
and other draws, the eager loss and the graph's are both computed from the same
generator state, with their gradients: the graph is used from then on only if the two
agree (bit for bit in practice; to float32 round-off at most), value and every
gradient, else that shape keeps the eager loss. A value
read into Python while recording (an ``.item()``, a branch on a tensor), or a tensor
held by the graph that requires a gradient but is not a parameter of the model, refuses
the graph when it is recorded. What the check cannot see is a Python value that changes
later between steps (a weight annealed from outside, a step counter): hence the
declaration, which the built-in models make and a user's model makes by setting
``static_steps = True`` on its model function or module.
"""

from __future__ import annotations

import operator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from elbolab.inference.traces import batch
from elbolab.models.protocol import StaticSteps

# at most this many batch shapes are recorded per fit (a full batch and the last,
# shorter one is the usual two); further shapes keep the eager loss
MAX_GRAPHS = 4
# the graph's loss must equal the eager one to this relative difference, and every
# gradient element too (with the same absolute slack scaled by the gradient's size):
# the same operations on the same numbers give the same floats, so anything above
# float32 round-off means the graph computes something else
RTOL = 1e-6

# operations whose result is a Python value read from a tensor (a branch, an .item()):
# a recording with one of them would replay that value as a constant
_READS_VALUES = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose"}


def static_steps(model) -> bool:
    """Whether the workbench model declares its steps static (``StaticSteps``)."""
    return isinstance(model, StaticSteps) and model.static_steps is True


def same_draws(device: torch.device):
    """torch's generator for ``device`` (and the CPU's) saved now and restored on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class Recorder(TorchDispatchMode):
    """While active, every ATen operation run (below autograd) is appended to an FX graph:
    its tensor arguments are the nodes that made them (an input's placeholder, an
    earlier operation's result) or, for a tensor made elsewhere (a parameter, a buffer,
    a constant), a reference to that very tensor. The operations run as usual: the
    recording's results are the eager step's.

    Lighter than ``make_fx``, which also attaches a fake tensor's metadata to every node
    (measured: 60-90 ms a recording of a small VAE's loss against about 5 ms here)."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) -> the node that stands for it
        self.alive: list = []  # every tensor seen, so that no id is reused while recording
        self.reads: str | None = None  # an operation that read a value into Python
        self.held = 0  # tensors held by reference
        self.failed: str | None = None  # why the recording stopped, if it did
        for name, t in inputs.items():
            self._bind(t, self.graph.placeholder(name))

    def _bind(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        self.nodes[id(t)] = node  # (an in-place operation's result rebinds its tensor)
        self.alive.append(t)

    def _arg(self, v):
        if not isinstance(v, (torch.Tensor, torch.Generator)):
            return v
        node = self.nodes.get(id(v))
        if node is None:  # made outside the recording (or a generator): held by reference
            name, self.held = f"held{self.held}", self.held + 1
            if isinstance(v, torch.nn.Parameter):
                self.root.register_parameter(name, v)
            else:
                object.__setattr__(self.root, name, v)
            node = self.graph.get_attr(name)
            self._bind(v, node)
        return node

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.failed is None:  # (the step goes on whatever the recording meets)
            try:
                self._note(func, args, kwargs, out)
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
        return out

    def _note(self, func, args, kwargs, out) -> None:
        name = getattr(func, "name", lambda: str(func))()
        if name in _READS_VALUES:
            self.reads = self.reads or name
        node = self.graph.call_function(func, tree_map(self._arg, tuple(args)), tree_map(self._arg, kwargs))
        if isinstance(out, torch.Tensor):
            self._bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self._bind(o, self.graph.call_function(operator.getitem, (node, i)))

    def module(self, out) -> torch.fx.GraphModule:
        self.graph.output(self.nodes[id(out)])
        self.graph.eliminate_dead_code()  # (random draws and in-place operations count as used)
        return torch.fx.GraphModule(self.root, self.graph)


class Graph:
    """One recorded loss: ``fn(x, rows) -> loss`` and whether it passed the check."""

    def __init__(self, module: torch.fx.GraphModule):
        self.module = module
        self.fn = module.forward  # (without nn.Module.__call__'s hooks: the graph has none)
        self.checked = False


class ReplayedLoss:
    """``loss(x, rows)``: ``objective``'s loss of ``model`` on the rows x at positions
    ``rows`` of its training set (as ``objective.loss``), replayed from a recorded graph
    where one has passed its check, else computed eagerly. ``refused`` maps a batch
    shape to why it keeps the eager loss."""

    def __init__(self, objective, model):
        self.objective, self.model = objective, model
        self.graphs: dict[tuple, Graph | None] = {}
        self.refused: dict[tuple, str] = {}
        self.replays = 0  # steps whose loss came from a graph
        self.param_ids = {id(p) for p in model.parameters()}

    def eager(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with batch(self.model, x, rows):
            return self.objective(self.model.model, self.model.guide, x)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, tuple(rows.shape), rows.dtype, torch.is_grad_enabled())
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs[key] = None
                return self.eager(x, rows)
            return self.record(key, x, rows)
        graph = self.graphs[key]
        if graph is None:
            return self.eager(x, rows)
        if not graph.checked:
            why = self.check(graph, x, rows)
            if why:
                self.graphs[key], self.refused[key] = None, why
                return self.eager(x, rows)
            graph.checked = True
        self.replays += 1
        return graph.fn(x, rows)

    # -- recording ---------------------------------------------------------
    def record(self, key: tuple, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The eager loss, its operations recorded on the way (``graphs[key]``: the graph,
        or None with the reason in ``refused``)."""
        self.graphs[key] = None
        recorder = Recorder({"x": x, "rows": rows})
        with recorder:
            loss = self.eager(x, rows)
        why = self.refuses(recorder, loss)
        if not why:
            try:
                self.graphs[key] = Graph(recorder.module(loss))
            except Exception as e:  # (e.g. an argument a graph cannot hold)
                why = f"not recorded: {type(e).__name__}: {e}"
        if why:
            self.refused[key] = why
        return loss

    def refuses(self, recorder: Recorder, loss) -> str | None:
        """Why a recording cannot stand for the loss (None: it may)."""
        if recorder.failed:
            return f"not recorded: {recorder.failed}"
        if recorder.reads:
            return f"the loss reads a tensor's value into Python ({recorder.reads})"
        if not isinstance(loss, torch.Tensor) or id(loss) not in recorder.nodes or loss.dim() != 0:
            return "the loss is not a scalar tensor computed by the step"
        for t in [*recorder.root.parameters(), *recorder.root.__dict__.values()]:
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.param_ids:
                return "the loss reads a tensor that requires a gradient but is not a parameter of the model"
        return None

    # -- the check ---------------------------------------------------------
    def check(self, graph: Graph, x: torch.Tensor, rows: torch.Tensor) -> str | None:
        """Why the graph's loss differs from the eager one on this batch, same draws (None:
        it does not: value and gradients equal to ``RTOL``)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        sides = []
        for fn in (self.eager, graph.fn):
            with same_draws(x.device):
                loss = fn(x, rows)
                if not (torch.is_tensor(loss) and loss.dim() == 0):
                    return "the loss is not a scalar tensor"
                grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else None
            sides.append((loss.detach(), grads))
        (a, ga), (b, gb) = sides
        if not _close(a, b):
            return f"the graph's loss {float(b)!r} is not the eager loss {float(a)!r}"
        if (ga is None) != (gb is None):
            return "the graph's loss does not carry the eager loss's gradient"
        for p, u, v in zip(params, ga or (), gb or ()):
            if (u is None) != (v is None) or (u is not None and not _close(u, v)):
                return f"the graph's gradient of a parameter of shape {tuple(p.shape)} is not the eager one"
        return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_sparse or b.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=RTOL, atol=RTOL * scale, equal_nan=True))
