"""Test-wide settings: one torch thread (tiny models run faster single-threaded, and a busy 2-core machine
otherwise slows them by 10x); subprocesses inherit it through OMP_NUM_THREADS."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
