"""One settings tree for every service.

Precedence, lowest first: defaults < preset file < environment variables <
``--key=value`` command-line overrides (nanoGPT style). Keys are flat; the
classes below only group them for ``--help``. ``load_settings`` is the single
entry point and turns every mistake into a :class:`SettingsError` that names
the field, the value and what is allowed.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import tomllib
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.masking import AnyStage, BernoulliStage, Stage

PRESET_DIR = Path(__file__).with_name("presets")

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class SettingsError(Exception):
    """A configuration mistake; the message says which field and how to fix it."""


class _Base(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
        env_parse_none_str="null",
    )


class RunSettings(_Base):
    preset: str | None = Field(
        None, description="preset name (shared/presets/<name>.toml) or path to a .toml/.json file"
    )
    namespace: str = Field(
        "maskstream", pattern=r"^[A-Za-z0-9_.\-]+$", description="prefix of every Redis key"
    )
    redis_url: str = Field("redis://localhost:6379/0", description="redis:// rediss:// or unix://")
    redis_password: SecretStr | None = Field(None, description="Redis password (never logged)")
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (container secrets)"
    )
    seed: int = Field(1337, ge=0, description="root seed of every random stream")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_interval_s: float = Field(10.0, gt=0, description="seconds between summary log lines")

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class DataSettings(_Base):
    dataset: str = Field(
        "char_diffusion",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="provider module under services/producer/providers",
    )
    corpus: Literal["tinyshakespeare"] = Field(
        "tinyshakespeare", description="named corpus downloaded when corpus_path is unset"
    )
    corpus_path: Path | None = Field(None, description="any UTF-8 text file; no download")
    corpus_url: str = Field(TINYSHAKESPEARE_URL, description="where the named corpus comes from")
    corpus_sha256: str = Field(
        TINYSHAKESPEARE_SHA256, pattern=r"^[0-9a-f]{64}$", description="checked after download"
    )
    cache_dir: Path = Field(
        Path("~/.cache/maskstream"), description="download cache for the named corpus"
    )
    batch_size: int = Field(16, ge=1)
    block_size: int = Field(1024, ge=2)
    train_val_split: float = Field(0.9, gt=0.0, lt=1.0)
    mask_probability: float = Field(
        0.15, gt=0.0, le=1.0, description="selection ratio when no stages are configured"
    )
    ignore_index: int = Field(-100, description="label value the trainer's loss ignores")
    use_all_stages_for_training: bool = Field(
        True, description="spread training batches over all stages, else follow the active one"
    )
    unmasking_stages: list[Stage] = Field(default_factory=list, description="training stages")
    validation_stages: list[Stage] = Field(default_factory=list, description="validation stages")
    val_batches: int = Field(28, ge=1, description="size of the fixed validation set, in batches")

    @field_validator(
        "cache_dir",
        "corpus_path",
        "redis_password_file",
        "out_dir",
        "ack_log",
        mode="after",
        check_fields=False,
    )
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class ProducerSettings(_Base):
    max_backlog: int = Field(
        256, ge=1, description="entries a stream may hold before producers wait"
    )
    send_batch: int = Field(8, ge=1, description="entries sent per Redis round trip")
    max_message_bytes: int = Field(
        64 * 2**20, ge=1024, description="largest message a decoder accepts"
    )
    producer_id: int | None = Field(
        None, ge=0, description="fixed producer id; unset = allocated from Redis"
    )
    rate_limit: float = Field(0.0, ge=0.0, description="batches/s per producer, 0 = unlimited")
    stage_poll_interval_s: float = Field(
        1.0, gt=0, description="how often producers re-read the active stage"
    )
    dead_letter_maxlen: int = Field(
        10_000, ge=1, description="dead-letter entries kept (oldest trimmed)"
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="producer's Prometheus port (0 = no metrics)"
    )


class LocalSettings(_Base):
    local_producers: int = Field(2, ge=1, description="producer processes of the local stack")
    local_seconds: float = Field(
        900.0, gt=0, description="the local stack stops the trainer after this long at most"
    )


class AutoscalerSettings(_Base):
    prometheus_url: str = Field(
        "http://prometheus:9090", description="where the autoscaler reads rates and wait shares"
    )
    autoscale_interval_s: float = Field(5.0, gt=0, description="seconds between decisions")
    rate_window: str = Field(
        "1m", pattern=r"^\d+[smh]$", description="PromQL range of the rates it acts on"
    )
    min_producers: int = Field(1, ge=0)
    max_producers: int = Field(8, ge=1)
    starve_threshold: float = Field(
        0.05, gt=0, lt=1, description="scale up when trainers wait for data beyond this share"
    )
    full_fraction: float = Field(
        0.9, gt=0, le=1, description="the queue counts as full from this share of max_backlog"
    )
    idle_backpressure: float = Field(
        0.5, gt=0, lt=1, description="scale down when producers wait on a full queue this much"
    )
    cooldown_s: float = Field(30.0, ge=0, description="no change within this long of the last")
    headroom: float = Field(1.2, ge=1, description="provision measured demand times this")
    confirm: int = Field(2, ge=1, description="observations a condition must last before acting")
    dry_run: bool = Field(False, description="log decisions, change nothing")
    compose_project: str | None = Field(
        None, description="compose project of the producers (unset: the autoscaler's own)"
    )
    producer_service: str = Field("producer", description="compose service of the producers")
    stop_timeout_s: int = Field(
        10, ge=1, description="grace period of a stopped replica (SIGTERM, then SIGKILL)"
    )
    autoscaler_metrics_port: int = Field(9300, ge=0, le=65535)


class ModelSettings(_Base):
    n_layer: int = Field(8, ge=1)
    n_head: int = Field(8, ge=1)
    n_embd: int = Field(512, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention: Literal["bidirectional"] = "bidirectional"
    position_encoding: Literal["rotary"] = "rotary"


class TrainSettings(_Base):
    learning_rate: float = Field(5e-4, gt=0)
    min_lr: float = Field(5e-5, ge=0)
    warmup_iters: int = Field(500, ge=0)
    max_iters: int = Field(10_000, ge=1)
    lr_decay_iters: int = Field(10_000, ge=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    gradient_accumulation_steps: int = Field(1, ge=1)
    eval_interval: int = Field(250, ge=1)
    eval_iters: int = Field(200, ge=1)
    log_interval: int = Field(10, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float16", description="autocast dtype on GPU (the CPU always trains in float32)"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda when available"
    )
    compile: bool = Field(False, description="torch.compile the model")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads per trainer process (0 = torch's default)"
    )
    out_dir: Path = Field(Path("runs/default"), description="checkpoints of this run")
    run_name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="the run's consumer group on the training stream",
    )
    init_from: Literal["scratch", "resume"] = Field(
        "scratch", description="resume = continue from out_dir/ckpt.pt"
    )
    ack_policy: Literal["step", "checkpoint"] = Field(
        "step",
        description="ack entries once every rank finished the step that used them, "
        "or only once the next checkpoint is on disk",
    )
    checkpoint_interval: int = Field(
        250, ge=0, description="iterations between checkpoints (0 = only at the end)"
    )
    prefetch_batches: int = Field(8, ge=1, description="micro-batches each rank reads ahead")
    reclaim_idle_ms: int = Field(
        60_000, ge=0, description="idle time after which a gone consumer's entries are taken"
    )
    ack_log: Path | None = Field(
        None, description="append 'producer seq entry-id' per acked entry here (audits)"
    )
    trainer_metrics_port: int = Field(
        9200, ge=0, le=65535, description="trainer's Prometheus port, all ranks (0 = none)"
    )
    peak_flops: float = Field(
        0.0, ge=0, description="accelerator peak FLOP/s for MFU (0 = known GPUs, else none)"
    )
    wandb_log: bool = Field(False, description="log to Weights & Biases (needs wandb)")
    wandb_project: str = "maskstream"


_preset_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "preset_values", default=None
)


_environ: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "environ", default=None
)


class _EnvSource(EnvSettingsSource):
    """The process environment, or the mapping handed to ``load_settings``."""

    def _load_env_vars(self) -> dict[str, str | None]:
        mapping = _environ.get()
        if mapping is None:
            return dict(super()._load_env_vars())
        # Keys are case-insensitive and "null" means None, as for os.environ.
        return {key.lower(): None if value == "null" else value for key, value in mapping.items()}


class _PresetSource(PydanticBaseSettingsSource):
    """Values of the preset file chosen by ``load_settings``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ below returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        return dict(_preset_values.get() or {})


