"""Expert parallelism: the token dispatcher against one process on hand-made uneven routing
(experts and ranks that receive nothing, capacity drops), and training with ep on top of dp, tp
and pp against one process: same losses, grad norms and updated weights."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.moe import Experts, MoEBlock, z_loss_term
from megatron_qwen2 import ops
from megatron_qwen2.parallel.expert_dispatch import TokenDispatcher, capacity_mask, expert_capacity, gather_ep_full
from megatron_qwen2.parallel.topology import Topology
from tests.distributed import run_distributed
from megatron_qwen2.train import train
from tests.parallel.test_train_equivalence import MODELS, _worker, make_config, read_run

E, K, H, F = 8, 2, 6, 4


def _routing(rank: int) -> torch.Tensor:
    """Expert ids [T, K] of each rank: uneven, experts 6 and 7 receive nothing from anyone, rank 3
    sends nothing to ep rank 1 (experts 2, 3) and only rank 0 sends to expert 5."""
    table = {
        0: [[0, 5], [1, 0], [4, 2], [0, 1], [3, 0]],
        1: [[0, 1], [1, 0], [4, 3], [3, 4]],
        2: [[4, 0], [2, 4], [0, 1], [1, 4], [4, 2], [0, 4]],
        3: [[1, 0], [0, 4], [4, 1]],
    }
    return torch.tensor(table[rank])


def _inputs(rank: int):
    ids = _routing(rank)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ids.shape[0], H, generator=g, dtype=torch.float64)
    probs = torch.rand(ids.shape, generator=g, dtype=torch.float64)
    return x, probs, ids


def _moe_forward(x, probs, ids, dispatcher, experts, capacity=None):
    keep = None if capacity is None else capacity_mask(ids, probs, E, expert_capacity(x.shape[0], K, E, capacity))
    rows, counts, state = dispatcher.dispatch(x, probs, ids, keep)
    return dispatcher.combine(experts(rows, counts), state), state.dropped


def _make_experts(cfg, topo):
    experts = Experts(cfg, topo).double()
    g = torch.Generator().manual_seed(7)
    full = [torch.randn((E,) + tuple(p.shape[1:]), generator=g, dtype=torch.float64) for p in experts.parameters()]
    per = E // topo.ep
    with torch.no_grad():
        for p, f in zip(experts.parameters(), full):
            p.copy_(f[topo.ep_rank * per:(topo.ep_rank + 1) * per])
    return experts


CAPACITIES = (None, 0.75)  # dropless, and dropping past 0.75 x the even share


def _dispatch_worker(rank, world):
    from megatron_qwen2.config import ParallelConfig

    cfg = ModelConfig(hidden_size=H, num_experts=E, moe_top_k=K, moe_ffn_hidden_size=F)
    topo = Topology.build(ParallelConfig(ep=world), world, rank)
    results = []
    for capacity in CAPACITIES:
        experts = _make_experts(cfg, topo)
        x, probs, ids = _inputs(rank)
        x.requires_grad_()
        probs.requires_grad_()
        out, _ = _moe_forward(x, probs, ids, TokenDispatcher(E, topo.groups.ep.pg), experts, capacity)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [gather_ep_full(p, p.grad, topo.groups.ep.pg) for p in experts.parameters()]
        results.append((out.detach(), x.grad, probs.grad, grads))
    return results


def test_dispatcher_matches_one_process():
    """ep=4 over 4 ranks vs each rank's tokens run through all experts in one process (fp64)."""
    per_rank = run_distributed(_dispatch_worker, 4)
    cfg = ModelConfig(hidden_size=H, num_experts=E, moe_top_k=K, moe_ffn_hidden_size=F)
    for c, capacity in enumerate(CAPACITIES):
        results = [r[c] for r in per_rank]
        experts = _make_experts(cfg, Topology.single())
        dispatcher = TokenDispatcher(E, None)
        for rank, (out, dx, dprobs, _) in enumerate(results):
            x, probs, ids = _inputs(rank)
            x.requires_grad_()
            probs.requires_grad_()
            ref, dropped = _moe_forward(x, probs, ids, dispatcher, experts, capacity)
            (ref * torch.arange(ref.numel(), dtype=ref.dtype).view_as(ref)).sum().backward()
            torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dprobs, probs.grad, rtol=1e-12, atol=1e-12)
            if capacity is not None:
                assert dropped > 0 or rank == 1  # the limit bites on most ranks
        for got, want in zip(results[0][3], [p.grad for p in experts.parameters()]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            assert torch.equal(got[6:], torch.zeros_like(got[6:]))  # experts 6, 7 saw no token


def test_permutation_contract():
    """What the dispatcher relies on from ops.permute / ops.unpermute: rows grouped by expert in
    token order, counts per expert (zeros included), the weighted inverse, and their gradients."""
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    x = torch.arange(3.0).unsqueeze(-1).expand(3, 2)
    rows, row_map, counts = ops.permute(x, ids, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert rows[:, 0].tolist() == [0, 1, 1, 2, 0, 2]
    probs = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(ops.unpermute(rows, row_map, probs), x * probs.sum(-1, keepdim=True))
    xd = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    pd = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: ops.unpermute(ops.permute(a, ids, 4)[0] ** 2, row_map, p), (xd, pd))


def test_capacity_keeps_highest_probabilities():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    probs = torch.tensor([[0.1, 0.2], [0.9, 0.3], [0.5, 0.1], [0.4, 0.2]])
    keep = capacity_mask(ids, probs, 3, capacity=2)
    # expert 0 gets 4 copies (0.1, 0.9, 0.5, 0.2): keeps 0.9 and 0.5; expert 1 keeps 0.4 and 0.3.
    assert keep.tolist() == [[False, False], [True, True], [True, True], [True, False]]


def test_z_loss_gradient_matches_explicit_loss():
    """The z-loss term of the objective has the gradient of coef * scale * mean(lse^2)."""
    cfg = ModelConfig(hidden_size=8, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=4,
                      shared_expert_ffn_hidden_size=0, moe_z_loss_coef=0.1)
    torch.manual_seed(0)
    block = MoEBlock(cfg, Topology.single()).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(5, 1, 8, dtype=torch.float64)
    out, stats = block(x)
    (out.sum() + z_loss_term({0: stats}, cfg.moe_z_loss_coef, 0.25)).backward()
    got = block.router.weight.grad.clone()
    block.zero_grad()
    block.z_loss_coef = 0.0
    out, _ = block(x)
    logits = x.reshape(-1, 8) @ block.router.weight.t()
    (out.sum() + 0.1 * 0.25 * torch.logsumexp(logits, -1).square().mean()).backward()
    torch.testing.assert_close(got, block.router.weight.grad)


# --- training equivalence (the harness of test_train_equivalence) ---

# Eight experts, top-2, 16 tokens a micro-batch: most micro-batches leave some expert empty; the
# z-loss is on so that its gradient path is compared too.
MODELS["moe_ep"] = dict(MODELS["moe"], num_experts=8, moe_z_loss_coef=1e-2)
MODELS["moe_ep_cap"] = dict(MODELS["moe_ep"], moe_capacity_factor=0.75)
MODELS["moe4_ep"] = dict(MODELS["moe4"], num_experts=8)

EP_CASES = [
    # (model, tied, world size, parallel config)
    ("moe_ep", False, 2, dict(ep=2, distributed_optimizer=True)),  # ep = dp: expert-dp of size 1
    ("moe_ep", True, 4, dict(tp=2, ep=2, sequence_parallel=True)),  # ep folded over tp + sp, expert-dp over dp
    # Parallel folding (parallel/topology.py): the expert grid over the attention ranks.
    ("moe_ep", False, 4, dict(tp=2, ep=4, sequence_parallel=False)),  # ep 4 over tp 2 x dp 2, tokens replicated over tp
    # etp 2 over the tp pair (tokens replicated over tp), ep 2 over dp, dropping, sharded optimizer
    ("moe_ep_cap", False, 4, dict(tp=2, ep=2, etp=2, sequence_parallel=False, distributed_optimizer=True)),
    ("moe4_ep", True, 4, dict(tp=2, pp=2, ep=2)),  # each stage's ep 2 over its tp pair
    ("moe_ep", False, 4, dict(cp=2, ep=4, distributed_optimizer=True)),  # ep 4 over cp 2 x dp 2
    ("moe_ep_cap", False, 4, dict(ep=2, distributed_optimizer=True)),  # expert-dp 2 (sharded), dropping
    ("moe4_ep", True, 4, dict(ep=4, overlap_grad_reduce=False)),
    ("moe4_ep", False, 4, dict(pp=2, ep=2, pp_layout=[1, 3])),  # a stage whose only layer is dense
]


def _case_id(case):
    model, tied, world, par = case
    return f"{model}-w{world}-" + "-".join(f"{k}={v}" for k, v in par.items())


# Adam's eps is raised from 1e-8 so that elements whose gradient is ~1e-8 (the k bias, whose
# gradient is zero in exact arithmetic, and a few others) do not turn fp32 summation-order noise
# into lr-sized steps: the comparison then measures the parallel code, not Adam's conditioning.
ADAM_EPS = 1e-6


def _config(model_name, tied, tmp_root, **parallel):
    cfg = make_config(MODELS[model_name], tied, str(tmp_root / "cache"), **parallel)
    cfg.optim.eps = ADAM_EPS
    return cfg


_reference: dict = {}


def _reference_run(model_name, tied, tmp_root):
    if (model_name, tied) not in _reference:
        run_dir = tmp_root / f"ref-{model_name}-{tied}"
        run_dir.mkdir()
        train(_config(model_name, tied, tmp_root).validate(1), run_dir)
        _reference[(model_name, tied)] = read_run(run_dir)
    return _reference[(model_name, tied)]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("expert_parallel")


@pytest.mark.parametrize("case", EP_CASES, ids=[_case_id(c) for c in EP_CASES])
def test_expert_parallel_training_matches_single_process(case, tmp_root):
    model_name, tied, world, parallel = case
    ref_rows, ref_state = _reference_run(model_name, tied, tmp_root)
    run_dir = tmp_root / _case_id(case)
    run_dir.mkdir()
    cfg = _config(model_name, tied, tmp_root, **parallel)
    run_distributed(_worker, world, cfg, run_dir)
    rows, state = read_run(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for r, ref in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), r["step"]
        assert r["aux_loss"] == pytest.approx(ref["aux_loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), r["step"]
        if parallel.get("pp", 1) == 1:  # with pp, rank 0 logs the load of its own stage only
            assert r["moe_load"] == ref["moe_load"], r["step"]
    assert state.keys() == ref_state.keys()
    for name in ref_state:  # weights: within 1e-5 of each tensor's norm, and elementwise
        rel = torch.linalg.norm(state[name] - ref_state[name]) / torch.linalg.norm(ref_state[name])
        assert rel <= 1e-5, (name, rel.item())
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-4, atol=1e-6, msg=name)
