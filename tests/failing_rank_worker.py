"""Run under torchrun by tests/test_distributed.py: the training job, with rank 1's data loader made to
raise at its third training batch, to check that one rank's failure ends the whole run."""

import os
import sys

import train_gpt2
from gpt.data import DataLoader

if os.environ.get("RANK") == "1":
    next_batch = DataLoader.next_batch
    calls = 0

    def failing_next_batch(self):
        global calls
        if self.split == "train":
            calls += 1
            if calls == 3:
                raise RuntimeError("injected failure on rank 1")
        return next_batch(self)

    DataLoader.next_batch = failing_next_batch

sys.exit(train_gpt2.main(sys.argv[1:]))
