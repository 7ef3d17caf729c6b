"""Make the repository's flat modules (model.py, data.py, train.py, ...) importable from the tests, and run the
tests on one CPU thread: their models are tiny, so a second OpenMP thread only adds hand-offs (the suite ran 2x
slower on 2 idle-ish cores, 13x slower while another process shared them). Subprocesses inherit the setting
through the environment; an explicit OMP_NUM_THREADS wins."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
