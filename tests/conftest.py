import os

import torch

# The toy networks are tiny: one intra-op thread is several times faster than two on a 2-core machine, and with two
# threads a busy neighbour process slows each op down by an order of magnitude.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
