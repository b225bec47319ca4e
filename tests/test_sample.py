"""Sampling by iterative unmasking, reconstruction accuracy, sample entropy and
the sampling command line, on a tiny model trained for a second on a
repetitive text so that it has something to get right."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.trainer.checkpoint import Checkpoint
from services.trainer.model import MaskedLM, ModelConfig
from services.trainer.sample import (
    generate,
    load_model,
    main,
    reconstruction_accuracy,
    sample_entropy,
    unmask_schedule,
)
from shared.corpus import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "hello world. " * 60  # period 13, 9 symbols: learnable in ~100 steps
BLOCK = 32


@dataclass
class Trained:
    model: MaskedLM
    tokenizer: CharTokenizer
    data: torch.Tensor  # the whole text as ids
    checkpoint: Path
    corpus: Path


def _train(tokenizer: CharTokenizer, data: torch.Tensor, steps: int = 120) -> MaskedLM:
    """Masked-window training with a random mask ratio per window (as in
    diffusion training, so the model sees every ratio the sampler meets)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0
    )
    model = MaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    # One thread: tiny matmuls only lose to thread hand-offs on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(data) - BLOCK, (32, 1), generator=gen)
            x = data[starts + torch.arange(BLOCK)]
            ratio = torch.rand(32, 1, generator=gen) * 0.95 + 0.05
            selected = torch.rand(32, BLOCK, generator=gen) < ratio
            inputs = x.masked_fill(selected, tokenizer.mask_id)
            _, loss = model(inputs, torch.where(selected, x, -100))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _checkpoint(
    model: MaskedLM, tokenizer: CharTokenizer, corpus: Path, prefix: str = ""
) -> Checkpoint:
    return Checkpoint(
        model={prefix + k: v for k, v in model.state_dict().items()},
        model_config=model.config,
        itos=tokenizer.itos,
        mask_token_id=tokenizer.mask_id,
        iter_num=120,
        settings={"corpus_path": str(corpus), "train_val_split": 0.9, "seed": 0},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("sample")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tokenizer = CharTokenizer.from_text(TEXT)
    data = torch.from_numpy(tokenizer.encode(TEXT).astype("int64"))
    model = _train(tokenizer, data)
    path = root / "ckpt.pt"
    _checkpoint(model, tokenizer, corpus).save(path)
    return Trained(model, tokenizer, data, path, corpus)


def _ids(tokenizer: CharTokenizer, text: str) -> torch.Tensor:
    return torch.from_numpy(tokenizer.encode(text).astype("int64"))


# ------------------------------------------------------------- checkpoint


def test_load_model_restores_the_weights_and_strips_compile_prefix(
    trained: Trained, tmp_path: Path
) -> None:
    compiled = tmp_path / "compiled.pt"
    _checkpoint(trained.model, trained.tokenizer, trained.corpus, "_orig_mod.").save(compiled)
    x = trained.data[:BLOCK].view(1, -1)
    with torch.no_grad():
        expected = trained.model(x)[0]
    for path in (trained.checkpoint, compiled):
        model, checkpoint = load_model(path, "cpu")
        assert not model.training
        assert checkpoint.itos == trained.tokenizer.itos
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], expected)


# --------------------------------------------------------------- schedule


