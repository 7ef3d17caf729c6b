"""Make the repository's flat modules (model.py, data.py, train.py, ...) importable from the tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerAborted(Exception):
    """A torchrun worker died of SIGABRT (see `twice_if_a_worker_aborts`)."""


def torchrun_output(script: str, *args: str) -> str:
    """`python -m torch.distributed.run --nproc_per_node 2 script args` on CPU (gloo); its combined output."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *args]
    p = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    if p.returncode != 0 and "SIGABRT" in p.stderr:
        raise WorkerAborted(p.stderr[-2000:])
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout + p.stderr


def twice_if_a_worker_aborts(body, folder):
    """body(folder / "try1"), and once more in a fresh folder if a worker died of SIGABRT. On these 2 CPUs a
    gloo worker aborted once in about 16 runs of the suite (not reproduced in 15 reruns; the cause, likely in
    gloo's transport or teardown, was not found): a crash, not a wrong result. A second abort fails the
    test."""
    try:
        return body(folder / "try1")
    except WorkerAborted:
        return body(folder / "try2")
