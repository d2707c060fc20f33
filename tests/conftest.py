"""Shared test set-up: one torch thread per process keeps the suite steady on a 2-core machine."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
