"""Suite-wide settings.

One intra-op thread: on the shared 2-core CI box, OpenMP barriers make multi-threaded CPU kernels of
these tiny models many times slower than a single thread. Subprocesses inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the control-plane tests run without torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """A fresh, empty database URL on each backend (SQLite file; PostgreSQL database made for the test)."""
    from tests.databases import database

    with database(request.param, tmp_path) as url:
        yield url
