"""Data-parallel training and evaluation on several processes (CPU, gloo).

Two real 2-process runs under Lightning's "ddp" strategy (each re-runs its
command line in a second process): tests/ddp_worker.py, whose guide noise is a
function of (row, step) so that a 1-process fit with the same global batches is
comparable to round-off, and scripts/fit.py itself. The rest runs in this process.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import ddp_worker as worker
from elbolab import models
from conftest import ROOT
from elbolab.inference import distributed, runs
from elbolab.models import datasources as loaders
from elbolab.inference.checkpoints import CHECKPOINT, load_checkpoint
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models.common import PerDatapointNormal
from elbolab.scripts import _cli
from elbolab.scripts import fit as fit_script

GUIDES = ("amortized-full", "per-datapoint")
PER_RANK_BATCH = 50
# Parameters of the 2-process fit (2 x 50 rows a step) against the 1-process fit
# (100 rows a step) with the same rows and the same noise per step: they differ only
# by float32 round-off in how the 100 rows' gradients are summed (two halves averaged
# by the all-reduce against one sum), about 1e-7 relative per step; 24 Adam steps
# were measured to leave 6e-7. A real fault (a missing average, a wrong shard, a
# different batch) moves a parameter by up to lr = 0.05 a step: the control below,
# the 1-process fit with 50 rows a step, ends 0.48 away.
PARAM_TOL = 1e-4


def _run(args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """{guide: [rank 0's record, rank 1's record]} of one 2-process worker run."""
    out = tmp_path_factory.mktemp("ddp")
    r = _run([os.path.join(ROOT, "tests", "ddp_worker.py"), str(out), "--devices", "2",
              "--batch-size", str(PER_RANK_BATCH)])
    assert r.returncode == 0, r.stderr[-3000:]
    return {g: [torch.load(out / f"{g}-rank{k}.pt") for k in (0, 1)] for g in GUIDES}


@pytest.mark.parametrize("guide", GUIDES)
def test_ranks_hold_identical_parameters_and_disjoint_shards(ddp_runs, guide):
    a, b = ddp_runs[guide]
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"] == worker.STEPS
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k  # bitwise: DDP keeps replicas in sync
    assert a["rank_param_diff"] == b["rank_param_diff"] == 0.0  # fit's own check agrees
    assert (a["seed"], b["seed"]) == (5, 6)  # seed + global rank
    for step, (ia, ib) in enumerate(zip(a["seen"], b["seen"])):
        assert len(ia) == len(ib) == PER_RANK_BATCH
        assert not set(ia.tolist()) & set(ib.tolist()), step  # each rank its own shard
    assert a["history"] == b["history"]  # the logged loss is the global batch's, on every rank


@pytest.mark.parametrize("guide", GUIDES)
def test_two_processes_match_one_process_with_the_same_global_batch(ddp_runs, guide):
    torch.set_num_threads(1)
    a, _ = ddp_runs[guide]
    model, result, spy = worker.reference_fit(guide, 2 * PER_RANK_BATCH)
    # the same global rows at every step: rank 0's and rank 1's shards make up the 1-process batch
    both = zip(ddp_runs[guide][0]["seen"], ddp_runs[guide][1]["seen"], spy.seen)
    for step, (ia, ib, i1) in enumerate(both):
        assert sorted(torch.cat([ia, ib]).tolist()) == sorted(i1.tolist()), step
    ref = model.state_dict()
    worst = max(float((ref[k] - a["params"][k]).abs().max()) for k in ref)
    assert worst <= PARAM_TOL, worst
    # losses per datapoint (about 70 nats) agree to float32 round-off (2^-24 relative per operation)
    for step, (l2, r1) in enumerate(zip(a["history"], result.history)):
        assert abs(l2 - r1["loss"]) <= 1e-6 * abs(r1["loss"]) + 1e-5, step
    if guide == "amortized-full":  # validation: rows split over ranks, same numbers as one process
        assert [v["step"] for v in a["validations"]] == [v["step"] for v in result.validations] == [8, 16, 24]
        for v2, v1 in zip(a["validations"], result.validations):
            assert abs(v2["val_elbo"] - v1["val_elbo"]) <= 1e-4, (v2, v1)  # round-off of PARAM_TOL-close models
    # control: one process with the per-rank batch is a different fit, far outside the tolerance
    control, _, _ = worker.reference_fit(guide, PER_RANK_BATCH)
    assert max(float((control.state_dict()[k] - a["params"][k]).abs().max()) for k in ref) > 100 * PARAM_TOL


@pytest.mark.parametrize("guide", GUIDES)
def test_distributed_evaluation_equals_one_process_evaluation(ddp_runs, guide):
    torch.set_num_threads(1)
    a, b = ddp_runs[guide]
    d = worker.data()
    model = worker.build(guide, d.n_train, d.data_dim)
    model.load_state_dict(a["params"])
    one = worker.evaluate(model, d)  # no process group here: every chunk in this process
    assert one.shape == (d.n_train,)
    # same chunks, same seeds, same parameters, one thread each: the same bits
    assert torch.equal(a["eval"], one) and torch.equal(b["eval"], one)


def test_fit_script_under_ddp_writes_once_and_evaluates_like_one_process(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    r = _run(["-m", "elbolab.scripts.fit", "--model", "ppca", "--latent-dim", "3", "--steps", "20", "--batch-size", "50",
              "--lr", "0.05", "--val-every", "10", "--eval-particles", "2", "--devices", "2", "--strategy", "ddp",
              "--threads", "1", "--no-progress", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ppca: train ELBO") == 1, r.stdout  # rank 1 shares stdout and prints nothing
    assert sorted(os.listdir(out)) == ["checkpoint.ckpt", "config.json", "history.csv", "latent_means.png",
                                       "loss_curve.png", "metrics.json", "pareto_k.png"]  # and the lock is gone
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["rank_param_diff"] == 0.0 and m["run"]["steps"] == 20
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 20
    # the evaluation that the two ranks shared, redone here in one process from the checkpoint
    spec = json.loads((out / "config.json").read_text())
    data = runs.DataSpec.from_dict(spec["data"]).load("gaussian")
    model = models.build_model("ppca", spec["model_config"], data.data_dim, data.n_train)
    model.load_state_dict({k[len("model."):]: v for k, v in load_checkpoint(str(out / CHECKPOINT))["state_dict"]
                           .items()})
    result = types.SimpleNamespace(steps=20, epochs=0, seconds=0.0, stopped_early=False, final_loss=0.0, history=[])
    one = runs.evaluate_run(model, data, runs.RunSpec.from_dict(spec), result)["quantities"]
    for split in ("train", "val", "test"):
        for term in ("elbo", "recon", "kl"):  # same bits (one thread each)
            assert one[f"{split}_{term}"] == m["quantities"][f"{split}_{term}"], (split, term)
    assert one["train_log_likelihood"] == m["quantities"]["train_log_likelihood"]


# ----------------------------------------------------------------------------- in one process


def test_launch_rank_reads_the_launchers_environment(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID", "WORLD_SIZE",
                "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launch_rank(4) == 0  # a plain start is rank 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's second local process ...
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launch_rank(4) == 1
    assert distributed.launch_rank(1) == 0  # ... but one process is rank 0 whatever it inherits
    for var, value in (("NODE_RANK", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)  # on the third node of 4 processes each
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert distributed.launch_rank(4, num_nodes=4) == 9
    monkeypatch.setenv("SLURM_NTASKS", "8")  # srun: SLURM_PROCID is the global rank
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_JOB_NAME", "fit")
    assert distributed.launch_rank(4, num_nodes=2) == 5
    with pytest.raises(runs.UsageError, match="SLURM_NTASKS=8 in the environment, but devices 4 x num_nodes 1"):
        distributed.launch_rank(4)


def test_run_dir_other_ranks_leave_the_locked_directory_alone(tmp_path):
    from elbolab.inference.errors import UsageError

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / runs.LOCK).write_text(str(os.getppid()))  # rank 0 (a live process, not this one) writes here
    with pytest.raises(UsageError, match="another run"):  # a second run is refused ...
        runs.RunDir(str(out), overwrite=True).__enter__()
    before = {f: (out / f).read_text() for f in os.listdir(out)}
    with runs.RunDir(str(out), rank=1) as rank1:  # ... but rank 1 of the same run uses the directory as it is
        assert not rank1._locked
    assert {f: (out / f).read_text() for f in os.listdir(out)} == before
    with runs.RunDir(str(tmp_path / "absent"), rank=1):
        pass
    assert not (tmp_path / "absent").exists()  # and creates nothing


def test_map_rows_seeds_each_chunk_and_restores_the_rng():
    x = torch.arange(10.0)[:, None]
    fn = lambda xb, rb: {"u": xb[:, 0] + torch.rand(xb.shape[0]), "rows": rb}  # noqa: E731
    torch.manual_seed(3)
    state = torch.get_rng_state()
    out = distributed.map_rows(fn, x, torch.arange(10) + 100, chunk_size=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert torch.equal(out["rows"], torch.arange(10) + 100)
    for c, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):  # chunk c: its own seed, whoever runs it
        torch.manual_seed(distributed.chunk_seed(7, c))
        assert torch.equal(out["u"][sl], x[sl, 0] + torch.rand(sl.stop - sl.start))
    with pytest.raises(ValueError, match="has 1 rows for a chunk of 4"):
        distributed.map_rows(lambda xb, rb: {"bad": xb[:1, 0]}, x, chunk_size=4)


def test_sparse_lookup_gives_the_dense_gradient():
    torch.manual_seed(0)
    table = PerDatapointNormal(30, 4, init_scale=0.5)
    with torch.no_grad():
        table.loc_unconstrained.normal_()
    idx = torch.tensor([3, 17, 3, 29])
    grads = {}
    for sparse in (False, True):
        table.sparse = sparse
        table.zero_grad(set_to_none=True)
        q = table.dist(idx)
        torch.manual_seed(1)
        (q.rsample() ** 2).sum().backward()
        grads[sparse] = [p.grad for p in (table.loc_unconstrained, table.scale_unconstrained)]
    for dense, sparse in zip(grads[False], grads[True]):
        assert sparse.is_sparse and not dense.is_sparse
        assert torch.allclose(sparse.to_dense(), dense, rtol=1e-6, atol=1e-7)  # float32 round-off of the sums
    table.sparse = False
    assert torch.equal(table.dist(idx).base_dist.scale, table.scale[idx])  # rows as PyroParam gives them


@pytest.mark.parametrize("sparse_rows", [False, True])
def test_sparse_rows_move_only_the_batch_rows(sparse_rows):
    d = loaders.load_dataset("digits")
    data = loaders.DataSplits("digits", d.train[:200], d.val[:0], d.test[:0])
    torch.manual_seed(0)
    model = models.build_model("ppca", {"latent_dim": 2, "guide": "per-datapoint"}, data.data_dim, 200)
    table = model.encoder.loc_unconstrained
    snapshots, seen = [table.detach().clone()], []

    class Spy(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_start(self, trainer, module, batch, i):
            seen.append(set(batch[1].tolist()))

        def on_train_batch_end(self, trainer, module, *args):
            snapshots.append(table.detach().clone())

    res = fit(model, data, TrainConfig(steps=2, batch_size=50, lr=0.1, progress=False, sparse_rows=sparse_rows),
              callbacks=[Spy()])
    assert res.steps == 2 and not model.encoder.sparse  # the flag is restored after the fit

    def moved(step):
        return set(torch.nonzero((snapshots[step + 1] != snapshots[step]).any(1))[:, 0].tolist())

    assert moved(0) == seen[0]  # step 1: Adam's moments start at zero, so only the batch's rows move
    only_first = seen[0] - seen[1]
    assert only_first
    if sparse_rows:  # SparseAdam: step 2 moves exactly its own rows
        assert moved(1) == seen[1]
    else:  # dense Adam: step 1's rows keep moving on their momentum
        assert moved(1) == seen[1] | only_first


@pytest.mark.slow
def test_ddp_resume_ends_where_the_uninterrupted_ddp_run_ends(tmp_path):
    """2 epochs, then --resume to 4, on 2 processes: the same parameters as 4 epochs in one go
    (each rank's RNG state is in the checkpoint)."""
    args = ["-m", "elbolab.scripts.fit", "--model", "ppca", "--latent-dim", "3", "--batch-size", "50", "--lr", "0.05",
            "--checkpoint-every", "1", "--devices", "2", "--strategy", "ddp", "--threads", "1", "--no-progress",
            "--eval-particles", "1", "--seed", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for extra in (["--epochs", "4", "--out", a], ["--epochs", "2", "--out", b]):
        r = _run(args + extra)
        assert r.returncode == 0, r.stderr[-3000:]
    r = _run(["-m", "elbolab.scripts.fit", "--resume", b, "--epochs", "4", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    ca, cb = (load_checkpoint(os.path.join(d, CHECKPOINT)) for d in (a, b))
    assert ca["global_step"] == cb["global_step"] == 4 * 13  # ceil(ceil(1257 / 2) / 50) = 13 steps an epoch
    assert len(ca["elbolab"]["torch_rng_ranks"]) == 2
    for k in ca["state_dict"]:
        # the resumed run repeats the same operations: equal up to float32 round-off
        assert float((ca["state_dict"][k] - cb["state_dict"][k]).abs().max()) <= 1e-6, k


def test_spawning_strategies_are_refused():
    from elbolab.inference.errors import UsageError

    for strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
        with pytest.raises(UsageError, match=f"strategy {strategy}: the fit would live in spawned processes"):
            TrainConfig(devices=2, strategy=strategy)


def test_sparse_rows_resume_matches_uninterrupted(tmp_path):
    """Two optimizers (Adam, SparseAdam) and two decaying rates: both saved and restored."""
    d = loaders.load_dataset("digits")
    data = loaders.DataSplits("digits", d.train[:300], d.val[:0], d.test[:0])

    class StopAfter(__import__("lightning.pytorch").pytorch.Callback):
        """Ends the fit after ``epochs`` epochs (an interruption, seen from the resumed run)."""

        def __init__(self, epochs):
            self.epochs = epochs

        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch + 1 >= self.epochs:
                trainer.should_stop = True

    def run(out, resume=False, stop=None):
        torch.manual_seed(0)
        model = models.build_model("ppca", {"latent_dim": 2, "guide": "per-datapoint"}, data.data_dim, 300)
        cfg = TrainConfig(epochs=4, batch_size=60, lr=0.05, lr_final=0.005, sparse_rows=True, progress=False,
                          checkpoint_every=1)
        res = fit(model, data, cfg, out_dir=str(out), resume=resume, callbacks=[StopAfter(stop)] if stop else None)
        return model, res

    full, res = run(tmp_path / "a")
    assert res.steps == 4 * 5
    _, res = run(tmp_path / "b", stop=2)
    assert res.steps == 2 * 5
    resumed, res = run(tmp_path / "b", resume=True)
    assert res.steps == 4 * 5
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n  # the same operations in the same order: the same bits
