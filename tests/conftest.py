import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci")

CUDA = torch.cuda.is_available()


def version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``torch.__version__`` ("2.6.0+cu124")."""
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


TORCH = version(torch.__version__)


def steps_without_host_sync(step, batches) -> None:
    """``step(batch)`` for each batch under CUDA's sync debug mode "error": any host sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