class Settings(
    RunSettings,
    DataSettings,
    ProducerSettings,
    LocalSettings,
    AutoscalerSettings,
    ModelSettings,
    TrainSettings,
):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: command line (passed as init kwargs), environment, preset.
        return init_settings, _EnvSource(settings_cls), _PresetSource(settings_cls)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd / n_head must be even for rotary position embeddings")
        if self.min_producers > self.max_producers:
            raise ValueError(
                f"min_producers={self.min_producers} exceeds max_producers={self.max_producers}"
            )
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr={self.min_lr} must not exceed learning_rate={self.learning_rate}"
            )
        url = urlsplit(self.redis_url)
        if url.password is not None:
            # Keep the password out of the URL, which gets logged: it lives on
            # as a SecretStr (an explicit redis_password wins).
            if self.redis_password is None:
                object.__setattr__(self, "redis_password", SecretStr(unquote(url.password)))
            host = url.netloc.rsplit("@", 1)[1]
            user = f"{url.username}@" if url.username else ""
            object.__setattr__(self, "redis_url", urlunsplit(url._replace(netloc=user + host)))
        if self.redis_password_file is not None and self.redis_password is None:
            try:
                secret = self.redis_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"redis_password_file: cannot read it ({exc})") from exc
            object.__setattr__(self, "redis_password", SecretStr(secret))
        return self

    # -------------------------------------------------------------- helpers

    def stages(self, split: str) -> list[AnyStage]:
        """Stages of ``split`` ("train" or "val"). Validation falls back to the
        training stages, and those to classic BERT masking at mask_probability."""
        if split == "val" and self.validation_stages:
            return list(self.validation_stages)
        if self.unmasking_stages:
            return list(self.unmasking_stages)
        return [BernoulliStage(type="bernoulli", masked_ratio=self.mask_probability)]

    def public_dict(self) -> dict[str, Any]:
        """Every value, JSON-ready, secrets masked."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------ loading


def _field_names() -> list[str]:
    return list(Settings.model_fields)


def _unknown_key(key: str, where: str) -> SettingsError:
    close = difflib.get_close_matches(key, _field_names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " See --help for every setting."
    return SettingsError(f"unknown setting '{key}' ({where}).{hint}")


def parse_cli(argv: list[str]) -> tuple[dict[str, Any], bool]:
    """``--key=value`` pairs into a dict; returns (overrides, help_requested).
    A bare ``--flag`` sets a boolean to true. Values that look like JSON lists
    or objects (stages) are parsed as JSON."""
    overrides: dict[str, Any] = {}
    wants_help = False
    fields = Settings.model_fields
    for arg in argv:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--"):
            raise SettingsError(f"cannot read argument '{arg}': use --key=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise _unknown_key(key, f"command line {arg}")
        if not eq:
            if fields[key].annotation is not bool:
                raise SettingsError(f"--{key} needs a value: --{key}=<value>")
            value = "true"
        if value[:1] in "[{":
            try:
                overrides[key] = json.loads(value)
                continue
            except json.JSONDecodeError as exc:
                raise SettingsError(f"--{key}: value is not valid JSON ({exc})") from exc
        overrides[key] = None if value == "null" else value
    return overrides, wants_help


def resolve_preset(name: str) -> Path:
    candidate = Path(name).expanduser()
    if candidate.suffix in (".toml", ".json"):
        if not candidate.is_file():
            raise SettingsError(f"preset file '{name}' does not exist")
        return candidate
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not (PRESET_DIR / f"{name}.toml").is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise SettingsError(
            f"preset = '{name}': no such preset; use one of [{known}] "
            "or a path to a .toml/.json file"
        )
    return PRESET_DIR / f"{name}.toml"


def read_preset(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            values = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"preset file '{path}' cannot be read: {exc}") from exc
    if not isinstance(values, dict):
        raise SettingsError(f"preset file '{path}' must hold a table of settings")
    for key in values:
        if key not in Settings.model_fields:
            raise _unknown_key(key, f"preset {path}")
    return values


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else "settings"
    where = ".".join(loc)
    shown = error.get("input")
    if field in ("redis_password", "redis_url"):
        shown = "***"
    elif isinstance(shown, dict | list):
        shown = json.dumps(shown)[:200]
    fix = (
        f"set it with --{field}=<value>, the {field.upper()} environment variable or the preset"
        if field in Settings.model_fields
        else "check the settings"
    )
    return f"  {where} = {shown!r}: {error.get('msg')} ({fix})"


def load_settings(
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    exit_on_help: bool = True,
) -> Settings:
    """Build the settings from preset, environment and ``argv`` overrides.

    ``env``, when given, is read instead of ``os.environ``.
    """
    argv = sys.argv[1:] if argv is None else argv
    overrides, wants_help = parse_cli(argv)
    if wants_help and exit_on_help:
        print(help_text())
        raise SystemExit(0)
    environ = os.environ if env is None else env
    preset_name = overrides.get("preset") or environ.get("PRESET") or environ.get("preset")
    preset_values = read_preset(resolve_preset(preset_name)) if preset_name else {}
    preset_token = _preset_values.set(preset_values)
    environ_token = _environ.set(None if env is None else dict(env))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = "\n".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"invalid settings:\n{lines}") from None
    finally:
        _preset_values.reset(preset_token)
        _environ.reset(environ_token)


def help_text() -> str:
    lines = [
        "Settings: defaults < preset (--preset=NAME or PRESET) < environment (KEY=value)"
        " < command line (--key=value).",
    ]
    for group in Settings.__bases__:  # the groups, in --help order
        lines.append(f"\n[{group.__name__.removesuffix('Settings').lower()}]")
        for name in group.__annotations__:
            info = Settings.model_fields[name]
            default = info.get_default(call_default_factory=True)
            if isinstance(default, Path):
                default = str(default)
            shown = json.dumps(default) if not isinstance(default, SecretStr) else '"***"'
            desc = f"  {info.description}" if info.description else ""
            lines.append(f"  --{name}={shown}{desc}")
    return "\n".join(lines)
