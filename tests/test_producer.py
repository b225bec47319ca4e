"""The producer service as real processes against a real redis-server."""

import json
import os
import signal
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from services.producer.loop import BatchMaker
from services.producer.providers.char_diffusion import CharDiffusionProvider
from shared.codec import decode
from shared.contract import schema_of
from shared.settings import load_settings
from shared.streams import PAYLOAD_FIELD, StreamKeys
from tests.helpers import wait_until

KEYS = StreamKeys("maskstream")


def common(redis_url: str, corpus) -> list[str]:
    return [f"--redis_url={redis_url}", f"--corpus_path={corpus}", "--log_interval_s=1"]


def entries(client, key):
    return [(entry_id, decode(fields[PAYLOAD_FIELD])) for entry_id, fields in client.xrange(key)]


def test_two_producers_unique_ids_disjoint_streams_one_validation_set(
    redis7, shakespeare, start_producer
):
    args = [*common(redis7.url, shakespeare), "--preset=char_diffusion", "--max_backlog=400"]
    producers = [start_producer(*args, "--val_batches=20") for _ in range(2)]
    client = redis7.client()
    wait_until(lambda: client.hlen(KEYS.produced) == 2, 60, "both producers sending")
    wait_until(lambda: client.get(KEYS.val_done), 30, "the validation set")
    assert [p.terminate() for p in producers] == [0, 0]

    meta = json.loads(client.get(KEYS.meta))
    batches = [batch for _, batch in entries(client, KEYS.train)]
    by_producer = defaultdict(list)
    for batch in batches:
        assert batch.fingerprint == meta["fingerprint"]
        by_producer[batch.producer].append(batch.seq)
    assert sorted(by_producer) == [0, 1]
    for seqs in by_producer.values():  # each producer's sequence is 0, 1, 2, ...
        assert seqs == list(range(len(seqs)))
    # Disjoint random streams: no two batches share windows and masks.
    fingerprints = {batch.tensors["input"].tobytes() for batch in batches}
    assert len(fingerprints) == len(batches)

    logs = [p.output() for p in producers]
    assert sum("wrote the validation set" in log for log in logs) == 1
    val = entries(client, KEYS.val)
    assert len(val) == 20
    assert [b.seq for _, b in val] == list(range(20)) and {b.split for _, b in val} == {"val"}
    # Validation batches spread evenly over the 14 validation stages.
    counts = np.bincount([b.stage for _, b in val], minlength=14)
    assert counts.min() >= 1 and counts.max() <= 2


def test_batches_are_reproducible_from_seed_producer_and_seq(redis7, shakespeare, start_producer):
    proc = start_producer(
        *common(redis7.url, shakespeare), "--preset=char_diffusion", "--max_backlog=12"
    )
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 12, 60, "12 entries")
    assert proc.terminate() == 0
    settings = load_settings(["--preset=char_diffusion", f"--corpus_path={shakespeare}"], env={})
    meta = json.loads(client.get(KEYS.meta))
    maker = BatchMaker(
        CharDiffusionProvider(settings), meta["fingerprint"], settings.seed, 0, "train"
    )
    for _, batch in entries(client, KEYS.train):
        again = maker.make(batch.seq)
        assert again.stage == batch.stage
        for name in ("input", "labels"):
            np.testing.assert_array_equal(again.tensors[name], batch.tensors[name])
    assert schema_of(meta)["input"].shape == (16, 1024)


def test_follows_the_active_stage(redis7, small_corpus, start_producer):
    client = redis7.client()
    stages = json.dumps(
        [
            {"type": "random", "max_masked_ratio": 0.5},
            {"type": "span", "spans_count": 2},
            {
                "type": "sticky",
                "target_masked_ratio": 0.5,
                "p1_probability": 0.2,
                "p2_probability": 0.5,
            },
        ]
    )
    proc = start_producer(
        *common(redis7.url, small_corpus),
        "--use_all_stages_for_training=false",
        f"--unmasking_stages={stages}",
        "--batch_size=2",
        "--block_size=32",
        "--max_backlog=4",
        "--send_batch=1",
        "--stage_poll_interval_s=0.1",
    )

    def stages_after_draining() -> set[int]:
        client.delete(KEYS.train)  # consume everything
        wait_until(lambda: client.xlen(KEYS.train) >= 4, 20, "new entries")
        return {batch.stage for _, batch in entries(client, KEYS.train)}

    wait_until(lambda: client.xlen(KEYS.train) >= 4, 60, "the first entries")
    assert {b.stage for _, b in entries(client, KEYS.train)} == {0}
    client.set(KEYS.stage, 2)
    wait_until(lambda: stages_after_draining() == {2}, 20, "batches of stage 2")
    assert "following active stage 2" in proc.output()
    assert proc.terminate() == 0


def test_sigterm_stops_cleanly_without_partial_entries(redis7, shakespeare, start_producer):
    proc = start_producer(
        *common(redis7.url, shakespeare), "--preset=char_diffusion", "--max_backlog=100000"
    )
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 50, 60, "production in full swing")
    started = time.monotonic()
    assert proc.terminate() == 0  # SIGTERM mid-stream
    assert time.monotonic() - started < 10
    produced = entries(client, KEYS.train)  # every entry decodes completely
    assert [b.seq for _, b in produced] == list(range(len(produced)))
    output = proc.output()
    assert "SIGTERM received" in output
    assert f"stopped after {len(produced)} batches" in output
    assert client.get(KEYS.producer_lease(0)) is None  # lease released


def test_sigint_also_stops(redis7, small_corpus, start_producer):
    proc = start_producer(*common(redis7.url, small_corpus), "--block_size=32", "--max_backlog=8")
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 8, 60, "a full backlog")
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 0


