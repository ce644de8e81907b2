"""Test data helpers shared by the suite."""


class CountingData:
    """Replayable batches that count how often they are iterated (to check that data is read once)."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)
