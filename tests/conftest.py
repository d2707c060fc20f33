"""Shared test set-up: one torch thread per process keeps the suite steady on a 2-core machine."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No network here or in CI: fail fast instead of retrying hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