def test_foreign_contract_refused_with_differences(redis7, small_corpus, start_producer):
    first = start_producer(*common(redis7.url, small_corpus), "--block_size=32", "--max_backlog=8")
    client = redis7.client()
    wait_until(lambda: client.get(KEYS.meta), 60, "the contract")
    second = start_producer(*common(redis7.url, small_corpus), "--block_size=64", "--max_backlog=8")
    assert second.wait() == 3
    assert "refusing to mix data" in second.output()
    assert "block_size: 32 -> 64" in second.output()
    assert first.proc.poll() is None  # the first keeps going
    assert first.terminate() == 0


def test_survives_redis_restart(redis7, small_corpus, start_producer):
    proc = start_producer(
        *common(redis7.url, small_corpus), "--block_size=32", "--max_backlog=20", "--val_batches=3"
    )
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 20, 60, "a full backlog")
    redis7.restart()  # SIGKILL and an empty server on the same port
    client = redis7.client()
    # The producer reconnects, restores the contract and validation set, and
    # goes on with the same id and its next sequence numbers.
    wait_until(lambda: client.xlen(KEYS.train) >= 20, 60, "production after the restart")
    wait_until(lambda: client.get(KEYS.val_done), 30, "the restored validation set")
    assert client.get(KEYS.meta) is not None
    assert client.xlen(KEYS.val) == 3
    after = [batch for _, batch in entries(client, KEYS.train)]
    assert {b.producer for b in after} == {0}
    assert min(b.seq for b in after) >= 20
    assert proc.proc.poll() is None
    assert proc.terminate() == 0
    assert "reconnected to Redis" in proc.output() or "lost Redis" in proc.output()


def test_remakes_batches_a_replayed_redis_lost(redis7, small_corpus, start_producer):
    """A host crash can cost Redis its last second of AOF: the newest entries and
    the producer's record of them. On reconnecting, the producer starts again
    after the last sequence number Redis has and makes the lost batches again,
    identical, so no sequence number is missing."""
    proc = start_producer(
        *common(redis7.url, small_corpus), "--block_size=32", "--max_backlog=20", "--val_batches=3"
    )
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 20, 60, "a full backlog")
    newest = client.xrevrange(KEYS.train, count=5)
    lost = {decode(fields[PAYLOAD_FIELD]).seq: fields for _, fields in newest}
    # What a replayed AOF missing its last second looks like, and the producer's
    # connection gone with the old server (frozen meanwhile, as it is while
    # Redis restarts).
    proc.proc.send_signal(signal.SIGSTOP)
    pipe = client.pipeline(transaction=True)
    pipe.xdel(KEYS.train, *[entry_id for entry_id, _ in newest])
    pipe.hset(KEYS.produced, "0", min(lost) - 1)
    pipe.execute()
    client.client_kill_filter(_type="normal", skipme=True)
    proc.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: client.xlen(KEYS.train) >= 20, 60, "the lost batches made again")
    again = {b.seq: b for _, b in entries(client, KEYS.train)}
    for seq, fields in lost.items():
        before = decode(fields[PAYLOAD_FIELD])
        assert seq in again, f"seq {seq} was not made again"
        for name, array in before.tensors.items():
            assert np.array_equal(again[seq].tensors[name], array), (seq, name)
    seqs = sorted(again)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap
    assert proc.terminate() == 0
    assert "making" in proc.output()


@pytest.mark.slow
def test_backpressure_bounds_backlog_and_memory(redis7, shakespeare, start_producer):
    """Three producers, no consumer: the stream never passes max_backlog and
    Redis memory stays within 1.3 x max_backlog x message size, sampled from
    before the producers start (the filling phase included) to the end."""
    seconds = float(os.environ.get("BACKPRESSURE_SECONDS", "60"))
    # Large enough that Redis's fixed costs (client buffers of the four
    # connections, scripts, the validation entry: about 0.5 MB) do not dominate.
    bound = 1024
    client = redis7.client()
    baseline = client.info("memory")
    samples: list[tuple[int, int, int]] = []  # (XLEN, used_memory, used_memory_dataset)
    done = threading.Event()

    def sample() -> None:
        sampler = redis7.client()
        while not done.is_set():
            memory = sampler.info("memory")
            samples.append(
                (sampler.xlen(KEYS.train), memory["used_memory"], memory["used_memory_dataset"])
            )
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    args = [
        *common(redis7.url, shakespeare),
        "--preset=char_diffusion",
        f"--max_backlog={bound}",
        "--val_batches=1",
    ]
    producers = [start_producer(*args) for _ in range(3)]
    try:
        wait_until(lambda: client.xlen(KEYS.train) >= bound, 60, "a full backlog")
        time.sleep(seconds)  # the observation window: sampling runs meanwhile
    finally:
        done.set()
        sampler.join()
    assert [p.proc.poll() for p in producers] == [None] * 3  # all still running
    message_size = len(client.xrange(KEYS.train, count=1)[0][1][PAYLOAD_FIELD])
    longest = max(xlen for xlen, _, _ in samples)
    budget = bound * message_size
    ratio = (max(used for _, used, _ in samples) - baseline["used_memory"]) / budget
    dataset = (max(d for _, _, d in samples) - baseline["used_memory_dataset"]) / budget
    print(
        f"{len(samples)} samples: backlog max {longest}/{bound}; peak growth of used_memory "
        f"{ratio:.3f}, of used_memory_dataset {dataset:.3f} x max_backlog x {message_size} B"
    )
    assert longest == bound
    assert ratio <= 1.3
    assert [p.terminate() for p in producers] == [0, 0, 0]
    assert all("waiting on backpressure" in p.output() for p in producers)
