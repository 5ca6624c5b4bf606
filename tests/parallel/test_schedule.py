"""Pipeline schedules: the textbook order per rank, no deadlock, the bubble, and p2p message order."""

import pytest

from megatron_qwen2.config import ModelConfig, ParallelConfig, check_microbatches
from megatron_qwen2.engine.pipeline import stage_layers
from megatron_qwen2.engine.schedule import (build_schedule, interleaved_one_f_one_b,
                                              one_f_one_b, simulate, textbook_bubble_fraction)


def names(actions):
    return " ".join(map(repr, actions))


def test_one_f_one_b_matches_the_textbook():
    # pp 4, 8 micro-batches: rank r warms up with 3 - r forwards, alternates, then drains.
    assert names(one_f_one_b(4, 0, 8)) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    assert names(one_f_one_b(4, 2, 8)) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"
    assert names(one_f_one_b(4, 3, 8)) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"
    assert names(one_f_one_b(4, 0, 2)) == "F0 F1 B0 B1"  # fewer micro-batches than stages


def test_interleaved_order():
    # pp 2, 2 chunks, 4 micro-batches ("F1.1": forward of micro-batch 1 on chunk 1).
    assert names(interleaved_one_f_one_b(2, 2, 0, 4)) == \
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    assert names(interleaved_one_f_one_b(2, 2, 1, 4)) == \
        "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3"


GRID = [(pp, vpp, m) for pp in (2, 3, 4) for vpp in (1, 2, 3) for m in (pp, 2 * pp, 4 * pp) if vpp == 1 or m % pp == 0]


@pytest.mark.parametrize("pp,vpp,m", GRID + [(4, 1, 3), (4, 1, 5)])
def test_every_micro_batch_runs_once_without_deadlock_and_bubble_is_textbook(pp, vpp, m):
    for r in range(pp):
        actions = build_schedule(pp, vpp, r, m)
        expected = {(k, i, c) for k in "FB" for i in range(m) for c in range(vpp)}
        assert {(a.kind, a.microbatch, a.chunk) for a in actions} == expected and len(actions) == len(expected)
        for a in actions:  # a backward comes after its own forward on the same rank
            assert actions.index(a) > actions.index(type(a)("F", a.microbatch, a.chunk)) or a.kind == "F"
    result = simulate(pp, vpp, m)
    if m >= pp:
        assert result["bubble_fraction"] == pytest.approx(textbook_bubble_fraction(pp, vpp, m))
    print(f"pp={pp} vpp={vpp} m={m}: bubble {result['bubble_fraction']:.3f} "
          f"(textbook {textbook_bubble_fraction(pp, vpp, m):.3f})")


@pytest.mark.parametrize("pp,vpp,m", GRID)
def test_messages_between_two_ranks_arrive_in_the_order_they_are_awaited(pp, vpp, m):
    # NCCL matches point-to-point messages between a pair of ranks by order alone: what rank r
    # sends to rank q must come in the order in which q's actions consume it.
    last = pp * vpp - 1
    sent = {}
    consumed = {}
    for r in range(pp):
        for a in build_schedule(pp, vpp, r, m):
            stage = a.chunk * pp + r
            if a.kind == "F" and stage < last:
                sent.setdefault((r, (r + 1) % pp), []).append(("act", a.microbatch, stage + 1))
            if a.kind == "B" and stage > 0:
                sent.setdefault((r, (r - 1) % pp), []).append(("grad", a.microbatch, stage - 1))
            if a.kind == "F" and stage > 0:
                consumed.setdefault(((r - 1) % pp, r), []).append(("act", a.microbatch, stage))
            if a.kind == "B" and stage < last:
                consumed.setdefault(((r + 1) % pp, r), []).append(("grad", a.microbatch, stage))
    assert sent == consumed


def test_interleaving_needs_micro_batches_in_multiples_of_pp():
    with pytest.raises(ValueError, match=r"multiple of parallel.pp=4"):
        check_microbatches(4, 2, 6)
    check_microbatches(4, 1, 6)


def test_stage_layout_and_its_errors():
    cfg = ModelConfig(hidden_size=32, num_layers=6, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      vocab_size=64)
    assert stage_layers(cfg, ParallelConfig(pp=3)) == [[0, 1], [2, 3], [4, 5]]
    assert stage_layers(cfg, ParallelConfig(pp=2, pp_layout=[4, 2])) == [[0, 1, 2, 3], [4, 5]]
    assert stage_layers(cfg, ParallelConfig(pp=2, vpp=2, pp_layout=[0, 2, 2, 2]))[0] == []
    with pytest.raises(ValueError, match=r"model.num_layers=6 is not divisible by pp\*vpp=4\*1"):
        stage_layers(cfg, ParallelConfig(pp=4))
    with pytest.raises(ValueError, match=r"parallel.pp_layout=\[4, 1\] must give 2 non-negative layer counts"):
        stage_layers(cfg, ParallelConfig(pp=2, pp_layout=[4, 1]))
