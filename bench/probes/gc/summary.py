"""Collections of the trainer's rank-0 process between its second and last logged step (steady state), from
the files bench/probes/gc/sitecustomize.py wrote.

    GCPROBE_DIR=/tmp/gc PYTHONPATH=bench/probes/gc:$PYTHONPATH python bench/train_step.py --gpus 1 --batch 64 \\
        --steps 36 --set train.compile=true train.zero_stage=0
    python bench/probes/gc/summary.py /tmp/gc runs/bench/<run>/metrics.jsonl
"""
import json
import sys
from pathlib import Path

from promoe_ds.scaling import read_metrics


def main(probe_dir: str, metrics_path: str) -> None:
    logged = read_metrics(Path(metrics_path).parent)
    t0, t1 = logged[1]["time"], logged[-1]["time"]
    trainer = [json.loads(f.read_text()) for f in Path(probe_dir).glob("gc_*.json")]
    events = next(d["events"] for d in trainer if "train" in d["argv"])
    print(f"steady state: logged steps {logged[1]['step']} to {logged[-1]['step']} ({t1 - t0:.2f} s)")
    for gen in (0, 1, 2):
        ms = [e[2] for e in events if t0 <= e[0] <= t1 and e[1] == gen]
        print(f"generation {gen}: {len(ms)} collections, {sum(ms):.1f} ms in total, "
              f"longest {max(ms, default=0):.2f} ms")
    full = [e for e in events if e[1] == 2]
    print(f"whole process: {len(events)} collections, {len(full)} full ones, {sum(e[0] < t0 for e in full)} of them "
          f"before the steady state, longest {max((e[2] for e in full), default=0):.0f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:3])
