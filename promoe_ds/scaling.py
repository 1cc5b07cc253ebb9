"""``promoe-ds scaling-report``: throughput table and plot of runs of one model at several sizes.

Reads ``metrics.jsonl`` of each run directory (one record per log step, written by rank 0 with
``img_per_sec``, ``img_per_sec_per_gpu``, ``world_size``, ``global_batch``, ``time``), drops the
first ``skip`` logged intervals of every process start as warm-up (start-up, allocator, compile,
first collectives), and averages the rest. A run directory that was preempted and resumed holds
several starts; a new start is recognised by a step that does not increase or by a wall-clock gap
much longer than the logged interval itself, and each start's warm-up is dropped.

Weak-scaling efficiency = per-GPU img/s / per-GPU img/s of the run with the fewest GPUs. Peak GiB: the
largest ``mem_peak_gib`` of the run, warm-up included (memory reserved on the fullest GPU; GPU runs only).
The node count comes from ``slurm_job.json`` (written by ``slurm/train.sbatch``) when present, else
from a ``nodes`` field of the metrics, else 1.

Writes ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` and prints the markdown table.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from promoe_ds.config import ConfigError

COLUMNS = ["run", "nodes", "gpus", "global_batch", "per_gpu_batch", "img_per_sec", "img_per_sec_per_gpu",
           "speedup", "efficiency", "intervals", "steps", "mem_peak_gib"]
CSV_COLUMNS = COLUMNS + ["wallclock_img_per_sec", "path"]
HEADERS = {"run": "run", "nodes": "nodes", "gpus": "GPUs", "global_batch": "global batch",
           "per_gpu_batch": "per-GPU batch", "img_per_sec": "img/s", "img_per_sec_per_gpu": "per-GPU img/s",
           "speedup": "speedup", "efficiency": "efficiency", "intervals": "intervals", "steps": "steps",
           "ep_size": "ep_size", "mfu": "MFU", "mem_peak_gib": "peak GiB"}


class ScalingError(ConfigError):
    """A run directory that cannot be reported (message names it); the CLI prints it as one line."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ScalingError(f"{run_dir}: no metrics.jsonl (not a training run directory, or it has not logged yet)")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a last line cut short by a kill: ignore
            raise ScalingError(f"{path}:{n}: not JSON") from None
        if "img_per_sec" in rec and "step" in rec:
            records.append(rec)
    if not records:
        raise ScalingError(f"{path}: no records with step and img_per_sec")
    return records


