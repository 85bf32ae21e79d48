"""Test-wide settings: one torch thread (tiny models run faster single-threaded, and a busy 2-core machine
otherwise slows them by 10x); subprocesses inherit it through OMP_NUM_THREADS."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test (or the code it calls) that switches autograd off globally breaks every later test that trains:
    fail the culprit, not its victims."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) behind"


@pytest.fixture(scope="session")
def tiny_engine_dirs(tmp_path_factory):
    """Engine directories of two random tiny engines: teacher/ (seed 0) and generator/ (seed 1)."""
    from engine.testing import tiny_engine

    root = tmp_path_factory.mktemp("tiny-engines")
    tiny_engine(seed=0).save_pretrained(root / "teacher")
    tiny_engine(seed=1).save_pretrained(root / "generator")
    return root
