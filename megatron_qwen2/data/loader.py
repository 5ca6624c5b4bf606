"""This data-parallel rank's rows of each global batch, read on a background thread ahead of the step.

Global batch i is samples i*gbs ... (i+1)*gbs - 1 of the dataset, the same in every layout
(sampler.py); dp rank r trains on its rows [r*gbs/dp, (r+1)*gbs/dp) and reads only those
(`SampleDataset.local_batch`). The tp, cp and pp ranks of one dp rank read the same rows.

`BatchPrefetcher` reads the rows of the coming steps on one thread, at most `depth` steps
ahead, while the training thread runs the current step; the training thread takes them in step
order with `get(step)`, which re-raises a read that failed on the thread (say the DataError of a
corrupt chunk) as it was raised. Since no other dp rank reads those rows, `read_on_every_rank`
makes every rank of the dp group stop alike: one all-reduce of a failure flag per read, and only
when it is set an exchange of the messages.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_qwen2.data.batch import Batch
from megatron_qwen2.data.sampler import SampleDataset
from megatron_qwen2.errors import DataError

_PUT_POLL_S = 0.05  # how often a worker waiting on a full queue checks whether it should stop


class BatchPrefetcher:
    """dp rank `dp_rank`'s rows of global batches `steps` (a range), read ahead by a daemon thread.

    The thread reads step after step, in order, and holds at most `depth` read batches; each is
    `dataset.local_batch(step, global_batch_size, dp_rank, dp)`, so the batches are those of the
    synchronous read whatever the timing. The first failed read ends the thread. `close()` (also
    at the end of a loop over `steps_then_close()`, or of a `with` block) stops it and waits for it.
    """

    def __init__(self, dataset: SampleDataset, global_batch_size: int, dp_rank: int, dp: int, steps: range,
                 depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if steps.step != 1:
            raise ValueError(f"steps must be consecutive, got {steps}")
        self.dataset, self.global_batch_size, self.dp_rank, self.dp = dataset, global_batch_size, dp_rank, dp
        self.steps = steps
        self.next_step = steps.start  # the step `get` hands out next
        self._ready: queue.Queue = queue.Queue(maxsize=depth)  # (step, batch or None, error or None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, name=f"batch-prefetch-dp{dp_rank}", daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        for step in self.steps:
            try:
                item = (step, self.dataset.local_batch(step, self.global_batch_size, self.dp_rank, self.dp), None)
            except BaseException as error:  # noqa: BLE001 - raised again on the training thread by get()
                item = (step, None, error)
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=_PUT_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> Batch:
        """The rows of global batch `step` (the next one in order), waiting for the thread if needed."""
        if step != self.next_step or step not in self.steps:
            raise ValueError(f"batches come in the order of {self.steps}: asked for step {step}, the next is "
                             f"{self.next_step}")
        if self._stop.is_set():
            raise RuntimeError("the batch prefetcher was closed")
        read_step, batch, error = self._ready.get()
        self.next_step += 1
        assert read_step == step, (read_step, step)
        if error is not None:
            raise error
        return batch

    def steps_then_close(self) -> Iterator[int]:
        """The steps, in order, for the training loop to run over; the thread stops when that loop ends,
        however it ends (its last step, a return, an exception)."""
        try:
            yield from self.steps
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the read in progress) and wait for it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_on_every_rank(read: Callable[[], Batch], dp_group: Optional[dist.ProcessGroup],
                       device: torch.device) -> Batch:
    """read() on this rank; when it raises on any rank of the data-parallel group, it raises on all.

    A failing rank raises its own error. The others raise the error of the lowest failing dp rank:
    a DataError with its message (the exit code is the same), any other error as a RuntimeError
    naming that rank. dp_group None (dp 1): read() alone. Every rank of the group calls it at the
    same point; the flag lives on `device` (NCCL reduces device tensors).
    """
    try:
        batch, error = read(), None
    except Exception as e:  # noqa: BLE001 - shared with the group below, then raised
        batch, error = None, e
    if dp_group is not None:
        failed = torch.tensor([int(error is not None)], dtype=torch.int64, device=device)
        dist.all_reduce(failed, group=dp_group)
        if failed.item() > 0:
            reports: list = [None] * dist.get_world_size(dp_group)
            mine = None if error is None else (isinstance(error, DataError), _one_line(error))
            dist.all_gather_object(reports, mine, group=dp_group)
            if error is None:
                dp_rank, (is_data_error, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
                if is_data_error:
                    raise DataError(message)
                raise RuntimeError(f"data-parallel rank {dp_rank} failed to read its rows: {message}")
    if error is not None:
        raise error
    return batch


def _one_line(error: BaseException) -> str:
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
