import os
import sys
from pathlib import Path

import torch

# tiny models: one thread avoids hand-off overhead that dominates at these sizes, and keeps runs deterministic
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))
