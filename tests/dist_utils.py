"""Start N training processes on this machine the way any launcher would (RANK/WORLD_SIZE env)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, overrides: list[str], config: Path = TINY, log_dir: Path | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out = open(log_dir / f"rank{r}.log", "w") if log_dir else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "promoe_ds.cli", "train", "--config", str(config),
                                       *overrides], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    return procs


def run(n: int, overrides: list[str], log_dir: Path, timeout: float = 600) -> list[int]:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = launch(n, overrides, log_dir=log_dir)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(codes):
        logs = "\n".join((log_dir / f"rank{r}.log").read_text()[-3000:] for r in range(n))
        raise AssertionError(f"exit codes {codes}\n{logs}")
    return codes


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
