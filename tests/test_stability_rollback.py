"""StabilityGuard's rollback (CPU): the restored state equals the snapshot bit for bit, the batches since it are on
the skip list and never fed again (also after a checkpoint and resume), a run with a rollback equals a run that
never saw those batches, disk snapshots are written atomically, and repeated rollbacks end in a clear abort."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP, regression_task
from mixprec.stability import StabilityAbort, StabilityGuard
from mixprec.stability.snapshot import SnapshotRing

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend

X, Y = regression_task()
N = 22
SPIKES = (12, 13, 14)      # three faults in a row: skip, skip, then the rollback rung (escalate_after=2)
ROLLED = {10, 11, 12, 13, 14, 15}   # snapshot at 10 (every 5); the rollback runs at 15, one step late
CASES = [("torch", "fp32"), ("mixprec-int8", "fp16-mixed")]


class Run:
    """A model, optimizer, LR schedule, loss scaler and guard, fed batch b at data position b."""

    def __init__(self, kind, recipe, guard=True, spikes=SPIKES, **guard_kw):
        torch.manual_seed(0)
        self.policy = mp.Policy.from_recipe(recipe)
        self.model = mp.prepare(MLP(), self.policy)
        params = self.model.parameters()
        self.opt = (torch.optim.AdamW(params, lr=1e-3) if kind == "torch"
                    else mp.optim.AdamW(params, lr=1e-3, state_dtype="int8"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.1 * s))
        self.scaler = mp.LossScaler(growth_interval=4) if recipe == "fp16-mixed" else None
        kw = dict(window=8, ladder=("skip", "rollback"), escalate_after=2, snapshot_every=5, keep_snapshots=2,
                  scheduler=self.sched) | guard_kw
        self.guard = StabilityGuard(self.model, self.opt, **kw) if guard else None
        self.spikes, self.fed = set(spikes), []

    def feed(self, b):
        self.fed.append(b)
        i = torch.arange(b * 16, b * 16 + 16) % len(X)
        f = 1e3 if b in self.spikes else 1.0
        with mp.autocast(self.policy):
            loss = F.mse_loss(self.model(X[i] * f), Y[i] * f)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.guard is not None:
            out = self.guard.step(loss, scaler=self.scaler, batch=b)
        else:
            if self.scaler:
                self.scaler.unscale_(self.opt)
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.sched.step()
            out = None
        self.opt.zero_grad()
        return out

    def state(self):
        if self.guard is not None:
            self.guard.flush()   # the last step's record read: its scheduler.step() done (as state_dict() does)
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "window": self.guard.window if self.guard else None}

    def load(self, st):
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.scaler:
            self.scaler.load_state_dict(st["scaler"])


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _never_saw(kind, recipe, skipped):
    ref = Run(kind, recipe, guard=False)
    for b in range(N):
        if b not in skipped:
            ref.feed(b)
    return ref


@pytest.mark.parametrize("kind,recipe", CASES)
def test_rollback_restores_the_snapshot_and_skips_the_batches_since(kind, recipe):
    run = Run(kind, recipe)
    after = {}
    for b in range(N):
        if run.guard.is_skipped(b):
            continue
        out = run.feed(b)
        if out.rolled_back:
            assert b == 15
            # the snapshot of iteration 10 holds the state after iteration 9, bit for bit (model, moments and
            # int8 codes, step counts, LR schedule, loss scale and trackers, the guard's windows)
            assert _equal(run.state(), after[9])
            ev = out.events[-1]
            assert ev["action"] == "restored" and ev["to_step"] == 10 and set(ev["rolled_back_batches"]) == ROLLED
        else:
            run.guard.flush()          # the record of b read now rather than at b + 1: the LR schedule stepped
            after[b] = run.state()
        if b == 18:
            checkpoint = {**run.state(), "guard": copy.deepcopy(run.guard.state_dict())}
    run.guard.flush()
    assert set(run.guard.skip_list) == ROLLED
    assert [(e["step"], e["action"]) for e in run.guard.events] == [(12, "skip"), (13, "skip"), (14, "rollback"),
                                                                    (15, "restored")]
    assert run.fed == [b for b in range(N)]      # each batch fed once: none of the skipped ones again
    # the run equals one that never saw the rolled-back batches
    ref = _never_saw(kind, recipe, ROLLED)
    assert _equal({k: v for k, v in run.state().items() if k != "window"},
                  {k: v for k, v in ref.state().items() if k != "window"})

    # checkpoint and resume at 18: the guard's windows, ladder state and skip list round-trip
    resumed = Run(kind, recipe)
    resumed.load(checkpoint)
    resumed.guard.load_state_dict(checkpoint["guard"])
    assert _equal(resumed.guard.window, checkpoint["window"]) and set(resumed.guard.skip_list) == ROLLED
    for b in range(19, N):
        if not resumed.guard.is_skipped(b):
            resumed.feed(b)
    resumed.guard.flush()
    assert _equal(resumed.state(), run.state())
    assert resumed.guard.skip_list == run.guard.skip_list and resumed.guard.events == run.guard.events


def test_a_restart_from_an_earlier_checkpoint_never_feeds_the_skip_list_again():
    """PaLM's restart: resume before the spike, skipping the batches the guard listed."""
    run = Run("torch", "fp32")
    for b in range(N):
        if b == 8:
            early = {**run.state(), "guard": copy.deepcopy(run.guard.state_dict())}
        if not run.guard.is_skipped(b):
            run.feed(b)
    run.guard.flush()
    restart = Run("torch", "fp32")
    restart.load(early)
    restart.guard.load_state_dict(early["guard"])
    restart.guard.skip_batches(run.guard.skip_list)
    for b in range(8, N):
        if not restart.guard.is_skipped(b):
            restart.feed(b)
    assert not set(restart.fed) & ROLLED and restart.fed == [8, 9, 16, 17, 18, 19, 20, 21]
    assert restart.guard.counters["faults"] == 0
    assert _equal({k: v for k, v in restart.state().items() if k != "window"},
                  {k: v for k, v in run.state().items() if k != "window"})


def test_disk_snapshots_roll_back_the_same(tmp_path):
    memory, disk = Run("torch", "fp32"), Run("torch", "fp32", snapshot_dir=tmp_path)
    for run in (memory, disk):
        for b in range(N):
            if not run.guard.is_skipped(b):
                run.feed(b)
        run.guard.flush()
    assert _equal(memory.state(), disk.state()) and memory.guard.skip_list == disk.guard.skip_list
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("snapshot-") and f.endswith(".pt") for f in files)


def test_a_failed_disk_write_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    ring = SnapshotRing(keep=1, directory=tmp_path)
    ring.take(0, {"w": torch.arange(4.0)}, {"lr": 0.1})
    first = ring.snapshots[0]

    def broken_save(obj, f):
        f.write(b"half a snapshot")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ring.take(5, {"w": torch.zeros(4)}, {"lr": 0.2})
    assert ring.snapshots == [first]              # the ring still points at the intact file
    tensors, host = ring.load(first)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and host == {"lr": 0.1}


def test_repeated_rollbacks_abort_with_the_figures():
    run = Run("torch", "fp32", spikes=range(12, N), max_rollbacks=1)
    with pytest.raises(StabilityAbort, match=r"1 rollback\(s\) in a row did not help \(max_rollbacks=1\)"):
        for b in range(N):
            if not run.guard.is_skipped(b):
                run.feed(b)
    assert run.guard.counters["rollbacks"] == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())   # no faulty step was applied
