"""Pipeline schedules as plain lists of actions, one list per rank.

A schedule says, for one pipeline rank, in which order it runs the forward (F) and backward
(B) passes of each micro-batch on each of its model chunks. Building it is pure arithmetic, so
it can be printed, tested against the textbook, and simulated, apart from the code that runs it
(`pipeline.py`).

1F1B (non-interleaved), rank r of p, m micro-batches:
  warm-up    min(p - r - 1, m) forwards, filling the pipeline below this rank;
  steady     m - warm-up pairs "F(next), B(oldest)": one forward, one backward;
  cool-down  the remaining backwards.
Interleaved 1F1B gives each rank v model chunks (virtual stages r, r + p, r + 2p, ...);
micro-batches go through the chunks in groups of p, which shrinks the bubble by a factor v.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwen2.config import check_microbatches


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    microbatch: int
    chunk: int  # model chunk on this rank, 0 .. vpp - 1

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def one_f_one_b(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    """The 1F1B schedule of `rank` (one model chunk per rank)."""
    m = num_microbatches
    warmup = min(pp - rank - 1, m)
    actions = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        actions += [Action("F", warmup + i, 0), Action("B", i, 0)]
    actions += [Action("B", i, 0) for i in range(m - warmup, m)]  # cool-down
    return actions


def interleaved_one_f_one_b(pp: int, vpp: int, rank: int, num_microbatches: int) -> list[Action]:
    """Interleaved 1F1B of `rank` with `vpp` model chunks (Megatron's order)."""
    m = num_microbatches
    check_microbatches(pp, vpp, m)
    total = m * vpp
    group = pp * vpp

    def forward(k: int) -> Action:  # k-th forward of this rank
        return Action("F", (k // group) * pp + k % pp, (k % group) // pp)

    def backward(k: int) -> Action:  # k-th backward: chunks in reverse order
        return Action("B", (k // group) * pp + k % pp, vpp - 1 - (k % group) // pp)

    warmup = total if m == pp else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    actions = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        actions += [forward(warmup + i), backward(i)]
    actions += [backward(k) for k in range(total - warmup, total)]
    return actions


def build_schedule(pp: int, vpp: int, rank: int, num_microbatches: int) -> list[Action]:
    if vpp == 1:
        return one_f_one_b(pp, rank, num_microbatches)
    return interleaved_one_f_one_b(pp, vpp, rank, num_microbatches)


def simulate(pp: int, vpp: int, num_microbatches: int, forward_time: float = 1.0,
             backward_time: float = 2.0) -> dict:
    """Run every rank's schedule on a clock, respecting stage dependencies.

    Returns the makespan, the bubble fraction (idle share of rank time) and the start time
    of every action. Raises RuntimeError when the schedules would deadlock.
    """
    schedules = [build_schedule(pp, vpp, r, num_microbatches) for r in range(pp)]
    last_stage = pp * vpp - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, microbatch, virtual stage) -> finish time
    position, clock = [0] * pp, [0.0] * pp
    starts: dict[tuple[int, Action], float] = {}
    remaining = sum(len(s) for s in schedules)
    while remaining:
        progressed = False
        for r in range(pp):
            if position[r] == len(schedules[r]):
                continue
            a = schedules[r][position[r]]
            stage = a.chunk * pp + r
            if a.kind == "F":
                deps = [("F", a.microbatch, stage - 1)] if stage > 0 else []
            else:
                deps = [("F", a.microbatch, stage)]
                if stage < last_stage:
                    deps.append(("B", a.microbatch, stage + 1))
            if any(d not in done for d in deps):
                continue
            start = max([clock[r]] + [done[d] for d in deps])
            clock[r] = start + (forward_time if a.kind == "F" else backward_time)
            done[(a.kind, a.microbatch, stage)] = clock[r]
            starts[(r, a)] = start
            position[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = {r: schedules[r][position[r]] for r in range(pp) if position[r] < len(schedules[r])}
            raise RuntimeError(f"pipeline schedule deadlocks: ranks wait on {stuck}")
    makespan = max(clock)
    busy = num_microbatches * vpp * (forward_time + backward_time)
    return {"makespan": makespan, "bubble_fraction": 1 - busy / makespan, "starts": starts}


def textbook_bubble_fraction(pp: int, vpp: int, num_microbatches: int) -> float:
    """Idle share of a rank's time: (p - 1) / (v m + p - 1) (Narayanan et al. 2021)."""
    return (pp - 1) / (vpp * num_microbatches + pp - 1)
