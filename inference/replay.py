"""A training step's loss recorded once and replayed: Pyro's per-step work taken out of
the steps of a model that declares them static (``models.protocol.StaticSteps``).

Pyro builds the loss anew at every step: the guide and the model run through its
messengers, every sample site is a message, every distribution an object, every log
density is scaled and masked in Python. On the CS236 VAE that is about 1 ms of a
step, and on a small model as much as its matrix products. Yet for most models the
tensor operations are the same at every step, given the batch's shape; only their
inputs (the rows, the parameters' values, the random draws) change.

:class:`ReplayedLoss` records those operations once per batch shape, below autograd, as
a graph of ATen operations (a ``torch.fx`` graph, written by :class:`Recorder` while the
eager loss runs), and runs the graph instead of the model and guide from then on:

* the parameters and buffers stay the model's own tensors (the graph holds them, not
  copies), so the optimizer's in-place updates are what the next replay reads;
* a random draw stays a draw from torch's generator: the same calls with the same
  shapes in the same order, so the same numbers as the eager step would draw;
* the rows and their positions in the training set are the graph's inputs;
* autograd records the replayed operations as it records the eager ones, so the
  gradient is that of the same operations.

What a graph of operations does not hold refuses the recording: a value read into
Python (an ``.item()``, a branch on a tensor, ``.tolist()``, ``.numpy()``), an
operation whose result's shape depends on values (a boolean mask, ``nonzero``), an
operation run without gradients while the step has them (a ``torch.no_grad()`` block,
or the forward pass of an ``autograd.Function``, whose own backward the graph would
not have), and a tensor that requires a gradient but is not a parameter of the model.

A recorded graph is used only after it has earned it. It is recorded on one batch
(whose loss is the eager one), and on the next batch of that shape, with other rows
and other draws, the eager loss and the graph's are both computed from the same
generator state and buffers, with their gradients: the graph is used from then on only
if the two agree (bit for bit on every built-in model; to float32 round-off at most),
value and every gradient, else that shape keeps the eager loss. What the check cannot
see is a Python value that changes later between steps (a weight annealed from
outside, a step counter), or a tensor hook (it sees one only where the hook changes
that batch's gradient): hence the declaration, which the built-in models make and a
user's model makes by setting ``static_steps = True`` on its model function or module.
The recordings are dropped when the model's parameters or buffers are no longer the
tensors they hold (:meth:`ReplayedLoss.refresh`, which the driver calls once per
Lightning batch).
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torch.overrides import TorchFunctionMode
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
# the Tensor methods that hand a tensor's values to Python without an ATen operation
_READS_INTO_PYTHON = {"tolist", "numpy", "__array__", "data_ptr", "untyped_storage"}


def static_steps(model) -> bool:
    """Whether the workbench model declares its steps static (``StaticSteps``)."""
    return isinstance(model, StaticSteps) and model.static_steps is True


def _rng_states(device: torch.device) -> list:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    elif device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state())
    return states


def _set_rng_states(device: torch.device, states: list) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)
    elif device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(states[1])


@contextlib.contextmanager
def same_draws(device: torch.device):
    """torch's generators for ``device`` and the CPU saved now and restored on exit."""
    states = _rng_states(device)
    try:
        yield
    finally:
        _set_rng_states(device, states)


