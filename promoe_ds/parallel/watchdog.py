"""Bounded hangs (``train.collective_timeout``): a rank that stops answering ends every other rank.

A collective waits for every rank of its group: one rank stopped (SIGSTOP, a frozen node), dead or hung leaves
the others waiting in it, and the job would never end, so Slurm would never requeue it. The trainer marks what
it is doing (``mark``: each step phase, a checkpoint); a daemon thread ends the process once one mark is older
than the timeout, with one line naming the step and what the rank was waiting in, and exit status
``HUNG_EXIT`` (98), which slurm/train.sbatch requeues. The line is also written to ``<out_dir>/hang.txt``: srun
reports the highest exit status of its tasks, which can be that of the frozen rank once it is killed, so
the template reads the file too. The last complete checkpoint stays the resume point: a tag is complete only
once every rank has written its part (checkpoint.py).

Why a thread of our own and not the process group's timeout alone: on NCCL the host does not wait inside a
collective (its kernels are queued; the host waits at the step's next synchronisation) and NCCL's watchdog
aborts the process without naming the step; gloo raises from inside the collective with its own traceback.
The thread sees the same wait on both, within one step. The process groups (DeepSpeed's expert groups
included, which torch would give its own 10 or 30 minute default) get the timeout plus ``GRACE`` seconds, a
backstop should the thread not run. A collective that fails at once instead (gloo: the connection to a
killed rank closes) is reported the same way by ``exit_if_peer_lost``.

Start-up (building the model, DeepSpeed's one-time op build, loading a checkpoint) is local work of any length,
so the thread starts watching at the first mark; a start-up collective that waits for a lost rank is ended by
the process group's timeout (gloo: reported by ``exit_if_peer_lost``; NCCL: its watchdog aborts the process).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

HUNG_EXIT = 98
GRACE = 60.0

# what a rank waits for (on another rank, or on the device's queue) in each activity the trainer marks
WAITS = {
    "start-up": "start-up (process groups, engine set-up, checkpoint load)",
    "data": "reading data",
    "forward": "the forward (expert all-to-all, routing statistics, loss check)",
    "backward": "the backward (gradient reduction, expert all-to-all)",
    "optimizer": "the optimizer step (gradient norm, ZeRO all-gather, the device's queued collectives)",
    "ema": "the EMA update",
    "bookkeeping": "the stop-signal all-reduce",
    "checkpoint": "writing a checkpoint (gathers and barriers)",
    "finish": "the final barrier",
}
# a collective that failed because a peer went away (gloo's transport errors, NCCL's abort), not a bug
PEER_LOST = re.compile(r"Timed out waiting|Connection (reset|closed) by peer|gloo/transport|communicator was "
                       r"aborted|NCCL error|Watchdog caught collective operation timeout")


HANG_NOTE = "hang.txt"


class Watchdog:
    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.step, self.activity = 0, "start-up"
        self.since: float | None = None  # unwatched until the first mark (start-up)
        self.note: Path | None = None  # where the line is also written (the run directory's HANG_NOTE)

    def mark(self, activity: str, step: int | None = None) -> None:
        """The main thread starts ``activity`` (a key of WAITS), at ``step`` if given."""
        self.activity, self.since = activity, time.monotonic()
        if step is not None:
            self.step = step

    def line(self, what: str) -> str:
        return (f"error: rank {self.rank}: step {self.step}: {what} in {WAITS[self.activity]}: exit {HUNG_EXIT} "
                "(the Slurm template requeues; the run resumes from its last complete checkpoint)")

    def fire(self, what: str) -> None:
        """The line on stderr and in the note, then exit HUNG_EXIT at once: the main thread is stuck in (or failed
        out of) a collective with a lost rank, a clean shutdown would wait for it. The note is written by a thread
        given 10 s: a hung file system must not keep the process alive."""
        line = self.line(what)
        print(line, file=sys.stderr, flush=True)
        if self.note is not None:
            writer = threading.Thread(target=self.note.write_text, args=(line + "\n",), daemon=True)
            writer.start()
            writer.join(10)
        os._exit(HUNG_EXIT)

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.timeout / 10))
            since = self.since
            waited = 0.0 if since is None else time.monotonic() - since
            if waited > self.timeout:
                self.fire(f"waited {waited:.0f} s (train.collective_timeout={self.timeout:g} s) for another rank "
                          "(stopped, dead or hung)")


_active: Watchdog | None = None


def start(timeout: float, rank: int, world_size: int) -> timedelta:
    """Watch this process (several ranks only: a world of one waits for nobody). Returns the process groups'
    timeout, ``GRACE`` s after the watchdog's; groups made from here on (DeepSpeed's) get it too."""
    global _active
    from torch.distributed import distributed_c10d as c10d

    backstop = timedelta(seconds=timeout + GRACE)
    c10d.default_pg_timeout = backstop  # torch's default for new groups, read at each new_group
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = backstop
    if world_size > 1:
        _active = Watchdog(timeout, rank)
        threading.Thread(target=_active._watch, name="promoe-watchdog", daemon=True).start()
    return backstop


def note_to(out_dir: Path) -> None:
    """Write the line also to ``out_dir / HANG_NOTE`` (the Slurm template's requeue decision)."""
    if _active is not None:
        _active.note = Path(out_dir) / HANG_NOTE


def mark(activity: str, step: int | None = None) -> None:
    if _active is not None:
        _active.mark(activity, step)


def exit_if_peer_lost(e: BaseException) -> None:
    """A collective that failed because another rank went away: the watchdog's line (waited: so far), exit
    HUNG_EXIT at once (a clean shutdown would wait for the lost rank). Anything else: return (re-raise it)."""
    if _active is not None and isinstance(e, RuntimeError) and PEER_LOST.search(str(e)):
        _active.fire(f"lost another rank ({str(e).strip().splitlines()[0][:160]})")
