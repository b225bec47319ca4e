"""The masked-LM Transformer: shapes, bidirectionality, rotary positions, the
masked loss, optimizer groups, checkpoints. Tiny configs, CPU, float32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.trainer.model import MaskedLM, ModelConfig, apply_rotary, rotary_tables
from shared.settings import SettingsError, TrainerConfig, load_settings

VOCAB, BLOCK, LAYERS, HEADS, WIDTH = 17, 16, 2, 2, 32
MASK_ID = VOCAB - 1  # stands in for the [MASK] token


def tiny_config(**overrides: object) -> ModelConfig:
    values = dict(
        vocab_size=VOCAB, block_size=BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, dropout=0.0
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides: object) -> MaskedLM:
    torch.manual_seed(seed)
    return MaskedLM(tiny_config(**overrides)).eval()


def masked_batch(seed: int = 0, batch: int = 4, ratio: float = 0.5) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, selected): selected positions carry MASK_ID in the input
    and the original token in the target; every other target is -100."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK_ID, (batch, BLOCK), generator=gen)
    selected = torch.rand(batch, BLOCK, generator=gen) < ratio
    inputs = torch.where(selected, MASK_ID, tokens)
    targets = torch.where(selected, tokens, -100)
    return inputs, targets, selected


def logits_of(model: MaskedLM, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ------------------------------------------------------------- structure


def test_config_from_settings() -> None:
    settings = load_settings(
        ["--n_layer=3", "--n_head=4", "--n_embd=64", "--dropout=0.2"], env={}, service=TrainerConfig
    )
    config = ModelConfig.from_settings(settings, vocab_size=65, block_size=128)
    assert config == ModelConfig(
        vocab_size=65, block_size=128, n_layer=3, n_head=4, n_embd=64, dropout=0.2
    )


@pytest.mark.parametrize(("n_head", "n_embd"), [(3, 32), (4, 36)])
def test_settings_reject_heads_rotary_cannot_use(n_head: int, n_embd: int) -> None:
    with pytest.raises(SettingsError, match=r"n_head|even"):
        load_settings([f"--n_head={n_head}", f"--n_embd={n_embd}"], env={}, service=TrainerConfig)


def test_shapes_and_sequences_shorter_than_block() -> None:
    model = tiny_model()
    for T in (BLOCK, 5):
        logits, loss = model(torch.randint(0, VOCAB, (3, T)))
        assert logits.shape == (3, T, VOCAB)
        assert logits.dtype == torch.float32
        assert loss is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, VOCAB, (1, BLOCK + 1)))


def test_head_is_tied_to_embedding() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()


def test_param_count_by_hand() -> None:
    C, V, L = WIDTH, VOCAB, LAYERS
    norm = 2 * C  # gain + bias
    attention = (C * 3 * C + 3 * C) + (C * C + C)
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)
    per_block = 2 * norm + attention + mlp
    embedding = V * C  # shared with the head, counted once
    model = tiny_model()
    assert per_block == 12_704
    assert model.num_params(non_embedding=True) == L * per_block + norm == 25_472
    assert model.num_params(non_embedding=False) == 25_472 + embedding == 26_016


def test_flops_and_mfu_follow_the_documented_formula() -> None:
    model = tiny_model()
    N = 26_016
    assert model.flops_per_token() == 6 * N + 12 * LAYERS * WIDTH * BLOCK
    assert model.flops_per_token(seq_len=8) == 6 * N + 12 * LAYERS * WIDTH * 8
    tokens_per_s, peak = 1e6, 1e12
    mfu = model.estimate_mfu(tokens_per_s, peak)
    assert mfu == pytest.approx(tokens_per_s * model.flops_per_token() / peak)
    assert model.estimate_mfu(2 * tokens_per_s, peak) == pytest.approx(2 * mfu)
    with pytest.raises(ValueError):
        model.estimate_mfu(tokens_per_s, 0.0)


def test_residual_projections_get_the_smaller_init() -> None:
    torch.manual_seed(0)
    model = MaskedLM(tiny_config(n_embd=128, n_layer=8))
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.attn.qkv.bias == 0)


# ------------------------------------------------------- attention, positions


def test_attention_is_bidirectional() -> None:
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    changed = idx.clone()
    j = BLOCK - 1
    changed[0, j] = (idx[0, j] + 1) % VOCAB
    before, after = logits_of(model, idx), logits_of(model, changed)
    # Every earlier position sees the last token: a causal mask would hide it.
    differs = (before[0, :j] - after[0, :j]).abs().amax(dim=-1) > 1e-6
    assert differs.all()
    # ... while the other sequence in the batch is untouched.
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)


def test_positions_matter_through_rotary() -> None:
    """Without position information a bidirectional Transformer is permutation
    equivariant: swapping two tokens would only swap their two outputs."""
    model = tiny_model()
    idx = torch.arange(BLOCK).remainder(VOCAB).unsqueeze(0)
    swapped = idx.clone()
    swapped[0, [2, 9]] = idx[0, [9, 2]]
    before, after = logits_of(model, idx), logits_of(model, swapped)
    others = [i for i in range(BLOCK) if i not in (2, 9)]
    assert (before[0, others] - after[0, others]).abs().amax() > 1e-4
    # The swapped tokens' own outputs are not just exchanged either.
    assert not torch.allclose(before[0, 2], after[0, 9], atol=1e-6)


def test_rotary_scores_depend_only_on_relative_offset() -> None:
    head_dim, positions = 8, 40
    cos, sin = rotary_tables(head_dim, positions)
    torch.manual_seed(0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    for shift in (1, 7, 25):
        torch.testing.assert_close(score(3, 10), score(3 + shift, 10 + shift))
    assert not torch.allclose(score(3, 10), score(3, 11))
    # A rotation: lengths are kept, and position 0 is the identity.
    rotated = apply_rotary(q, cos[17], sin[17])
    torch.testing.assert_close(rotated.norm(), q.norm())
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)


# ------------------------------------------------------------------ loss


def test_loss_counts_selected_positions_only() -> None:
    model = tiny_model()
    inputs, targets, selected = masked_batch()
    logits, loss = model(inputs, targets)
    expected = F.cross_entropy(logits[selected], targets[selected])
    torch.testing.assert_close(loss, expected)

    # Other values at ignored positions (here another ignore_index) change nothing.
    relabelled = torch.where(selected, targets, -1)
    _, same = model(inputs, relabelled, ignore_index=-1)
    torch.testing.assert_close(same, loss, rtol=0, atol=0)
    # Changing one selected target does change it.
    moved = targets.clone()
    row, col = selected.nonzero()[0]
    moved[row, col] = (targets[row, col] + 1) % MASK_ID
    assert model(inputs, moved)[1] != loss


def test_all_ignored_batch_gives_zero_loss_that_backpropagates() -> None:
    model = tiny_model()
    model.train()
    inputs = torch.randint(0, VOCAB, (2, BLOCK))
    targets = torch.full((2, BLOCK), -100)
    _, loss = model(inputs, targets)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.all(g == 0) for g in grads)


def test_tiny_model_overfits_a_fixed_masked_batch() -> None:
    model = tiny_model()
    model.train()
    inputs, targets, _ = masked_batch(batch=4)
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99), device_type="cpu")
    first = None
    for _ in range(100):
        _, loss = model(inputs, targets)
        first = loss.item() if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert first == pytest.approx(math.log(VOCAB), rel=0.15)  # ~uniform at init
    assert loss.item() < 0.5 * first


def test_autocast_bfloat16_on_cpu() -> None:
    """Rotary runs in float32; q and k must come back in the autocast dtype."""
    model = tiny_model()
    inputs, targets, _ = masked_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(inputs, targets)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    assert model.token_embedding.weight.grad is not None


# ------------------------------------------------------- optimizer, checkpoint


def test_weight_decay_groups() -> None:
    model = tiny_model()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), device_type="cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not optimizer.defaults.get("fused")

    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # nothing twice (the tied matrix included)
    assert set(grouped) == {id(p) for p in model.parameters()}  # nothing missing

    by_name = {name: p for name, p in model.named_parameters()}
    decayed = {id(p) for p in decay["params"]}
    for name, p in by_name.items():
        is_bias_or_norm = name.endswith(".bias") or ".norm" in name or name.startswith("norm")
        assert (id(p) in decayed) == (not is_bias_or_norm), name
    assert id(model.token_embedding.weight) in decayed


def test_state_dict_round_trip(tmp_path) -> None:
    model = tiny_model(seed=0)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert not any("rotary" in key for key in state)

    restored = tiny_model(seed=1)
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    assert not torch.equal(logits_of(restored, idx), logits_of(model, idx))
    restored.load_state_dict(state)
    assert torch.equal(logits_of(restored, idx), logits_of(model, idx))
    assert restored.lm_head.weight is restored.token_embedding.weight


def test_compiles_as_one_graph() -> None:
    """fullgraph=True fails on any graph break. The aot_eager backend traces
    forward and backward like the default one but skips the C++ code generation,
    which takes ~30 s on a small CPU."""
    model = tiny_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs, targets, _ = masked_batch()
    logits, loss = compiled(inputs, targets)
    ref_logits, ref_loss = model(inputs, targets)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    _, empty = compiled(inputs, torch.full_like(targets, -100))
    assert empty.item() == 0.0 and empty.grad_fn is not None
