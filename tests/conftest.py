"""Suite-wide settings.

One intra-op thread: on the shared 2-core CI box, OpenMP barriers make multi-threaded CPU kernels of
these tiny models many times slower than a single thread. Subprocesses inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the control-plane tests run without torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)
