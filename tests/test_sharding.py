"""Pieces of evaluation at scale: per-example randomness, outcomes gathered across ranks, resumable files."""
import os

import pytest
import torch
import torch.distributed as dist

from fxsparse.errors import PersistenceError
from fxsparse.files.resume import ResumeFile
from fxsparse.robust.sharding import example_seeds, gather_examples, per_example_rand


def test_per_example_noise_does_not_depend_on_the_batch():
    x = torch.rand(10, 3, 4, 4)
    y = torch.arange(10)
    whole = per_example_rand(x, example_seeds(x, y, seed=3))
    parts = torch.cat([per_example_rand(x[i:i + 3], example_seeds(x[i:i + 3], y[i:i + 3], seed=3))
                       for i in range(0, 10, 3)])
    assert torch.equal(whole, parts) and whole.shape == x.shape
    other = per_example_rand(x, example_seeds(x, y, seed=4))
    assert not torch.equal(whole, other)  # the evaluation seed matters
    normal = per_example_rand(x, example_seeds(x, y, seed=3), normal=True)
    assert normal.min() < 0 < normal.max()


def _worker(rank, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        mine = torch.tensor([True, False, True]) if rank == 0 else torch.tensor([False, True])
        got = gather_examples(mine)
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_outcomes_of_unequal_shards_gather_in_rank_order(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = torch.tensor([True, False, True, False, True])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.dtype == torch.bool and torch.equal(got, expected)
    assert torch.equal(gather_examples(expected), expected)  # one process: unchanged


def test_resume_file_round_trip_and_refusal(tmp_path):
    path = tmp_path / "run.ckpt"
    config = {"eps": 0.1, "attacks": ["clean", "pgd"]}
    f = ResumeFile(path, "evaluation", config)
    assert f.load() == ({}, {})
    f.save({"pgd/plain": torch.tensor([True, False])}, {"batches": 1})
    tensors, progress = ResumeFile(path, "evaluation", config).load()
    assert progress == {"batches": 1} and torch.equal(tensors["pgd/plain"], torch.tensor([True, False]))
    with pytest.raises(PersistenceError, match="eps differ"):
        ResumeFile(path, "evaluation", {**config, "eps": 0.2}).load()
    with pytest.raises(PersistenceError, match="not an alpha search checkpoint"):
        ResumeFile(path, "alpha search", config).load()
    f.discard()
    assert not path.exists()
