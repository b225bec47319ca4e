"""A bidirectional Transformer for masked (discrete diffusion) character modelling.

Read top to bottom: config, rotary position embeddings, attention, MLP, block,
then the model with its loss, FLOP/MFU estimate and optimizer groups.

Compared with a GPT, two things differ. Attention is bidirectional (no causal
mask): every position sees the whole window, because the model fills in
masked positions from context on both sides. Positions come from rotary
embeddings applied to q and k, not from a learned absolute table, so attention
scores depend on relative offsets and no position parameters exist.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.trainer.optim import MuonAdamW

if TYPE_CHECKING:
    from shared.settings import ModelSettings


@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int  # longest window; the rotary tables cover positions 0..block_size-1
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.1
    # False: the masked-diffusion model (every position sees every other).
    # True: the same network as an autoregressive baseline (position t sees <= t).
    causal: bool = False

    @classmethod
    def from_settings(
        cls, settings: ModelSettings, vocab_size: int, block_size: int
    ) -> ModelConfig:
        """The model group of the settings (which checked it: head size even,
        n_embd a multiple of n_head); vocab and block size come from the data."""
        return cls(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=settings.n_layer,
            n_head=settings.n_head,
            n_embd=settings.n_embd,
            dropout=settings.dropout,
            causal=settings.objective == "ar",
        )


# ------------------------------------------------------------ rotary embeddings


def rotary_tables(head_dim: int, n_positions: int, base: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (n_positions, head_dim // 2), float32.

    Channel pair i of position m is rotated by m * base**(-2i/head_dim): fast
    rotations for fine position, slow ones for coarse.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    # Angles in float64: at large positions float32 angles lose the low bits.
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + D/2) of x (..., T, D) by the per-position angles.

    Computed in float32 and cast back, so under autocast q and k keep the dtype
    of v (scaled_dot_product_attention wants all three alike).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# ------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj.is_residual_projection = True  # see MaskedLM._init_weights
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.attn_dropout_p if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # LayerNorm rather than RMSNorm: autocast runs layer_norm in float32
        # under float16/bfloat16 (float16 is the default training dtype), it
        # has a fused kernel everywhere, and its cost is negligible here.
        self.norm1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


# -------------------------------------------------------------------- model


class MaskedLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab) for every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one matrix maps ids to vectors and vectors back to
        # logits; fewer parameters and it trains as well or better at this size.
        self.lm_head.weight = self.token_embedding.weight

        # Computed once for the longest window; forward slices the first T rows.
        # Not persistent: they are a pure function of the config, so checkpoints
        # stay free of them and loading never fights over their shape.
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # Each block adds two projections to the residual stream; scale
                # them so its variance at the output does not grow with depth.
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm keeps its own init: weight 1, bias 0.

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, ignore_index: int = -100
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy
        over the positions whose target is not ignore_index (the masked ones)."""
        B, T = idx.shape
        if idx.size(1) > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                "raise block_size or feed shorter windows"
            )
        cos = self.rotary_cos[:T]
        sin = self.rotary_sin[:T]

        x = self.dropout(self.token_embedding(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))

        if targets is None:
            return logits, None
        # Sum, then divide by the count: a batch with nothing selected gives 0
        # with a grad_fn (backward and DDP's all-reduce still run) instead of the
        # NaN that reduction="mean" gives, and needs no Python branch on a tensor
        # value (torch.compile friendly).
        loss_sum = F.cross_entropy(
            logits.view(B * T, -1).float(),
            targets.reshape(B * T),
            ignore_index=ignore_index,
            reduction="sum",
        )
        n_selected = (targets != ignore_index).sum().clamp(min=1)
        return logits, loss_sum / n_selected

    # ---------------------------------------------------------- accounting

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. The tied embedding/head matrix counts once;
        non_embedding=True leaves it out (the usual "model size")."""
        n = sum(p.numel() for p in self.parameters())  # parameters() dedupes the tie
        if non_embedding:
            n -= self.token_embedding.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at window length seq_len
        (default block_size).

            6 * N  +  12 * n_layer * n_embd * seq_len

        6N: each parameter in a matmul costs 2 FLOPs forward and 4 backward.
        N includes the tied embedding because the output head multiplies by it
        (the lookup at the input is free); biases and norms are counted though
        they are not matmuls, a negligible overcount. The second term is
        attention's q @ k^T and att @ v, which hold no parameters: 2 matmuls x
        2 FLOPs x seq_len x n_embd per token per layer forward, x3 for backward.
        Bidirectional attention really computes the full seq_len x seq_len
        score matrix, so unlike for a causal model this term is not an
        overcount. Flash-attention recomputation in backward is not counted
        (model FLOPs, not hardware FLOPs).
        """
        T = self.config.block_size if seq_len is None else seq_len
        N = self.num_params(non_embedding=False)
        return 6 * N + 12 * self.config.n_layer * self.config.n_embd * T

    def estimate_mfu(
        self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None
    ) -> float:
        """Model FLOPs utilization as a fraction of peak_flops (FLOP/s of the
        hardware at the training dtype, e.g. ~989e12 for dense bf16 on an H100
        SXM). The caller knows the hardware; the model does not."""
        if peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be positive")
        return tokens_per_second * self.flops_per_token(seq_len) / peak_flops

    # ----------------------------------------------------------- optimizer

    def configure_optimizer(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        *,
        muon_learning_rate: float | None = None,
    ) -> torch.optim.Optimizer:
        """AdamW that decays matrices (matmul weights, the embedding) but not
        biases and norm gains: shrinking those toward 0 has no regularizing
        meaning and only hurts.

        With ``muon_learning_rate``: the blocks' weight matrices take Muon steps
        at that peak rate instead (no weight decay: Muon's updates have a fixed
        spectral norm, so they cannot blow a matrix up), the embedding/head,
        biases and gains keep AdamW (:mod:`services.trainer.optim`). Every group
        carries ``lr_scale``, its peak rate over ``learning_rate``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if muon_learning_rate is not None:
            matrices = [p for p in self.blocks.parameters() if p.requires_grad and p.dim() == 2]
            taken = {id(p) for p in matrices}
            rest = [p for p in params if id(p) not in taken]
            return MuonAdamW(
                [
                    {"params": matrices, "kind": "muon", "weight_decay": 0.0,
                     "lr": muon_learning_rate, "lr_scale": muon_learning_rate / learning_rate},
                    {"params": [p for p in rest if p.dim() >= 2], "kind": "adamw",
                     "weight_decay": weight_decay, "lr": learning_rate, "lr_scale": 1.0},
                    {"params": [p for p in rest if p.dim() < 2], "kind": "adamw",
                     "weight_decay": 0.0, "lr": learning_rate, "lr_scale": 1.0},
                ],
                betas=betas,
            )  # fmt: skip
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        # The fused CUDA kernel does the whole update in a few launches.
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