class _PythonReads(TorchFunctionMode):
    """Notes on ``recorder`` a Tensor method that hands values to Python without an ATen
    operation (``.tolist()``, ``.numpy()``)."""

    def __init__(self, recorder: "Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS_INTO_PYTHON and self.recorder.reads is None:
            self.recorder.reads = f"Tensor.{name}"
        return func(*args, **(kwargs or {}))


class Recorder(TorchDispatchMode):
    """While active, every ATen operation run (below autograd) is appended to an FX graph:
    its tensor arguments are the nodes that made them (an input's placeholder, an
    earlier operation's result) or, for a tensor made elsewhere (a parameter, a buffer,
    a constant), a reference to that very tensor. The operations run as usual: the
    recording's results are the eager step's.

    Lighter than ``make_fx``, which also attaches a fake tensor's metadata to every node
    (measured on the digits VAE's loss: 120-160 ms a recording, 70-90 ms with one fake-tensor
    mode shared, against about 16 ms here beyond the step itself)."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) -> the node that stands for it
        self.alive: list = []  # every tensor seen, so that no id is reused while recording
        self.reads: str | None = None  # an operation that read a value into Python
        self.held = 0  # tensors held by reference
        self.failed: str | None = None  # why the recording stopped, if it did
        self.grad = torch.is_grad_enabled()  # the step's gradient mode
        self.without_grad: str | None = None  # an operation run without gradients in a step with them
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

    @contextlib.contextmanager
    def recording(self):
        """Record the ATen operations run inside, and note Python's reads of values."""
        with _PythonReads(self), self:
            yield

    def _note(self, func, args, kwargs, out) -> None:
        name = getattr(func, "name", lambda: str(func))()
        if name in _READS_VALUES:
            self.reads = self.reads or name
        elif _shape_depends_on_values(func, args):
            self.reads = self.reads or f"{name}, whose result's shape depends on values"
        if self.grad and not torch.is_grad_enabled():
            self.without_grad = self.without_grad or name
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


def _shape_depends_on_values(func, args) -> bool:
    """Whether the operation's result has a shape that depends on its inputs' values
    (torch's tag), an integer-indexed ``index`` excepted (only a boolean mask is)."""
    if torch.Tag.dynamic_output_shape not in getattr(func, "tags", ()):
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return True


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
        self.held = self._tensors()

    def _tensors(self) -> tuple:
        return tuple(map(id, self.model.parameters())), tuple(map(id, self.model.buffers()))

    @property
    def param_ids(self) -> set:
        return set(self.held[0])

    def refresh(self) -> None:
        """Drop the recordings if the model's parameters or buffers are no longer the
        tensors they hold (one replaced, added or removed since they were made)."""
        held = self._tensors()
        if held != self.held:
            self.held = held
            self.graphs.clear()
            self.refused.clear()

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
            why, loss = self.check(graph, x, rows)
            if why:
                self.graphs[key], self.refused[key] = None, why
                return self.eager(x, rows)
            graph.checked = True
            self.replays += 1
            return loss
        self.replays += 1
        return graph.fn(x, rows)

    # -- recording ---------------------------------------------------------
    def record(self, key: tuple, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The eager loss, its operations recorded on the way (``graphs[key]``: the graph,
        or None with the reason in ``refused``)."""
        self.graphs[key] = None
        recorder = Recorder({"x": x, "rows": rows})
        with recorder.recording():
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
        if recorder.without_grad:
            return (f"the loss computes part of itself without gradients ({recorder.without_grad}: a no_grad "
                    "block or an autograd.Function), which a graph would differentiate")
        if not isinstance(loss, torch.Tensor) or id(loss) not in recorder.nodes or loss.dim() != 0:
            return "the loss is not a scalar tensor computed by the step"
        for t in [*recorder.root.parameters(), *recorder.root.__dict__.values()]:
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.param_ids:
                return "the loss reads a tensor that requires a gradient but is not a parameter of the model"
        return None

    # -- the check ---------------------------------------------------------
    def check(self, graph: Graph, x: torch.Tensor, rows: torch.Tensor) -> tuple[str | None, torch.Tensor | None]:
        """(why the graph's loss differs from the eager one on this batch, None), or (None,
        the graph's loss: the step's, whose draws are the eager step's). The eager side
        runs first on copies of the rows, and the generators and the model's buffers
        (a BatchNorm's statistics) are put back after it; the graph then runs as the
        step. Value and gradients must agree to ``RTOL``; where they do not (or the
        graph fails), generators and buffers are put back again for the eager step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = list(self.model.buffers())
        before = [b.clone() for b in buffers]

        def put_back():
            with torch.no_grad():
                for b, v in zip(buffers, before):
                    b.copy_(v)

        def grads(loss, **kw):
            return torch.autograd.grad(loss, params, allow_unused=True, **kw) if loss.requires_grad else None

        with same_draws(x.device):
            eager = self.eager(x.clone(), rows.clone())
            if not (torch.is_tensor(eager) and eager.dim() == 0):
                put_back()
                return "the loss is not a scalar tensor", None
            ga = grads(eager)
        put_back()
        states = _rng_states(x.device)
        try:
            loss = graph.fn(x, rows)
            gb = grads(loss, retain_graph=True)  # (the step's backward follows)
        except Exception as e:
            why = f"the graph failed where the eager loss did not: {type(e).__name__}: {e}"
        else:
            why = _differ(params, eager.detach(), ga, loss.detach(), gb)
        if why:
            put_back()
            _set_rng_states(x.device, states)
            return why, None
        return None, loss


def _differ(params, a, ga, b, gb) -> str | None:
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
    finite = a[a.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=RTOL, atol=RTOL * scale, equal_nan=True))
