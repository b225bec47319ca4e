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
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from shared.codec import DEFAULT_MAX_BYTES
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
        # inf and nan are no rate, bound or time anyone means: refused with the field's name.
        allow_inf_nan=False,
    )

    def public_dict(self) -> dict[str, Any]:
        """Every value, JSON-ready, secrets masked."""
        return self.model_dump(mode="json")


def _expand_path(value: Path | None) -> Path | None:
    return value.expanduser() if value is not None else None


# ------------------------------------------------------------------ groups
# Each group holds the keys of one concern and checks only those. A service's
# settings are the groups it reads (see the service classes further down).


# Placeholders from examples and docs: never a password.
PLACEHOLDER_PASSWORDS = frozenset({"change-me", "changeme", "password", "secret", "admin", "redis"})
# A role's password (the stack's ACL users) at least this long: make-env.sh writes 32.
MIN_ROLE_PASSWORD = 16
# Characters that could end a config/ACL line, start a comment or a rule (>pass, <pass),
# or break the quoting of a file that carries it (the exporter's JSON).
_UNSAFE_PASSWORD = re.compile(r"[\s#<>\"'`\\]|[^\x21-\x7e]")


def password_problem(password: str, username: str | None = None) -> str | None:
    """Why ``password`` must not be used (None: it may). Placeholders and characters that
    could inject config are refused always; a role's password (``username`` set: an ACL
    user of the stack) must also be at least MIN_ROLE_PASSWORD characters."""
    if not password:
        return "is empty: write the password (deploy/docker/make-env.sh generates them)"
    if password.lower() in PLACEHOLDER_PASSWORDS:
        return (
            "is a placeholder from an example (change-me, password, ...): use a random one "
            "(deploy/docker/make-env.sh writes them; `openssl rand -hex 16`)"
        )
    if _UNSAFE_PASSWORD.search(password):
        return (
            "holds whitespace, a control or non-ASCII character, or one of # < > \" ' ` \\ "
            "(they could inject config lines): use letters, digits and - _ . ~ + ="
        )
    if username and len(password) < MIN_ROLE_PASSWORD:
        return (
            f"is {len(password)} characters; the password of Redis user {username!r} needs "
            f"at least {MIN_ROLE_PASSWORD} (deploy/docker/make-env.sh writes 32)"
        )
    return None


