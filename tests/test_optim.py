"""The Muon/AdamW optimizer: the orthogonalization, the AdamW half against
torch's own AdamW, the Muon step's size, checkpoints and the groups the model
builds."""

from __future__ import annotations

import copy

import pytest
import torch

from services.trainer.model import MaskedLM, ModelConfig
from services.trainer.optim import MuonAdamW, orthogonalize


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 64), (3, 24, 8)])
def test_orthogonalize_evens_out_the_singular_values(shape) -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    g[..., 0, :] *= 100.0  # one dominant direction: plain momentum would follow it alone
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    before, singular = torch.linalg.svdvals(g), torch.linalg.svdvals(out)
    assert (before.max(-1).values / before.median(-1).values > 20).all()
    # After: no direction dominates. (Five iterations lift all but the very
    # smallest singular values, which is all Muon relies on.)
    assert singular.max() < 1.3 and (singular.median(-1).values > 0.6).all(), singular
    # The directions are the gradient's: U V^T has a positive inner product with g.
    assert (out * g).sum() > 0


def test_the_adamw_groups_step_exactly_as_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(1)
    ours_p = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)]
    ref_p = [p.clone() for p in ours_p]
    ours = MuonAdamW(
        [{"params": [ours_p[0]], "kind": "adamw", "weight_decay": 0.1, "lr": 3e-3},
         {"params": [ours_p[1]], "kind": "adamw", "weight_decay": 0.0, "lr": 3e-3}],
        betas=(0.9, 0.99),
    )  # fmt: skip
    ref = torch.optim.AdamW(
        [{"params": [ref_p[0]], "weight_decay": 0.1}, {"params": [ref_p[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.99),
    )
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen) for p in ours_p]
        for p, q, g in zip(ours_p, ref_p, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_muon_step_has_the_rate_as_its_spectral_norm() -> None:
    gen = torch.Generator().manual_seed(2)
    wide, tall = torch.zeros(16, 32), torch.zeros(64, 16)
    optimizer = MuonAdamW(
        [{"params": [wide, tall], "kind": "muon", "lr": 0.02, "momentum": 0.0}], betas=(0.9, 0.99)
    )
    wide.grad, tall.grad = torch.randn(16, 32, generator=gen), torch.randn(64, 16, generator=gen)
    optimizer.step()
    # The step descends (against the gradient) by about lr in spectral norm,
    # times sqrt(rows / cols) for a tall matrix.
    for p, scale in ((wide, 1.0), (tall, 2.0)):
        assert (p * p.grad).sum() < 0
        norm = torch.linalg.matrix_norm(p, ord=2).item()
        assert 0.6 * 0.02 * scale < norm < 1.3 * 0.02 * scale


def test_groups_are_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([{"params": [torch.zeros(2, 2)]}], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.zeros(4)], "kind": "muon"}], betas=(0.9, 0.99))


def tiny() -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(
        ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    )


def test_the_model_gives_muon_the_blocks_matrices_only() -> None:
    model = tiny()
    optimizer = model.configure_optimizer(0.1, 2e-3, (0.9, 0.99), "cpu", muon_learning_rate=0.02)
    muon, matrices, small = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert muon["kind"] == "muon" and muon["lr_scale"] == pytest.approx(10.0)
    assert muon["weight_decay"] == 0.0
    assert {names[id(p)] for p in muon["params"]} == {
        name for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2
    }
    assert [names[id(p)] for p in matrices["params"]] == ["token_embedding.weight"]  # tied head
    assert matrices["weight_decay"] == 0.1 and small["weight_decay"] == 0.0
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(names)  # every parameter once


def test_state_survives_a_round_trip_and_steps_alike() -> None:
    def run(optimizer: MuonAdamW, model: MaskedLM, steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randint(0, 11, (4, 8), generator=gen)
            _, loss = model(x, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    first = tiny()
    opt1 = first.configure_optimizer(0.1, 2e-3, (0.9, 0.99), "cpu", muon_learning_rate=0.02)
    run(opt1, first, 3, seed=0)
    second = tiny()
    second.load_state_dict(first.state_dict())
    opt2 = second.configure_optimizer(0.1, 2e-3, (0.9, 0.99), "cpu", muon_learning_rate=0.02)
    # As a checkpoint holds it: a copy (state_dict() hands out the live buffers).
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    run(opt1, first, 3, seed=1)
    run(opt2, second, 3, seed=1)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_muon_trains_the_model() -> None:
    model = tiny()
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99), "cpu", muon_learning_rate=0.02)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 10, (8, 8), generator=gen)
    inputs = torch.where(torch.rand(8, 8, generator=gen) < 0.5, 10, x)
    losses = []
    for _ in range(60):
        _, loss = model(inputs, x)
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
