import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci")

CUDA = torch.cuda.is_available()
