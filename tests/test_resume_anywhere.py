"""Resume on another layout (world size, ep_size, ZeRO stage, gradient accumulation) and bounded hangs: real
DeepSpeed engines, several gloo processes on the CPU."""
import signal
import time

import pytest

from dist_utils import launch

pytestmark = pytest.mark.slow

COMMON = ["train.global_batch=8", "train.log_every=1", "train.seed=3", "objective.class_dropout=0.25"]


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stopped_or_dead_rank_ends_the_others_within_the_collective_timeout(tmp_path, sig):
    """SIGSTOP (a frozen node) or SIGKILL (a dead one) one of 2 ranks mid-run: the other exits 98 within
    train.collective_timeout (killed: at once, its connection closes) with one line naming the step and what it
    waited in; the last complete checkpoint stays the resume point."""
    timeout = 15
    out = tmp_path / "run"
    (tmp_path / "log").mkdir()
    procs = launch(2, COMMON + ["train.steps=100000", "train.ckpt_every=3", f"train.collective_timeout={timeout}",
                                f"train.out_dir={out}"], log_dir=tmp_path / "log")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints/latest").is_file():
            time.sleep(0.2)
        assert (out / "checkpoints/latest").is_file(), (tmp_path / "log/rank0.log").read_text()[-3000:]
        procs[1].send_signal(sig)
        stopped = time.time()
        code = procs[0].wait(timeout=timeout + 60)
        took = time.time() - stopped
    finally:
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.kill()
            p.wait()
    log = (tmp_path / "log/rank0.log").read_text()
    assert code == 98, log[-3000:]
    assert (timeout <= took if sig == signal.SIGSTOP else took < 10) and took < timeout + 15, took
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert (out / "hang.txt").read_text().strip() == errors[0].strip()  # what the Slurm template reads
    why = f"train.collective_timeout={timeout} s" if sig == signal.SIGSTOP else "lost another rank"
    assert "rank 0: step " in errors[0] and why in errors[0], errors[0]
    assert any(w in errors[0] for w in ("in the forward", "in the backward", "in the optimizer", "in the stop")), errors
    latest = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    assert (latest / "meta.json").is_file()
