"""Producer benchmark on one core: masking + encoding, the torch baseline, the
codec and Redis, all measured in the same run so that the ratios compare like
with like.

Run from the repository root::

    python -m benchmarks.bench_producer            # ~3 s per measurement
    python -m benchmarks.bench_producer --quick    # ~0.5 s per measurement

Every figure is the median of ``--repeats`` timed runs (after a warm-up) of a
fixed duration each; the spread column is half the range of the repeats,
relative to the median. The process pins itself to the first core it may use
(a producer replica is sized as one core); the private redis-server gets the
other cores where there are any.
"""

from __future__ import annotations

import os

# Thread pools size themselves when numpy (and, in the baseline, torch) load:
# cap them before those imports, since the benchmark measures a single core.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import redis

from benchmarks.handwritten_decoder import decode_handwritten
from services.producer.loop import BatchMaker, contract_of
from services.producer.providers.char_diffusion import CharDiffusionProvider
from shared.codec import decode, encode
from shared.contract import make_meta
from shared.corpus import download_corpus
from shared.redis_server import RedisServer
from shared.settings import TINYSHAKESPEARE_SHA256, TINYSHAKESPEARE_URL, Settings, load_settings
from shared.streams import PAYLOAD_FIELD, BoundedStream, StreamKeys, add_unbounded, connect
from shared.validation import EntryValidator

REPO = Path(__file__).resolve().parents[1]
CACHED_CORPUS = Path("~/.cache/maskstream/tinyshakespeare.txt").expanduser()
DEFAULT_REDIS = "/usr/bin/redis-server"

# Redis is measured in rounds of this many messages (~8 MB at the reference
# size); the stream is deleted between rounds, untimed, so memory stays small.
REDIS_ROUND = 256
# Codec and memcpy operations per timed step: long enough that reading the
# clock twice per step is noise next to the work.
CODEC_OPS_PER_STEP = 100

# Acceptance targets.
TARGET_SPEEDUP = 20.0
TARGET_SIZE_RATIO = 6.0
TARGET_REDIS_RATIO = 0.7


