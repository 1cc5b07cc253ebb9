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


def _timed(fn, name, only=lambda *args: True):
    """``fn`` with its outermost calls (to_device recurses) timed, where ``only(*args)`` holds."""
    depth = [0]

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if depth[0] or not only(*args):
            return fn(*args, **kwargs)
        t = time.perf_counter()
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            _events.append((name, time.time(), (time.perf_counter() - t) * 1e3))

    return timed


def _install():
    import deepspeed.runtime.engine as engine
    import torch

    import promoe_ds.data as data
    import promoe_ds.diffusion.ddpm as ddpm
    import promoe_ds.diffusion.flow as flow
    import promoe_ds.ema as ema
    import promoe_ds.metrics as metrics
    import promoe_ds.parallel.ep as ep
    import promoe_ds.train as train

    torch.Tensor.item = _timed(torch.Tensor.item, "item", only=lambda t: t.is_cuda)
    compile_model = train.compile_model  # the trainer calls only the compiled model: time each call
    train.compile_model = lambda model, **kw: _timed(compile_model(model, **kw), "compiled_forward")
    for owner, attr in [(train, "step_draws"), (train, "to_device"), (train, "clip_in_adamw"),
                        (train.StopFlag, "agreed"), (ep, "global_grad_norm"), (ema.EMA, "update"),
                        (metrics.MetricsLogger, "add"), (metrics.MetricsLogger, "step"),
                        (data.SyntheticSource, "next_batch"), (data.ShardSource, "next_batch"),
                        (flow.RectifiedFlow, "training_losses"), (ddpm.GaussianDiffusion, "training_losses"),
                        (engine.DeepSpeedEngine, "backward"), (engine.DeepSpeedEngine, "step"),
                        (engine.DeepSpeedEngine, "forward")]:
        setattr(owner, attr, _timed(getattr(owner, attr), f"{owner.__name__.rsplit('.', 1)[-1]}.{attr}"))


if "promoe_ds.cli" in sys.orig_argv and "train" in sys.orig_argv:
    _install()


@atexit.register
def _dump():
    out = os.environ.get("HOSTPROBE_DIR")
    if out and _events:
        with open(os.path.join(out, f"host_{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.orig_argv, "events": _events}, f)
