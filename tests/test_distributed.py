"""Distributed calibration: two CPU processes (gloo) with a DistributedSampler end with the statistics of one
process over all the data, identical on both ranks; a failure on one rank is raised on every rank."""
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fxsparse
from fxsparse.testing.bad_inputs import Small

WORLD = 2


def _data() -> torch.Tensor:
    return torch.randn(24, 3, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3 + 1


def _model():
    torch.manual_seed(0)
    return Small().double().eval()  # float64 buffers: the comparison is at float64 precision


def _statistics(gm):
    return {f"{name}/{key}": getattr(op, key).detach().clone() for name, op in fxsparse.meansparse_ops(gm).items()
            for key in ("mean", "std", "count", "zscore_counts")}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = _data()
        dataset = TensorDataset(x, torch.zeros(len(x)))
        loader = DataLoader(dataset, batch_size=5, sampler=DistributedSampler(dataset, shuffle=True, seed=3))
        gm = fxsparse.prepare(_model(), x[:2])
        fxsparse.calibrate(gm, loader)  # replaced fractions estimated in the one pass
        save_file(_statistics(gm), os.path.join(out, f"rank{rank}.estimate.safetensors"))
        fxsparse.calibrate(gm, loader, measure="exact")
        save_file(_statistics(gm), os.path.join(out, f"rank{rank}.safetensors"))
        bad = [x[:4]] + ([x[:4, :2]] if rank == 1 else [])  # rank 1 alone gets a batch the model refuses
        try:
            fxsparse.calibrate(gm, bad)
            message = "no error"
        except fxsparse.CalibrationError as exc:
            message = str(exc)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_over_the_union(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    estimates = [load_file(str(tmp_path / f"rank{r}.estimate.safetensors")) for r in range(WORLD)]
    for per_rank in (ranks, estimates):
        assert all(torch.equal(per_rank[0][k], per_rank[1][k]) for k in per_rank[0])  # bit-identical on every rank

    single = fxsparse.prepare(_model(), _data()[:2])
    fxsparse.calibrate(single, list(torch.split(_data(), 7)), measure="exact")
    expected = _statistics(single)
    assert int(expected["act/count"]) == 24 * 6 * 6 and int(expected["act2/count"]) == 24  # the union, once
    for key, value in expected.items():
        if key.endswith(("count", "zscore_counts")):  # element counts, histogram (float32 mean/std)
            assert torch.equal(ranks[0][key], value), key
        else:
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-12, atol=1e-12)
        if key.endswith("zscore_counts"):  # the one-pass estimate, merged across ranks: close to the exact one
            assert (estimates[0][key] - value).abs().max() < 0.03, key

    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert "calibration batch 1 on rank 1" in messages[1] and "layer 'conv'" in messages[1]
    assert "calibration failed on rank(s) [1]" in messages[0]
