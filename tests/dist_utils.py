"""Start N training processes on this machine the way any launcher would (RANK/WORLD_SIZE env)."""
import json
import subprocess
import sys
from pathlib import Path

from promoe_ds.parallel.launch import free_port, spawn_local  # noqa: F401 (free_port: used by tests)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"


def launch(n: int, overrides: list[str], config: Path = TINY, log_dir: Path | None = None) -> list[subprocess.Popen]:
    return spawn_local(n, [sys.executable, "-m", "promoe_ds.cli", "train", "--config", str(config), *overrides],
                       log_dir=log_dir, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


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
