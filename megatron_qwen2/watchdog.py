"""The hang watchdog: a thread per rank that ends the process when training stops making progress.

    watchdog = HangWatchdog(run_dir, rank, timeout_s=cfg.train.hang_timeout_min * 60)
    for step in watchdog.watch(range(start_step, steps)):
        ...  # one optimizer step, its logging and its checkpoint

Asking for the next step reports the previous one complete. When no step completes within
`timeout_s` (the first step of the process: FIRST_STEP_FACTOR x `timeout_s`, because it also holds
compilation, communicator set-up and allocator warm-up; the resume load before the loop is not
watched), the thread of every rank, each on its own clock:

1. writes RUN_DIR/hang/rank_NNNNN.txt: one line saying what was waited for, then the Python stacks
   of all threads (faulthandler), the held frame included;
2. on rank 0, writes RUN_DIR/outcome.json with exit code 76 (errors.EXIT_HANG, one of the codes
   slurm/launch.sh requeues) and prints one line naming the hang directory;
3. writes the flight recorder's record of recent collectives, where torch keeps one: the NCCL one
   to hang/nccl_trace_rank_R and the CPU (gloo) one to hang/fr_trace_rank_R (R: the rank; the
   pickles that `python -m torch.distributed.flight_recorder.fr_trace RUN_DIR/hang -p nccl_trace_rank_`
   reads). The recorder keeps entries only when TORCH_FR_BUFFER_SIZE (or TORCH_NCCL_TRACE_BUFFER_SIZE)
   is set before the process group starts; slurm/launch.sh sets it. Each dump gets
   FLIGHT_RECORDER_WAIT_S: a dump that blocks on a wedged communicator is abandoned, and a
   dump that fails is noted at the end of the rank's stacks file;
4. waits EXIT_GRACE_S, so that the other ranks, whose clocks started within moments of this one's
   (every step ends in collectives), fire too before this rank's exit breaks their collectives,
   then ends the process with os._exit(76): the main thread is stuck, so nothing else can unwind
   it. A main thread that leaves the loop meanwhile (a collective that failed because a peer
   left, a late step that finished) waits for that exit.

Time spent on a checkpoint save or an evaluation counts toward the step it follows, so
train.hang_timeout_min must exceed the longest save. Leaving the loop by any path (its end,
a return, an exception) disarms the thread. A timeout of 0 turns the watchdog off.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from megatron_qwen2.errors import EXIT_HANG
from megatron_qwen2.outcome import write_outcome

FIRST_STEP_FACTOR = 3  # the first step of a process may take this many times the timeout
FLIGHT_RECORDER_WAIT_S = 60.0  # the longest the exit waits for one flight-recorder dump
EXIT_GRACE_S = 10.0  # between writing the stacks and exiting, for the other ranks to fire too
HANG_DIR = "hang"


def collective_timeout_floor_min(hang_timeout_min: float) -> float:
    """The shortest process-group timeout that lets the watchdog act first: longer than the longest
    wait it allows (the first step's) plus its dumps and grace, so that a hung collective ends in
    stacks on disk and EXIT_HANG (requeued) rather than in the backend's abort. 0 with the watchdog off."""
    if hang_timeout_min <= 0:
        return 0.0
    firing_min = (EXIT_GRACE_S + 2 * FLIGHT_RECORDER_WAIT_S) / 60
    return FIRST_STEP_FACTOR * hang_timeout_min + firing_min + 1


def hang_file(run_dir: Path, rank: int) -> Path:
    """Where rank `rank` writes its stacks when the watchdog fires."""
    return Path(run_dir) / HANG_DIR / f"rank_{rank:05d}.txt"


def flight_recorder_dumps() -> dict[str, Callable[[], bytes]]:
    """The flight-recorder dumps this torch build offers, by file prefix (none without c10d)."""
    try:
        import torch.distributed as dist
        from torch._C import _distributed_c10d as c10d
    except ImportError:
        return {}
    dumps = {}
    nccl = getattr(c10d, "_dump_nccl_trace", None)  # CUDA builds only
    if nccl is not None and dist.is_initialized() and dist.get_backend() == "nccl":
        dumps["nccl_trace_rank_"] = nccl
    generic = getattr(c10d, "_dump_fr_trace", None)  # the recorder of the other backends (gloo)
    if generic is not None:
        dumps["fr_trace_rank_"] = generic
    return dumps


class HangWatchdog:
    """Ends this rank's process with EXIT_HANG when no step completes in time (see the module doc)."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float, exit_grace_s: float = EXIT_GRACE_S,
                 exit_process: Callable[[int], None] = os._exit):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.timeout_s = float(timeout_s)
        self.exit_grace_s = exit_grace_s
        self.exit_process = exit_process  # os._exit; tests pass a recorder
        self.completed_step: Optional[int] = None  # the last step reported complete (1-based)
        self.fired = False
        self._deadline = 0.0  # time.monotonic() by which the next step must complete
        self._allowed_s = 0.0  # the seconds that deadline allows
        self._waiting_for = ""  # what the deadline is for, in words
        self._disarm = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, steps: Iterable[int]) -> Iterator[int]:
        """Yield the 0-based step indices of `steps`, watching each; disarms when the loop ends."""
        if self.timeout_s <= 0:
            yield from steps
            return
        self._arm(first=True)
        try:
            for step in steps:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"hang-watchdog-rank{self.rank}",
                                                    daemon=True)
                    self._thread.start()
                yield step
                self.completed_step = step + 1
                self._arm(first=False)
        finally:
            self.stop()

    def stop(self) -> None:
        """Disarm; returns at once unless the watchdog is firing, which ends in its exit."""
        self._disarm.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _arm(self, first: bool) -> None:
        allowed = self.timeout_s * (FIRST_STEP_FACTOR if first else 1)
        if first:
            self._waiting_for = (f"the first step of this process ({FIRST_STEP_FACTOR} x "
                                 f"train.hang_timeout_min={self.timeout_s / 60:g})")
        else:
            self._waiting_for = f"step {self.completed_step + 1} (train.hang_timeout_min={self.timeout_s / 60:g})"
        self._deadline = time.monotonic() + allowed
        self._allowed_s = allowed

    def _run(self) -> None:
        poll = min(max(self.timeout_s / 20, 0.01), 5.0)
        while not self._disarm.wait(poll):
            if time.monotonic() > self._deadline:
                self._fire()
                return

    def _fire(self) -> None:
        self.fired = True
        hang_dir = self.run_dir / HANG_DIR
        stacks = hang_file(self.run_dir, self.rank)
        last = "none" if self.completed_step is None else str(self.completed_step)
        what = (f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}): no step completed within "
                f"{self._allowed_s:.0f}s waiting for {self._waiting_for}; last completed step: {last}")
        try:
            hang_dir.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w", encoding="utf-8") as f:
                f.write(what + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            print(f"hang watchdog: cannot write {stacks}: {e}", file=sys.stderr, flush=True)
        if self.rank == 0:
            message = (f"hang watchdog: {what}; Python stacks of every rank in {hang_dir}/rank_*.txt; "
                       f"exiting with code {EXIT_HANG} (requeued by slurm/launch.sh)")
            write_outcome(self.run_dir, EXIT_HANG, "hang", step=self.completed_step, message=message)
            print(f"error: {message}", file=sys.stderr, flush=True)
        for prefix, dump in flight_recorder_dumps().items():
            self._dump_bounded(dump, hang_dir / f"{prefix}{self.rank}", stacks)
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(self.exit_grace_s)
        self.exit_process(EXIT_HANG)

    @staticmethod
    def _dump_bounded(dump: Callable[[], bytes], path: Path, notes: Path) -> None:
        """Write dump() to path from a helper thread, waiting at most FLIGHT_RECORDER_WAIT_S;
        a failure is appended to `notes`."""
        def write() -> None:
            try:
                path.write_bytes(dump())
            except Exception as e:  # a failed dump must not stop the exit
                try:
                    with open(notes, "a", encoding="utf-8") as f:
                        f.write(f"\nflight recorder dump to {path.name} failed: {type(e).__name__}: {e}\n")
                except OSError:
                    pass

        helper = threading.Thread(target=write, name="hang-watchdog-dump", daemon=True)
        helper.start()
        helper.join(FLIGHT_RECORDER_WAIT_S)
        if helper.is_alive():
            try:
                with open(notes, "a", encoding="utf-8") as f:
                    f.write(f"\nflight recorder dump to {path.name} abandoned after {FLIGHT_RECORDER_WAIT_S:.0f}s\n")
            except OSError:
                pass
