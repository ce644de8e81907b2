"""Test data helpers shared by the suite."""
import torch


class CountingData:
    """Replayable batches that count how often they are iterated (to check that data is read once)."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def two_pass_moments(x: torch.Tensor, dim: int):
    """Per-channel mean and (population) std along `dim`, in float64 by the textbook two-pass formula: the
    reference the one-pass statistics are checked against."""
    xd = x.double().movedim(dim, 0).reshape(x.shape[dim], -1)
    mean = xd.mean(1)
    std = ((xd - mean[:, None]) ** 2).mean(1).sqrt()
    return mean, std
