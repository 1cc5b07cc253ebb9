"""Experiment probe, not part of promoe-ds: records every cyclic-GC collection of each Python process it is
loaded into (put this folder first on PYTHONPATH) and writes them at exit to $GCPROBE_DIR/gc_<pid>.json as
[wall time, generation, ms, objects collected]. Summarise a trainer run with
``python bench/probes/gc/summary.py $GCPROBE_DIR <run dir>/metrics.jsonl``."""
import atexit
import gc
import json
import os
import sys
import time

_events, _start = [], {}


def _callback(phase, info):
    if phase == "start":
        _start["t"] = time.perf_counter()
    else:
        ms = (time.perf_counter() - _start["t"]) * 1e3
        _events.append((round(time.time() - ms / 1e3, 4), info["generation"], round(ms, 3), info["collected"]))


gc.callbacks.append(_callback)


@atexit.register
def _dump():
    out = os.environ.get("GCPROBE_DIR")
    if out:
        with open(os.path.join(out, f"gc_{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv[:3], "events": _events}, f)