# ------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Rate:
    """Items per second: the median of the repeats and their spread."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> str:
        return f"±{50.0 * (self.high - self.low) / self.median:.1f}%"


class Timer:
    """Runs a step repeatedly for a fixed duration, several times, and keeps
    the median rate. ``step`` returns how many items it processed; ``untimed``
    (cleanup such as deleting a stream) runs after each step off the clock."""

    def __init__(self, seconds: float, repeats: int) -> None:
        self.seconds, self.repeats = seconds, repeats
        self.warmup_s = min(0.5, seconds / 3)

    def rate(self, step: Callable[[], int], untimed: Callable[[], object] | None = None) -> Rate:
        self._run(step, untimed, self.warmup_s)
        rates = sorted(self._run(step, untimed, self.seconds) for _ in range(self.repeats))
        return Rate(statistics.median(rates), rates[0], rates[-1])

    @staticmethod
    def _run(
        step: Callable[[], int], untimed: Callable[[], object] | None, seconds: float
    ) -> float:
        done, spent = 0, 0.0
        while spent < seconds or done == 0:
            start = time.perf_counter()
            done += step()
            spent += time.perf_counter() - start
            if untimed is not None:
                untimed()
        return done / spent


# ---------------------------------------------------------------- printing


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    print(f"\n== {title} ==")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def ratio(value: float) -> str:
    return f"{value:,.2f}x" if value < 10 else f"{value:,.1f}x"


# ------------------------------------------------------------ set-up steps


def pin_to_one_core() -> tuple[int, set[int]]:
    """Pin this process to its first allowed core; return it and the rest.

    Done before any thread is started (torch starts its pools lazily, in the
    baseline), so every later thread inherits the pin."""
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    os.sched_setaffinity(0, {core})
    return core, allowed - {core}


def find_corpus(explicit: str | None) -> Path:
    """--corpus, else $TINYSHAKESPEARE, else the shared data folder beside the
    repository, else the download cache, else a verified download."""
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get("TINYSHAKESPEARE")
    if from_env:
        return Path(from_env).expanduser()
    for candidate in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt", CACHED_CORPUS):
        if candidate.is_file():
            return candidate
    return download_corpus(
        TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, CACHED_CORPUS.parent, "tinyshakespeare"
    )


class ProducerPath:
    """Our producer's batch path, ``BatchMaker.make`` then ``codec.encode``, with
    the stage spread over all training stages exactly as the producer does."""

    def __init__(self, corpus: Path, *overrides: str) -> None:
        argv = ["--preset=char_diffusion", f"--corpus_path={corpus}", *overrides]
        self.settings: Settings = load_settings(argv, env={})
        self.provider = CharDiffusionProvider(self.settings)
        meta = make_meta(contract_of(self.settings, self.provider), "bench_producer")
        self.fingerprint: str = meta["fingerprint"]
        self.maker = BatchMaker(self.provider, self.fingerprint, self.settings.seed, 1, "train")
        self.stage_count = self.provider.stage_count("train")
        self.seq = 0

    @property
    def shape(self) -> str:
        return f"{self.settings.batch_size} x {self.settings.block_size}"

    @property
    def tokens_per_batch(self) -> int:
        return self.settings.batch_size * self.settings.block_size

    def next_payload(self) -> bytes:
        payload = encode(self.maker.make(self.seq))
        self.seq += 1
        return payload

    def stage_cycle(self) -> int:
        """One batch of every stage (sequence numbers are aligned to the stage
        cycle), so slow sticky and fast span stages weigh as in production."""
        for _ in range(self.stage_count):
            self.next_payload()
        return self.stage_count


# ---------------------------------------------------------- 1. production


@dataclass(frozen=True)
class PathResult:
    path: ProducerPath
    rate: Rate
    message_bytes: int


def measure_producer_path(timer: Timer, path: ProducerPath) -> PathResult:
    size = len(path.next_payload())
    path.seq = 0
    return PathResult(path, timer.rate(path.stage_cycle), size)


def report_producer_paths(results: list[PathResult]) -> None:
    rows = []
    for label, r in zip(("reference recipe", "small blocks"), results, strict=True):
        per_s = r.rate.median
        rows.append(
            [
                label,
                r.path.shape,
                num(per_s, 1),
                num(per_s * r.path.tokens_per_batch / 1e6, 2),
                num(per_s * r.message_bytes / 1e6, 1),
                num(r.message_bytes),
                r.rate.spread,
            ]
        )
    table(
        f"1. Masking + encoding (BatchMaker.make + codec.encode; "
        f"{results[0].path.stage_count} stages, spread over all)",
        ["case", "B x T", "batches/s", "Mtokens/s", "MB/s", "msg bytes", "spread"],
        rows,
    )


# ------------------------------------------------------------ 2. baseline


@dataclass(frozen=True)
class BaselineResult:
    name: str
    rate: Rate
    file_bytes: int
    torch_version: str


def measure_baseline(
    timer: Timer, corpus: Path, settings: Settings, per_token: bool
) -> BaselineResult:
    """A torch provider writing pickled .pt files: masking in per-token Python
    loops (the single-machine pipeline this project replaces) or vectorized per
    sample (a stronger baseline). Imported here so that only this measurement
    loads torch (the producer does not depend on it)."""
    from benchmarks.torch_baseline import (
        TORCH_VERSION,
        PerTokenReferenceProducer,
        TorchReferenceProducer,
        check_batch,
    )

    stages = settings.stages("train")
    cls = PerTokenReferenceProducer if per_token else TorchReferenceProducer
    producer = cls(
        corpus.read_text(encoding="utf-8"),
        stages,
        batch_size=settings.batch_size,
        block_size=settings.block_size,
        seed=settings.seed,
        train_val_split=settings.train_val_split,
    )
    for index, stage in enumerate(stages):
        check_batch(producer.make_batch(index), stage, producer.mask_id)
    with tempfile.TemporaryDirectory(prefix="maskstream-bench-pt-") as tmp:
        directory = Path(tmp)
        written: list[Path] = []
        sizes: list[int] = []

        def stage_cycle() -> int:
            written.extend(producer.produce(directory) for _ in stages)
            return len(stages)

        def consume() -> None:  # the trainer's side of the file queue, off the clock
            sizes.extend(p.stat().st_size for p in written)
            for p in written:
                p.unlink()
            written.clear()

        rate = timer.rate(stage_cycle, consume)
    name = (
        "reference: torch, per-token loops, .pt file"
        if per_token
        else "torch, vectorized per sample, .pt file"
    )
    return BaselineResult(name, rate, round(statistics.median(sizes)), TORCH_VERSION)


def report_baselines(ours: PathResult, bases: list[BaselineResult]) -> list[float]:
    """Prints both baselines beside ours; returns our speedup over each."""
    tokens = ours.path.tokens_per_batch
    rows = [
        [
            "ours: numpy masking + msgpack message",
            num(ours.rate.median, 1),
            num(ours.rate.median * tokens / 1e6, 2),
            num(ours.message_bytes),
            "1.00x",
            ours.rate.spread,
        ]
    ]
    speedups = []
    for base in bases:
        speedups.append(ours.rate.median / base.rate.median)
        rows.append(
            [
                base.name,
                num(base.rate.median, 1),
                num(base.rate.median * tokens / 1e6, 3),
                num(base.file_bytes),
                ratio(speedups[-1]),
                base.rate.spread,
            ]
        )
    table(
        f"2. Ours vs torch baselines ({ours.path.shape}, one thread, "
        f"torch {bases[0].torch_version})",
        ["producer", "batches/s", "Mtokens/s", "bytes/batch", "ours is", "spread"],
        rows,
    )
    return speedups


# --------------------------------------------------------------- 3. codec


def measure_codec(timer: Timer, path: ProducerPath) -> dict[str, tuple[Rate, int]]:
    """encode / decode of a real masked batch beside memcpy of as many bytes.
    Decode checks fingerprint and schema, as the trainer does."""
    batch = path.maker.make(path.seq)
    payload = encode(batch)
    schema = path.provider.schema()
    source = np.frombuffer(payload, dtype=np.uint8)
    target = np.empty_like(source)

    def repeat(op: Callable[[], object]) -> Callable[[], int]:
        def step() -> int:
            for _ in range(CODEC_OPS_PER_STEP):
                op()
            return CODEC_OPS_PER_STEP

        return step

    meta = {
        "fingerprint": path.fingerprint,
        "schema": {k: v.to_json() for k, v in schema.items()},
        **path.provider.meta(),
        "stages": {"train": [{}] * path.provider.stage_count("train"), "val": [{}]},
    }
    validator = EntryValidator(meta, "train", max_bytes=64 * 2**20)
    fields = {PAYLOAD_FIELD: payload}
    ops: dict[str, Callable[[], object]] = {
        "codec.encode": lambda: encode(batch),
        "codec.decode (msgpack C unpacker, limits, fingerprint + schema)": lambda: decode(
            payload, fingerprint=path.fingerprint, schema=schema
        ),
        "hand-written pure-Python reader (the previous decoder)": lambda: decode_handwritten(
            payload, fingerprint=path.fingerprint, schema=schema
        ),
        "every consumer check (EntryValidator.check: decode + tokens)": lambda: validator.check(
            fields
        ),
        "numpy memcpy (np.copyto)": lambda: np.copyto(target, source),
    }
    return {name: (timer.rate(repeat(op)), len(payload)) for name, op in ops.items()}


def report_codec(results: dict[str, tuple[Rate, int]]) -> None:
    memcpy_rate, size = results["numpy memcpy (np.copyto)"]
    rows = []
    for name, (rate, nbytes) in results.items():
        rows.append(
            [
                name,
                num(1e6 / rate.median, 2),
                num(rate.median * nbytes / 1e9, 2),
                ratio(rate.median / memcpy_rate.median),
                rate.spread,
            ]
        )
    table(
        f"3. Codec on one reference-size message ({num(size)} bytes)",
        ["operation", "µs/msg", "GB/s", "vs memcpy", "spread"],
        rows,
    )
    fast = results["codec.decode (msgpack C unpacker, limits, fingerprint + schema)"][0].median
    slow = results["hand-written pure-Python reader (the previous decoder)"][0].median
    print(
        f"the msgpack C unpacker decodes {fast / slow:.1f}x as fast as the hand-written reader "
        "(which returned zero-copy views); the codec uses it, with one copy of each tensor"
    )


# --------------------------------------------------------------- 4. Redis


@dataclass(frozen=True)
class RedisResult:
    rates: dict[str, Rate]
    message_bytes: float
    version: str


def measure_redis(timer: Timer, path: ProducerPath, url: str) -> RedisResult:
    """(a) our send path, (b) raw pipelined XADD of as many random bytes, (c) the
    producer loop's core: make + encode + send, in chunks of send_batch."""
    client = connect(url)
    keys = StreamKeys("bench")
    key = keys.train
    chunk = path.settings.send_batch
    stream = BoundedStream(  # never at its bound
        client, key, 10**12, produced_key=keys.produced, reserved_key=keys.reserved
    )
    producer_id = path.maker.producer_id

    def send(payloads: list[bytes], first_seq: int) -> int:
        return stream.add(payloads, producer_id, first_seq)

    messages = [path.next_payload() for _ in range(REDIS_ROUND)]
    chunks = [messages[i : i + chunk] for i in range(0, REDIS_ROUND, chunk)]
    raw_chunks = [[os.urandom(len(m)) for m in c] for c in chunks]
    # Every send carries fresh sequence numbers: re-sent ones would be skipped.
    sent_seq = 0

    def bounded() -> int:
        nonlocal sent_seq
        for c in chunks:
            if send(c, sent_seq) != len(c):
                raise RuntimeError("BoundedStream refused entries below its bound")
            sent_seq += len(c)
        return REDIS_ROUND

    def raw() -> int:
        for c in raw_chunks:
            add_unbounded(client, key, c)
        return REDIS_ROUND

    def end_to_end() -> int:
        for _ in range(REDIS_ROUND // chunk):
            first_seq = path.seq
            send([path.next_payload() for _ in range(chunk)], first_seq)
        return REDIS_ROUND

    # Off the clock: drop the stream and the per-producer sequence hash so
    # Redis memory stays at one round.
    scratch_keys = [key, keys.produced, keys.reserved]

    def reset() -> None:
        client.delete(*scratch_keys)

    try:
        rates = {
            "(a) BoundedStream send path, pre-encoded": timer.rate(bounded, reset),
            "(b) raw pipelined XADD (add_unbounded)": timer.rate(raw, reset),
            "(c) end to end: make + encode + send": timer.rate(end_to_end, reset),
        }
        version = client.info("server")["redis_version"]
    finally:
        reset()
        client.close()
    mean_bytes = statistics.fmean(len(m) for m in messages)
    return RedisResult(rates, mean_bytes, version)


def report_redis(result: RedisResult, chunk: int, redis_cores: set[int]) -> float:
    rows = [
        [name, num(rate.median, 1), num(rate.median * result.message_bytes / 1e6, 1), rate.spread]
        for name, rate in result.rates.items()
    ]
    table(
        f"4. Redis {result.version} on loopback (cores {sorted(redis_cores)}; chunks of {chunk}, "
        f"{num(result.message_bytes)} B messages)",
        ["path", "msgs/s", "MB/s", "spread"],
        rows,
    )
    a, b, _ = result.rates.values()
    send_ratio = a.median / b.median
    print(
        f"(a) calls BoundedStream.add(chunk, producer, first_seq) as Producer does; "
        f"(a)/(b): {send_ratio:.2f}"
    )
    return send_ratio


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="tinyshakespeare text (default: see find_corpus)")
    parser.add_argument("--quick", action="store_true", help="~0.5 s per measurement")
    parser.add_argument("--seconds", type=float, help="seconds per repeat (default 3, quick 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; median reported")
    parser.add_argument(
        "--redis-server",
        default=DEFAULT_REDIS if os.path.exists(DEFAULT_REDIS) else shutil.which("redis-server"),
        help=f"redis-server binary (default {DEFAULT_REDIS})",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails")
    return parser.parse_args(argv)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.redis_server:
        raise SystemExit("no redis-server found; pass --redis-server=PATH")
    core, other_cores = pin_to_one_core()
    redis_cores = other_cores or {core}
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    timer = Timer(seconds, args.repeats)
    corpus = find_corpus(args.corpus)
    print(
        f"maskstream producer benchmark: pinned to core {core}; "
        f"{seconds:g} s x {args.repeats} repeats (median), warm-up {timer.warmup_s:.2g} s\n"
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"msgpack {'.'.join(map(str, msgpack.version))}, redis-py {redis.__version__}\n"
        f"corpus {corpus}"
    )

    reference = ProducerPath(corpus)
    small = ProducerPath(corpus, "--batch_size=64", "--block_size=256")
    paths = [measure_producer_path(timer, p) for p in (reference, small)]
    report_producer_paths(paths)

    bases = [
        measure_baseline(timer, corpus, reference.settings, per_token)
        for per_token in (True, False)
    ]
    speedup, vectorized_speedup = report_baselines(paths[0], bases)
    size_ratio = bases[0].file_bytes / paths[0].message_bytes

    report_codec(measure_codec(timer, reference))

    with RedisServer(args.redis_server, cores=redis_cores) as server:
        redis_result = measure_redis(timer, reference, server.url)
    send_ratio = report_redis(redis_result, reference.settings.send_batch, redis_cores)

    checks = [
        (
            speedup >= TARGET_SPEEDUP,
            f"throughput: ours {num(paths[0].rate.median, 1)} vs the per-token reference "
            f"{num(bases[0].rate.median, 2)} batches/s = {ratio(speedup)} "
            f"(target >= {TARGET_SPEEDUP:g}x; vs the vectorized torch baseline: "
            f"{ratio(vectorized_speedup)})",
        ),
        (
            size_ratio >= TARGET_SIZE_RATIO,
            f"size: reference .pt {num(bases[0].file_bytes)} B vs our message "
            f"{num(paths[0].message_bytes)} B = {ratio(size_ratio)} "
            f"(target >= {TARGET_SIZE_RATIO:g}x)",
        ),
        (
            send_ratio >= TARGET_REDIS_RATIO,
            f"Redis send: BoundedStream.add / raw XADD = {send_ratio:.2f} "
            f"(target >= {TARGET_REDIS_RATIO:g})",
        ),
    ]
    print("\n== Summary ==")
    for passed, text in checks:
        print(f"{verdict(passed)}  {text}")
    return 1 if args.strict and not all(passed for passed, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
