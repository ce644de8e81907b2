"""Evaluation at scale: two gloo processes give the result of one over the union of their shards, whatever
the batch sizes; an interrupted and resumed evaluation equals an uninterrupted one."""
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import fxsparse
from fxsparse.robust.evaluation import evaluate

from fxsparse.testing.markers import needs_reference_attacks

ATTACKS = ["clean", "pgd:steps=3,restarts=2"]
REFERENCE = ["apgd-ce:steps=3"]  # pyautoattack computes in float32


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double().eval()
    gm = fxsparse.sparsify(net, [torch.rand(32, 1, 8, 8, dtype=torch.float64)], alpha=0.0, progress=False)
    fxsparse.set_alpha(gm, 0.5)
    return gm


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = _model()(x).argmax(1)  # labels the model gets right: every failure is the attack's
    return x, y


def _outcomes(ev):
    return {f"{r.attack}/{m}": t for r in ev.results for m, t in r.correct.items()}


def _worker(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        x, y = _data()
        shard = slice(0, 13) if rank == 0 else slice(13, 24)  # unequal shards, other batch sizes per rank
        ours = evaluate(_model(), (x[shard], y[shard]), eps=0.1, attacks=ATTACKS, batch_size=5 if rank else 4)
        runs = [evaluate(_model().float(), (x[shard].float(), y[shard]), eps=0.1, attacks=REFERENCE, batch_size=4)
                for _ in range(2)]
        save_file({k: v.to(torch.uint8) for k, v in _outcomes(ours).items()},
                  os.path.join(out, f"rank{rank}.safetensors"))
        same = all(torch.equal(a, b) for a, b in zip(_outcomes(runs[0]).values(), _outcomes(runs[1]).values()))
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(f"{ours.n} {runs[0].n} {same}")
    finally:
        dist.destroy_process_group()


@needs_reference_attacks
@pytest.mark.slow
def test_two_ranks_equal_one_process_over_the_union(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for r in range(2):
        n, n_reference, same = (tmp_path / f"rank{r}.txt").read_text().split()
        assert int(n) == int(n_reference) == 24 and same == "True"  # every rank: the union; the reference attack repeats itself
    x, y = _data()
    single = _outcomes(evaluate(_model(), (x, y), eps=0.1, attacks=ATTACKS, batch_size=7))
    for key in ("clean/plain", "pgd/plain", "pgd/bpda"):  # per-example randomness: any split, any batch size
        assert torch.equal(ranks[0][key].bool(), single[key]), key
    assert 0 < int(single["pgd/bpda"].sum()) < 24  # the attack fooled some examples, not all


class Interrupted(Exception):
    pass


class StopsOnce:
    """(x, y) batches; the attack pass (the second: evaluate's up-front checks read the data first) of the
    first run stops with Interrupted at batch `at`."""

    def __init__(self, x, y, at, size=5):
        self.batches = [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]
        self.at, self.passes = at, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes == 2 and i == self.at:
                raise Interrupted()
            yield batch

    def __len__(self):
        return len(self.batches)


def test_interrupted_and_resumed_evaluation_equals_an_uninterrupted_one(tmp_path):
    x, y = _data()
    attacks = ["clean", "pgd:steps=3"]
    whole = evaluate(_model(), StopsOnce(x, y, at=99), eps=0.1, attacks=attacks)
    path = tmp_path / "eval.ckpt"
    data = StopsOnce(x, y, at=3)
    with pytest.raises(Interrupted):
        evaluate(_model(), data, eps=0.1, attacks=attacks, checkpoint=path)
    assert path.exists()
    firsts = []
    model = _model()
    model.register_forward_pre_hook(lambda m, a: firsts.append(a[0][0].clone()))
    resumed = evaluate(model, data, eps=0.1, attacks=attacks, checkpoint=path)
    starts = [x[i] for i in range(0, 24, 5)]  # the clean first example of each batch
    seen = [sum(torch.equal(f, s) for f in firsts) for s in starts]
    # the three saved batches were not attacked again (batch 0's first example runs once, in the fit check)
    assert seen[:3] == [1, 0, 0] and all(seen[3:])
    assert resumed.n == whole.n == 24 and not path.exists()
    for a, b in zip(_outcomes(resumed).items(), _outcomes(whole).items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    with pytest.raises(Interrupted):  # a run with other settings does not mix into this checkpoint
        evaluate(_model(), StopsOnce(x, y, at=1), eps=0.1, attacks=attacks, checkpoint=path)
    with pytest.raises(fxsparse.PersistenceError, match="eps differ"):
        evaluate(_model(), StopsOnce(x, y, at=99), eps=0.2, attacks=attacks, checkpoint=path)


class Tripped(Exception):
    pass


def test_interrupted_and_resumed_search_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import fxsparse.robust.search as search

    x, y = _data()
    options = dict(eps=0.1, attack="pgd:steps=2", alphas=(0.0, 0.3, 0.6, 1.0), max_clean_drop=1.0)
    whole = fxsparse.search_alpha(_model(), (x, y), **options)
    path = tmp_path / "search.ckpt"
    calls, real = [], search.evaluate

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Tripped()
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "evaluate", failing_third)
    with pytest.raises(Tripped):
        fxsparse.search_alpha(_model(), (x, y), checkpoint=path, **options)
    calls.clear()
    monkeypatch.setattr(search, "evaluate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = fxsparse.search_alpha(_model(), (x, y), checkpoint=path, **options)
    assert len(calls) == len(whole.table) - 2 and not path.exists()  # two trials replayed from the file
    assert resumed.alpha == whole.alpha and resumed.verdict == whole.verdict
    assert [(t.phase, t.alpha, t.clean, t.robust) for t in resumed.table] == [
        (t.phase, t.alpha, t.clean, t.robust) for t in whole.table]
