"""Host time per step of the trainer's parts between its second and last logged step (steady state), from the
files bench/probes/host/sitecustomize.py wrote. Nested calls overlap (training_losses contains the compiled
forward; engine.step the optimizer).

    HOSTPROBE_DIR=/tmp/host PYTHONPATH=bench/probes/host:$PYTHONPATH python bench/train_step.py --gpus 1 \\
        --batch 64 --steps 36 --set train.compile=true train.zero_stage=0
    python bench/probes/host/summary.py /tmp/host runs/bench/<run>/metrics.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from promoe_ds.scaling import read_metrics


def main(probe_dir: str, metrics_path: str) -> None:
    logged = read_metrics(Path(metrics_path).parent)
    t0, t1 = logged[1]["time"], logged[-1]["time"]
    steps = logged[-1]["step"] - logged[1]["step"]
    runs = [json.loads(f.read_text()) for f in Path(probe_dir).glob("host_*.json")]
    events = [e for d in runs if "train" in d["argv"] for e in d["events"] if t0 < e[1] <= t1]
    per = defaultdict(list)
    for name, _, ms in events:
        per[name].append(ms)
    print(f"steady state: logged steps {logged[1]['step']} to {logged[-1]['step']}, {(t1 - t0) * 1e3 / steps:.1f} ms "
          f"per step")
    print("| call | calls per step | ms per step | median ms per call |\n|---|---|---|---|")
    for name, ms in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name} | {len(ms) / steps:.1f} | {sum(ms) / steps:.2f} | {statistics.median(ms):.2f} |")
    syncs = [e for e in events if e[0] == "item"]
    if syncs:
        first = defaultdict(list)  # host ms from a sync's return to each call's return, within the next step
        for a, b in zip(syncs, syncs[1:]):
            seen = set()
            for name, t, _ in events:
                if a[1] < t < b[1] and name not in seen:
                    seen.add(name)
                    first[name].append((t - a[1]) * 1e3)
        print("\nhost ms from the sync's return (item) to the first return of each call after it (median):")
        for name, ms in sorted(first.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"  {statistics.median(ms):7.1f}  {name}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