class RunSettings(_Base):
    """Where the run's Redis is and how a process logs: every service."""

    preset: str | None = Field(
        None, description="preset name (shared/presets/<name>.toml) or path to a .toml/.json file"
    )
    namespace: str = Field(
        "maskstream", pattern=r"^[A-Za-z0-9_.\-]+$", description="prefix of every Redis key"
    )
    redis_url: str = Field("redis://localhost:6379/0", description="redis:// rediss:// or unix://")
    redis_username: str | None = Field(
        None, description="Redis ACL user of this service (unset: the URL's user, else default)"
    )
    redis_password: SecretStr | None = Field(None, description="Redis password (never logged)")
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (container secrets)"
    )
    metrics_address: str = Field(
        "127.0.0.1",
        description="address the metrics server listens on (containers: 0.0.0.0 on the "
        "stack's network; native runs: loopback, nothing exposed)",
    )
    seed: int = Field(1337, ge=0, le=2**32 - 1, description="root seed of every random stream")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_interval_s: float = Field(10.0, gt=0, description="seconds between summary log lines")

    _expand_run_paths = field_validator("redis_password_file", mode="after")(_expand_path)

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// needs the socket's path, as in unix:///run/redis.sock")
            return value
        try:
            parts.port  # noqa: B018 - urllib checks the port when it is read
        except ValueError:
            raise ValueError(
                "its port must be a number from 0 to 65535, as in redis://localhost:6379/0"
            ) from None
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(
                f"its path is the database number, not {database!r}: redis://localhost:6379/0"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _password_out_of_url(self) -> RunSettings:
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
        if self.redis_password is not None:
            problem = password_problem(self.redis_password.get_secret_value(), self.redis_username)
            if problem:
                source = "redis_password_file" if self.redis_password_file else "redis_password"
                raise ValueError(f"{source}: {problem}")
        return self

    def password(self) -> str | None:
        """The Redis password in clear, for the client only (never log it)."""
        return self.redis_password.get_secret_value() if self.redis_password else None


class DataSettings(_Base):
    """The dataset contract producers publish: corpus, batch shape, masking."""

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

    _expand_data_paths = field_validator("cache_dir", "corpus_path", mode="after")(_expand_path)

    def stages(self, split: str) -> list[AnyStage]:
        """Stages of ``split`` ("train" or "val"). Validation falls back to the
        training stages, and those to classic BERT masking at mask_probability."""
        if split == "val" and self.validation_stages:
            return list(self.validation_stages)
        if self.unmasking_stages:
            return list(self.unmasking_stages)
        return [BernoulliStage(type="bernoulli", masked_ratio=self.mask_probability)]


class QueueSettings(_Base):
    """The stream's bounds, which producers enforce and trainers and the
    autoscaler read."""

    max_backlog: int = Field(
        256, ge=1, description="entries a stream may hold before producers wait"
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=1024, description="largest message a decoder accepts"
    )
    dead_letter_maxlen: int = Field(
        10_000, ge=1, description="dead-letter entries kept (oldest trimmed)"
    )


class ProducerSettings(_Base):
    """How one producer replica sends."""

    send_batch: int = Field(8, ge=1, description="entries sent per Redis round trip")
    producer_id: int | None = Field(
        None, ge=0, description="fixed producer id; unset = allocated from Redis"
    )
    rate_limit: float = Field(0.0, ge=0.0, description="batches/s per producer, 0 = unlimited")
    stage_poll_interval_s: float = Field(
        1.0, gt=0, description="how often producers re-read the active stage"
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="producer's Prometheus port (0 = no metrics)"
    )


class LocalSettings(_Base):
    """The one-machine stack of ``python -m services.local``."""

    local_producers: int = Field(2, ge=1, description="producer processes of the local stack")
    local_seconds: float = Field(
        900.0, gt=0, description="the local stack stops the trainer after this long at most"
    )


class AutoscalerSettings(_Base):
    """The autoscaler's signals, policy and container engine. The policy's
    cross-field rules live in services/autoscaler/policy.py (PolicyConfig),
    checked once when the autoscaler starts."""

    prometheus_url: str = Field(
        "http://prometheus:9090",
        description="where the autoscaler reads rates and wait shares (http:// or https://)",
    )
    autoscale_interval_s: float = Field(5.0, gt=0, description="seconds between decisions")
    rate_window: str = Field(
        "1m", pattern=r"^\d+[smh]$", description="PromQL range of the rates it acts on"
    )

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                "must be Prometheus's http:// or https:// URL, as in http://prometheus:9090"
            )
        return value

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
    """The Transformer's shape (bidirectional, rotary positions)."""

    n_layer: int = Field(8, ge=1)
    n_head: int = Field(8, ge=1)
    n_embd: int = Field(512, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    objective: Literal["diffusion", "ar"] = Field(
        "diffusion",
        description="diffusion: the bidirectional masked model; ar: the same network with a "
        "causal mask and next-character loss, the baseline (fed by the same producers)",
    )

    @model_validator(mode="after")
    def _consistent_shape(self) -> ModelSettings:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("n_embd / n_head must be even for rotary position embeddings")
        return self


class TrainSettings(_Base):
    """The optimizer, schedule, evaluation, checkpoints and acks of a run."""

    learning_rate: float = Field(5e-4, gt=0)
    min_lr: float = Field(5e-5, ge=0)
    warmup_iters: int = Field(500, ge=0)
    max_iters: int = Field(10_000, ge=1)
    lr_decay_iters: int = Field(10_000, ge=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW for every parameter; muon: Muon for the blocks' weight "
        "matrices (at muon_learning_rate), AdamW for the embedding, biases and gains",
    )
    muon_learning_rate: float = Field(
        0.02, gt=0, description="Muon's peak rate (optimizer=muon; same warmup and decay)"
    )
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    max_nonfinite_steps: int = Field(
        50,
        ge=0,
        description="stop (exit 2, no checkpoint of the diverged state) after this many steps "
        "in a row whose gradient was not finite (each is zeroed; under float16, beyond the 10 "
        "in a row its loss scaler may skip by design); 0 = never stop",
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    eval_interval: int = Field(250, ge=1)
    eval_iters: int = Field(200, ge=1, description="validation batches evaluated (at most)")
    loss_weighting: Literal["mean", "elbo"] = Field(
        "mean",
        description="loss on batches with a mask_ratio (uniform stages): the plain masked "
        "mean, or the ELBO weighting (each row's masked cross-entropy sum / (t * length))",
    )
    elbo_nodes: int = Field(8, ge=1, description="Gauss-Legendre nodes of the validation ELBO")
    elbo_draws: int = Field(1, ge=1, description="mask draws per node and window for the ELBO")
    elbo_windows: int = Field(
        64,
        ge=0,
        description="validation windows of periodic ELBOs (the final one and every AR NLL: all; "
        "0 = all)",
    )
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
    max_deliveries: int = Field(
        3,
        ge=1,
        description="training steps that may fail on an entry before it is dead-lettered",
    )
    reclaim_idle_ms: int = Field(
        60_000, ge=0, description="idle time after which a gone consumer's entries are taken"
    )
    ack_log: Path | None = Field(
        None,
        description="audit file: one line 'producer seq entry-id' per acked entry, one file "
        "per rank (<ack_log>.rank<r>, its folder created)",
    )
    trainer_metrics_port: int = Field(
        9200, ge=0, le=65535, description="trainer's Prometheus port, all ranks (0 = none)"
    )
    peak_flops: float = Field(
        0.0, ge=0, description="one device's peak FLOP/s for MFU (0 = known GPUs, else none)"
    )
    wandb_log: bool = Field(False, description="log to Weights & Biases (needs wandb)")
    wandb_project: str = "maskstream"

    _expand_train_paths = field_validator("out_dir", "ack_log", mode="after")(_expand_path)

    @model_validator(mode="after")
    def _consistent_schedule(self) -> TrainSettings:
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr={self.min_lr} must not exceed learning_rate={self.learning_rate}"
            )
        return self


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
    """Values of the preset file chosen by ``load_settings``, the keys of this
    service only (a preset is shared by every service)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ below returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        return {k: v for k, v in (_preset_values.get() or {}).items() if k in fields}


class _Service(_Base):
    """Sources, first wins: command line (init kwargs), environment, preset."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), _PresetSource(settings_cls)

    @classmethod
    def groups(cls) -> list[type[_Base]]:
        """The groups this service reads, in --help order."""
        return [base for base in cls.__bases__ if base is not _Service]


# ---------------------------------------------------------------- services
# One class per service: the groups it reads, nothing else. Its --help lists
# exactly these; a key of another service is accepted and ignored.


class ProducerConfig(_Service, RunSettings, DataSettings, QueueSettings, ProducerSettings):
    """``python -m services.producer``."""


class TrainerConfig(_Service, RunSettings, QueueSettings, ModelSettings, TrainSettings):
    """``python -m services.trainer``."""


class AutoscalerConfig(_Service, RunSettings, QueueSettings, AutoscalerSettings):
    """``python -m services.autoscaler``."""


class Settings(
    _Service,
    RunSettings,
    DataSettings,
    QueueSettings,
    ProducerSettings,
    LocalSettings,
    AutoscalerSettings,
    ModelSettings,
    TrainSettings,
):
    """Every key: the local stack, which runs every service, and the benchmarks."""


S = TypeVar("S", bound=_Service)


# ------------------------------------------------------------------ loading


def known_keys() -> set[str]:
    """Every key some service reads: the keys a preset, the environment or the
    command line may name."""
    return set(Settings.model_fields)


def _unknown_key(key: str, where: str) -> SettingsError:
    close = difflib.get_close_matches(key, sorted(known_keys()), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " See --help for every setting."
    return SettingsError(f"unknown setting '{key}' ({where}).{hint}")


def parse_cli(argv: list[str]) -> tuple[dict[str, Any], bool]:
    """``--key=value`` pairs into a dict; returns (overrides, help_requested).
    A bare ``--flag`` sets a boolean to true. Values that look like JSON lists
    or objects (stages) are parsed as JSON. Any service's key is accepted."""
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
        if not value:
            raise SettingsError(
                f"--{key}= is empty: give it a value (--{key}=<value>), or leave it out for "
                "the preset's or the default"
            )
        if value[0] in "[{":
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
        if key not in known_keys():
            raise _unknown_key(key, f"preset {path}")
    return values


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else "settings"
    where = ".".join(loc)
    shown = error.get("input")
    if not loc:
        # A check across fields: its input is every value given, secrets included.
        return f"  {error.get('msg')} (check the settings it names)"
    if field in ("redis_password", "redis_url") or "password" in field:
        shown = "***"
    elif isinstance(shown, dict | list):
        shown = json.dumps(shown)[:200]
    fix = (
        f"set it with --{field}=<value>, the {field.upper()} environment variable or the preset"
        if field in known_keys()
        else "check the settings"
    )
    return f"  {where} = {shown!r}: {error.get('msg')} ({fix})"


def load_settings(
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    service: type[S] = Settings,  # type: ignore[assignment]  # the default is one S
    exit_on_help: bool = True,
) -> S:
    """Build ``service``'s settings from preset, environment and ``argv``.

    Keys of other services are accepted and ignored (one preset or one
    command line serves every service); keys no service knows are refused.
    ``env``, when given, is read instead of ``os.environ``.
    """
    argv = sys.argv[1:] if argv is None else argv
    overrides, wants_help = parse_cli(argv)
    if wants_help and exit_on_help:
        print(help_text(service))
        raise SystemExit(0)
    overrides = {k: v for k, v in overrides.items() if k in service.model_fields}
    environ = os.environ if env is None else env
    preset_name = overrides.get("preset") or environ.get("PRESET") or environ.get("preset")
    preset_values = read_preset(resolve_preset(preset_name)) if preset_name else {}
    preset_token = _preset_values.set(preset_values)
    environ_token = _environ.set(None if env is None else dict(env))
    try:
        return service(**overrides)
    except ValidationError as exc:
        lines = "\n".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"invalid settings:\n{lines}") from None
    except PydanticSettingsError as exc:
        # An environment variable of a list or table setting that is not JSON.
        field = re.search(r'field "(\w+)"', str(exc))
        name = field[1] if field else "a list or table setting"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise SettingsError(
            f"invalid settings:\n  the {name.upper()} environment variable is not valid "
            f'JSON{cause} (give {name} as JSON, e.g. {name.upper()}=\'[{{"type": "random"}}]\' '
            "for stages, or unset it)"
        ) from None
    finally:
        _preset_values.reset(preset_token)
        _environ.reset(environ_token)


def help_text(service: type[_Service] = Settings) -> str:
    lines = [
        "Settings: defaults < preset (--preset=NAME or PRESET) < environment (KEY=value)"
        " < command line (--key=value).",
    ]
    for group in service.groups():
        name = group.__name__.removesuffix("Settings").lower()
        lines.append(f"\n[{name}] {(group.__doc__ or '').strip()}")
        for key in group.__annotations__:
            if key.startswith("_"):
                continue
            info = service.model_fields[key]
            default = info.get_default(call_default_factory=True)
            if isinstance(default, Path):
                default = str(default)
            shown = json.dumps(default) if not isinstance(default, SecretStr) else '"***"'
            desc = f"  {info.description}" if info.description else ""
            lines.append(f"  --{key}={shown}{desc}")
    return "\n".join(lines)