def test_cosine_schedule_commits_few_early_and_everything_by_the_last_step() -> None:
    # Masked after each step: floor(20 cos(pi/2 s/5)) = 19, 16, 11, 6, 0.
    assert unmask_schedule(20, 5) == [1, 3, 5, 5, 6]
    for length in (1, 2, 7, 20, 31):
        for steps in (1, 2, 3, length, length + 4):
            counts = unmask_schedule(length, steps)
            assert len(counts) == steps and sum(counts) == length
            remaining = length
            for n in counts:
                assert n >= 1 if remaining else n == 0
                remaining -= n
    assert unmask_schedule(0, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        unmask_schedule(5, 0)


# --------------------------------------------------------------- generate


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_generate_keeps_the_prompt_and_fills_every_mask(trained: Trained, steps: int) -> None:
    prompt = _ids(trained.tokenizer, "hello w")
    mask_id = trained.tokenizer.mask_id
    masked_after: list[int] = []
    out = generate(
        trained.model,
        prompt,
        20,
        steps,
        mask_id=mask_id,
        generator=torch.Generator().manual_seed(0),
        on_step=lambda step, ids: masked_after.append(int((ids == mask_id).sum())),
    )
    assert out.shape == (len(prompt) + 20,)
    assert torch.equal(out[: len(prompt)], prompt)
    assert (out != mask_id).all() and (out >= 0).all() and (out < mask_id).all()
    # One callback per step, the masked count follows the cosine schedule.
    expected, remaining = [], 20
    for n in unmask_schedule(20, steps):
        remaining -= n
        expected.append(remaining)
    assert masked_after == expected
    assert masked_after[-1] == 0


def test_generate_is_reproducible_with_the_same_seed(trained: Trained) -> None:
    prompt = _ids(trained.tokenizer, "hello").repeat(4, 1)  # a batch of 4

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(
            trained.model,
            prompt,
            24,
            6,
            mask_id=trained.tokenizer.mask_id,
            temperature=2.0,
            generator=gen,
        )

    first = run(7)
    assert first.shape == (4, 5 + 24)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


def test_top_k_1_commits_the_argmax_at_every_step(trained: Trained) -> None:
    mask_id = trained.tokenizer.mask_id
    prompt = _ids(trained.tokenizer, "hel")
    seen: list[torch.Tensor] = []
    out = generate(
        trained.model,
        prompt,
        24,
        8,
        mask_id=mask_id,
        temperature=1.7,
        top_k=1,
        generator=torch.Generator().manual_seed(3),
        on_step=lambda s, ids: seen.append(ids.clone()),
    )
    before = torch.cat([prompt, torch.full((24,), mask_id)])
    for after in seen:
        with torch.no_grad():
            logits = trained.model(before.view(1, -1))[0][0]
        logits[:, mask_id] = -math.inf
        committed = (before == mask_id) & (after != mask_id)
        assert committed.any()
        assert torch.equal(after[committed], logits.argmax(-1)[committed])
        assert torch.equal(after[~committed], before[~committed])
        before = after
    # Noise-free: another seed, another temperature and greedy all agree.
    for temperature, seed in ((0.5, 11), (0.0, 0)):
        again = generate(
            trained.model,
            prompt,
            24,
            8,
            mask_id=mask_id,
            temperature=temperature,
            top_k=1,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(again, out)


def test_generate_rejects_sequences_longer_than_the_block(trained: Trained) -> None:
    prompt = _ids(trained.tokenizer, "hello")
    with pytest.raises(ValueError, match="block_size"):
        generate(trained.model, prompt, BLOCK - 4, 4, mask_id=trained.tokenizer.mask_id)
    out = generate(trained.model, prompt, BLOCK - 5, 4, mask_id=trained.tokenizer.mask_id)
    assert out.shape == (BLOCK,)


# ------------------------------------------------------------- evaluation


def test_reconstruction_accuracy_is_well_above_chance(trained: Trained) -> None:
    windows = torch.stack([trained.data[s : s + BLOCK] for s in range(0, 600, 23)])
    chance = 1 / trained.tokenizer.n_real
    accuracy = reconstruction_accuracy(
        trained.model, windows, 0.15, trained.tokenizer.mask_id, torch.Generator().manual_seed(0)
    )
    assert 0.0 <= accuracy <= 1.0
    assert accuracy > 4 * chance
    # An untrained model is near chance: the metric measures the training.
    torch.manual_seed(1)
    fresh = MaskedLM(trained.model.config).eval()
    baseline = reconstruction_accuracy(
        fresh, windows, 0.15, trained.tokenizer.mask_id, torch.Generator().manual_seed(0)
    )
    assert baseline < accuracy - 0.3
    with pytest.raises(ValueError, match="mask_ratio"):
        reconstruction_accuracy(trained.model, windows, 0.01, trained.tokenizer.mask_id)


def test_reconstruction_accuracy_masks_exactly_round_ratio_t_positions() -> None:
    """A stand-in model that always predicts token 1 and records its input: each
    window carries exactly round(0.34 * 10) = 3 [MASK]s, and the accuracy is
    the share of masked positions that held a 1."""
    seen: list[torch.Tensor] = []

    class AlwaysOne(torch.nn.Module):
        config = ModelConfig(vocab_size=3, block_size=10, n_layer=1, n_head=1, n_embd=2)

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
            seen.append(idx.clone())
            logits = torch.zeros(*idx.shape, 3)
            logits[..., 1] = 1.0
            return logits, None

    windows = torch.ones(5, 10, dtype=torch.long)
    windows[:, ::2] = 0  # half the positions hold 0, which the model never predicts
    accuracy = reconstruction_accuracy(
        AlwaysOne(), windows, 0.34, 2, torch.Generator().manual_seed(0)
    )
    (inputs,) = seen
    assert ((inputs == 2).sum(dim=1) == 3).all()  # round(0.34 * 10) per window
    assert 0.0 < accuracy < 1.0
    hits = ((inputs == 2) & (windows == 1)).sum()
    assert accuracy == pytest.approx(float(hits) / 15)


def test_sample_entropy() -> None:
    assert sample_entropy("") == 0.0
    assert sample_entropy("aaaa") == 0.0
    assert sample_entropy("abab") == pytest.approx(1.0)
    assert sample_entropy("abcd") == pytest.approx(2.0)
    assert sample_entropy("aab") == pytest.approx(-(2 / 3) * math.log2(2 / 3) + math.log2(3) / 3)


# ----------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer.sample", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_samples_and_reports_accuracy(trained: Trained) -> None:
    result = _cli(
        f"--checkpoint={trained.checkpoint}",
        "--prompt=hello",
        "--length=20",
        "--steps=5",
        "--show_steps",
        "--mask_ratios=0.15",
        "--eval_windows=4",
        "--device=cpu",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("-- step ")]
    assert len(steps) == 5
    assert all(len(s) == 25 and s.startswith("hello") for s in steps)
    assert steps[0].count("_") > steps[-1].count("_") == 0
    sample = lines[next(i for i, line in enumerate(lines) if line.startswith("-- sample")) + 1]
    assert len(sample) == 5 + 20 and sample.startswith("hello") and "[MASK]" not in sample
    assert sample == steps[-1]
    assert any(line.startswith("entropy of the generated text:") for line in lines)
    (accuracy_line,) = [line for line in lines if line.startswith("reconstruction accuracy")]
    accuracy = float(accuracy_line.split(": ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0


def test_cli_names_prompt_characters_outside_the_vocabulary(trained: Trained) -> None:
    result = _cli(f"--checkpoint={trained.checkpoint}", "--prompt=hello Zq", "--length=5")
    assert result.returncode == 2
    assert "'Z'" in result.stderr and "'q'" in result.stderr
    assert "vocabulary" in result.stderr


def test_cli_refuses_a_corpus_with_another_vocabulary(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.txt"
    other.write_text("hello there, world. " * 40, encoding="utf-8")
    checkpoint = Checkpoint.load(trained.checkpoint)
    checkpoint.settings["corpus_path"] = str(other)
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path)
    argv = [f"--checkpoint={path}", "--length=4", "--steps=2", "--mask_ratios=0.5"]
    assert main(argv) == 2
    assert "different vocabulary" in capsys.readouterr().err
    assert main([f"--checkpoint={tmp_path / 'missing.pt'}"]) == 3
    assert "no checkpoint at" in capsys.readouterr().err
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:1000])
    assert main([f"--checkpoint={torn}"]) == 3
    assert f"checkpoint {torn} cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("n_layer", "two", "model_config.n_layer = 'two', not a positive integer"),
        ("mask_token_id", "x", "mask_token_id = 'x', not an integer"),
        ("model", ["weights"], "model is not a table of named tensors"),
        ("itos", "abc", "itos is not a list of strings"),
        ("history", {"a": 1}, "history is not a list of tables"),
    ],
)
def test_a_checkpoint_with_a_field_of_the_wrong_kind_is_refused_by_name(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str], field, value, said
) -> None:
    state = torch.load(trained.checkpoint, weights_only=True)
    if field == "n_layer":
        state["model_config"][field] = value
    else:
        state[field] = value
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    assert main([f"--checkpoint={path}", "--length=4", "--steps=2"]) == 3
    err = capsys.readouterr().err
    assert f"checkpoint {path} has malformed fields: {said}" in err


@pytest.mark.parametrize(
    ("argument", "said"),
    [
        ("--elbo_windows=0", "--elbo_windows and --elbo_nodes must be >= 1"),
        ("--elbo_nodes=-1", "--elbo_windows and --elbo_nodes must be >= 1"),
        ("--temperature=nan", "--temperature must be a finite number >= 0, not nan"),
        ("--temperature=inf", "--temperature must be a finite number >= 0, not inf"),
        ("--seed=99999999999999999999999", "--seed must be from 0 to 2^63 - 1"),
    ],
)
def test_arguments_are_checked_before_anything_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argument: str, said: str
) -> None:
    # The checkpoint does not exist: an argument refused first never gets to it.
    assert main([f"--checkpoint={tmp_path / 'none.pt'}", "--elbo", argument]) == 2
    assert said in capsys.readouterr().err


def test_a_diffusion_judge_is_refused_before_sampling(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"--checkpoint={trained.checkpoint}", f"--judge={trained.checkpoint}", "--length=4"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "is a masked-diffusion checkpoint: the judge is an autoregressive one" in captured.err
    assert "-- sample" not in captured.out  # nothing sampled first
