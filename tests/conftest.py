import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the on-disk prefix cache of every test run goes to a fresh folder, never the user's ~/.cache
os.environ["MMPEFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmpeft-test-cache-")

import torch  # noqa: E402

# tiny test models run faster on one thread than on two competing ones
torch.set_num_threads(1)