def split_starts(records: list[dict]) -> list[list[dict]]:
    """Cut the record list where a new process start (resume) begins: the step does not increase, or
    the wall-clock gap to the previous record is far above the run's typical seconds per step."""
    pairs = list(zip(records, records[1:]))
    rates = sorted((b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in pairs
                   if "time" in a and "time" in b and b["step"] > a["step"])
    typical = rates[len(rates) // 2] if rates else None  # median seconds per step
    segments: list[list[dict]] = [[records[0]]]
    for prev, rec in pairs:
        new = rec["step"] <= prev["step"]
        if not new and typical is not None and "time" in rec and "time" in prev:
            new = rec["time"] - prev["time"] > 3.0 * typical * (rec["step"] - prev["step"]) + 10.0
        if new:
            segments.append([rec])
        else:
            segments[-1].append(rec)
    return segments


def summarize(run_dir: str | Path, skip: int = 1) -> dict:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    kept: list[dict] = []
    for seg in split_starts(records):
        kept += seg[skip:]
    warmup_only = not kept
    if warmup_only:  # too short to drop the warm-up: use each start's last interval
        kept = [seg[-1] for seg in split_starts(records)]
    world = int(kept[-1].get("world_size", 1))
    batch = int(kept[-1].get("global_batch", 0))
    if any(int(r.get("world_size", world)) != world or int(r.get("global_batch", batch)) != batch for r in kept):
        raise ScalingError(f"{run_dir}: world_size / global_batch change within the run; give one layout per directory")
    ips = sum(r["img_per_sec"] for r in kept) / len(kept)
    wall = _wallclock_rate(records, skip)
    ips_gpu = sum(r.get("img_per_sec_per_gpu", r["img_per_sec"] / world) for r in kept) / len(kept)
    mfu = [r["mfu"] for r in kept if "mfu" in r]  # logged on GPUs of known peak only
    mem = [r["mem_peak_gib"] for r in records if "mem_peak_gib" in r]  # GPUs only; warm-up included
    nodes = _nodes(run_dir, records)
    return {"run": run_dir.name if run_dir.name else str(run_dir), "path": str(run_dir), "nodes": nodes,
            "gpus": world, "global_batch": batch, "per_gpu_batch": batch / world if world else float("nan"),
            "img_per_sec": ips, "img_per_sec_per_gpu": ips_gpu, "wallclock_img_per_sec": wall,
            "mfu": sum(mfu) / len(mfu) if mfu else None, "mem_peak_gib": max(mem) if mem else None,
            "intervals": len(kept),
            "steps": f"{kept[0]['step']}-{kept[-1]['step']}" if len(kept) > 1 else str(kept[0]["step"]),
            "warmup_only": warmup_only}


def _wallclock_rate(records: list[dict], skip: int) -> float:
    """Images per second from the records' steps, global batch and wall-clock ``time`` over the
    post-warm-up intervals of each start: an independent check of the logged ``img_per_sec``."""
    images, seconds = 0.0, 0.0
    for seg in split_starts(records):
        for a, b in zip(seg[max(skip, 1) - 1:], seg[max(skip, 1):]):
            if "time" in a and "time" in b and b["time"] > a["time"]:
                images += (b["step"] - a["step"]) * b.get("global_batch", 0)
                seconds += b["time"] - a["time"]
    return images / seconds if seconds > 0 else float("nan")


def _nodes(run_dir: Path, records: list[dict]) -> int:
    job = run_dir / "slurm_job.json"
    if job.is_file():
        try:
            return int(json.loads(job.read_text())["nodes"])
        except (ValueError, KeyError, TypeError):
            pass
    for key in ("nodes", "num_nodes"):
        if key in records[-1]:
            return int(records[-1][key])
    return 1


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if key in ("efficiency", "mfu"):
            return f"{v:.1%}"
        if key == "speedup":
            return f"{v:.2f}x"
        if key == "per_gpu_batch":
            return f"{v:g}"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """A row with an ``error`` (a run that could not be measured) shows it in its first empty cell."""
    head = "| " + " | ".join(HEADERS[c] for c in columns) + " |"
    sep = "|" + "|".join("---" if c == "run" else "---:" for c in columns) + "|"
    body = []
    for r in rows:
        cells = [_fmt(c, r[c]) if c in r else "" for c in columns]
        if "error" in r:
            cells[cells.index("")] = f"failed: {r['error'][:100]}"
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [r["gpus"] for r in rows]
    base = rows[0]
    ideal = [base["img_per_sec_per_gpu"] * g for g in gpus]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(gpus, ideal, "--", color="gray", label="linear (per-GPU rate of the smallest run)")
    ax1.plot(gpus, [r["img_per_sec"] for r in rows], "o-", label="measured")
    for r in rows:
        ax1.annotate(f"{r['nodes']}n", (r["gpus"], r["img_per_sec"]), textcoords="offset points", xytext=(4, -10),
                     fontsize=8)
    ax1.set_xlabel("GPUs")
    ax1.set_ylabel("images / s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("throughput")
    ax2.plot(gpus, [100 * r["efficiency"] for r in rows], "o-")
    ax2.axhline(100, color="gray", ls="--")
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("weak-scaling efficiency (%)")
    ax2.set_ylim(0, max(110, 5 + max(100 * r["efficiency"] for r in rows)))
    ax2.set_title("per-GPU img/s vs smallest run")
    if len(set(gpus)) > 1 and min(gpus) > 0 and max(gpus) / min(gpus) >= 4:
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
    for ax in (ax1, ax2):
        ax.set_xticks(gpus)
        ax.set_xticklabels([str(g) for g in gpus])
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_rows(run_dirs: list[str], skip: int = 1) -> list[dict]:
    if not run_dirs:
        raise ScalingError("no run directories given")
    return add_ratios(sorted((summarize(d, skip) for d in run_dirs), key=lambda r: (r["gpus"], r["nodes"], r["run"])))


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speedup (img/s) and weak-scaling efficiency (per-GPU img/s) of each row vs the first one."""
    base = rows[0] if rows else {}
    for r in rows:
        r["speedup"] = r["img_per_sec"] / base["img_per_sec"] if base["img_per_sec"] else float("nan")
        r["efficiency"] = (r["img_per_sec_per_gpu"] / base["img_per_sec_per_gpu"]
                           if base["img_per_sec_per_gpu"] else float("nan"))
    return rows


def main_scaling_report(run_dirs: list[str], out: str, skip: int = 1) -> list[dict]:
    """Table (markdown + CSV) and plot of the runs' throughput; returns one dict per run, fewest GPUs first."""
    rows = scaling_rows(run_dirs, skip)
    prefix = Path(out)
    if prefix.suffix in (".md", ".csv", ".png"):
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    base = rows[0]
    notes = [f"Weak scaling: efficiency = per-GPU img/s / {base['img_per_sec_per_gpu']:.2f} "
             f"(run {base['run']}, {base['gpus']} GPU{'s' if base['gpus'] != 1 else ''}); "
             f"speedup = img/s / {base['img_per_sec']:.2f}. "
             f"First {skip} logged interval(s) of every start skipped as warm-up."]
    for r in rows:
        wall = r["wallclock_img_per_sec"]
        if math.isfinite(wall) and wall > 0 and not 0.75 < r["img_per_sec"] / wall < 1.33:
            notes.append(f"warning: {r['run']}: logged {r['img_per_sec']:.1f} img/s but steps x global batch / "
                         f"wall clock gives {wall:.1f} img/s (x{r['img_per_sec'] / wall:.2f}; gradient accumulation, "
                         "checkpoint or eval time?)")
        if r["warmup_only"]:
            notes.append(f"warning: {r['run']} logged too few intervals to skip the warm-up; its number includes it.")
    md = f"# Scaling report\n\n{table}\n\n" + "\n".join(notes) + "\n"
    prefix.with_suffix(".md").write_text(md)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    plot(rows, prefix.with_suffix(".png"), f"weak scaling: {', '.join(r['run'] for r in rows)}")
    print(table)
    for n in notes:
        print(n)
    print(f"wrote {prefix}.md, {prefix}.csv, {prefix}.png")
    return rows


def cmd_scaling_report(args) -> int:
    main_scaling_report(args.run_dirs, args.out, skip=args.skip)
    return 0


def add_subparser(sub) -> None:
    """``promoe-ds scaling-report RUN_DIR... --out PREFIX [--skip N]``."""
    s = sub.add_parser("scaling-report", help="throughput table (md, csv) and plot of runs at several sizes",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories (train.out_dir)")
    s.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.md, PREFIX.csv, PREFIX.png")
    s.add_argument("--skip", type=int, default=1, metavar="N",
                   help="logged intervals dropped as warm-up after every process start (default 1)")
    s.set_defaults(func=cmd_scaling_report)
