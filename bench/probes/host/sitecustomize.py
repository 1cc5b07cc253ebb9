"""Experiment probe, not part of promoe-ds: host time of the trainer's parts, for a run on a GPU. Put this
folder first on PYTHONPATH; in the trainer's processes it wraps the calls below with a wall clock (no device
sync of its own) and writes them at exit to $HOSTPROBE_DIR/host_<pid>.json as [name, wall time at return, ms].
``item`` is every ``Tensor.item()`` on a CUDA tensor: a host sync, whose duration is the time the host waited
for the GPU (long: the host was ahead; near zero: the GPU was waiting for the host).
Summarise with ``python bench/probes/host/summary.py $HOSTPROBE_DIR <run dir>/metrics.jsonl``."""
import atexit
import functools
import json
import os
import sys
import time

_events = []


def _wrap(owner, attr, name, result=None):
    inner, depth = getattr(owner, attr), [0]

    @functools.wraps(inner)
    def timed(*args, **kwargs):  # outermost calls only (to_device recurses)
        t = time.perf_counter()
        depth[0] += 1
        try:
            out = inner(*args, **kwargs)
        finally:
            depth[0] -= 1
            if not depth[0]:
                _events.append((name, time.time(), (time.perf_counter() - t) * 1e3))
        return result(out) if result else out

    setattr(owner, attr, timed)


def _install():
    import torch
    import deepspeed.runtime.engine as engine
    import promoe_ds.data as data
    import promoe_ds.diffusion.ddpm as ddpm
    import promoe_ds.diffusion.flow as flow
    import promoe_ds.ema as ema
    import promoe_ds.metrics as metrics
    import promoe_ds.parallel.ep as ep
    import promoe_ds.train as train

    item = torch.Tensor.item

    def timed_item(self):
        if not self.is_cuda:
            return item(self)
        t = time.perf_counter()
        out = item(self)
        _events.append(("item", time.time(), (time.perf_counter() - t) * 1e3))
        return out

    torch.Tensor.item = timed_item

    def timed_model(model):  # the compiled model: time each call of it
        class Timed:
            def __call__(self, *args, **kwargs):
                t = time.perf_counter()
                out = model(*args, **kwargs)
                _events.append(("compiled_forward", time.time(), (time.perf_counter() - t) * 1e3))
                return out
        return Timed()

    _wrap(train, "compile_model", "compile_model", result=timed_model)
    for owner, attr in [(train, "step_draws"), (train, "to_device"), (train, "clip_in_adamw"),
                        (train.StopFlag, "agreed"), (ep, "global_grad_norm"), (ema.EMA, "update"),
                        (metrics.MetricsLogger, "add"), (metrics.MetricsLogger, "step"),
                        (data.SyntheticSource, "next_batch"), (data.ShardSource, "next_batch"),
                        (flow.RectifiedFlow, "training_losses"), (ddpm.GaussianDiffusion, "training_losses"),
                        (engine.DeepSpeedEngine, "backward"), (engine.DeepSpeedEngine, "step"),
                        (engine.DeepSpeedEngine, "forward")]:
        _wrap(owner, attr, f"{owner.__name__.rsplit('.', 1)[-1]}.{attr}")


if "promoe_ds.cli" in sys.orig_argv and "train" in sys.orig_argv:
    _install()


@atexit.register
def _dump():
    out = os.environ.get("HOSTPROBE_DIR")
    if out and _events:
        with open(os.path.join(out, f"host_{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.orig_argv, "events": _events}, f)
