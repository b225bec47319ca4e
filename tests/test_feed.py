"""The trainer's feed against a real redis-server and a real producer: acks
are sent by their own thread, never in the step's, and what goes wrong there
reaches the training loop."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch
from redis.exceptions import NoPermissionError

from services.trainer import feed as feed_module
from services.trainer.train import Dist, Trainer, wait_for_contract
from shared.settings import TrainerConfig, load_settings
from shared.streams import StreamKeys, connect
from tests.helpers import SMALL_RECIPE, wait_until

pytestmark = pytest.mark.slow

KEYS = StreamKeys("maskstream")


def started_trainer(redis7, shakespeare, start_producer, tmp_path, entries=12, *options):
    """A CPU trainer whose feed is started, over ``entries`` a stopped producer left."""
    producer = start_producer(
        f"--redis_url={redis7.url}",
        *SMALL_RECIPE,
        f"--corpus_path={shakespeare}",
        "--metrics_port=0",
        f"--max_backlog={entries}",
    )
    client = connect(redis7.url, block_s=1.0)
    wait_until(lambda: client.xlen(KEYS.train) >= entries, 60, f"{entries} training entries")
    producer.terminate()
    meta = wait_for_contract(client, KEYS, threading.Event())
    settings = load_settings(
        [
            f"--redis_url={redis7.url}",
            *SMALL_RECIPE,
            f"--out_dir={tmp_path / 'run'}",
            "--trainer_metrics_port=0",
            *options,
        ],
        env={},
        service=TrainerConfig,
    )
    trainer = Trainer(
        settings,
        threading.Event(),
        meta,
        client=client,
        dist_info=Dist(),
        device=torch.device("cpu"),
    )
    trainer.feed.start()
    return trainer


@pytest.fixture
def trainer(redis7, shakespeare, start_producer, tmp_path):
    trainer = started_trainer(redis7, shakespeare, start_producer, tmp_path)
    yield trainer
    trainer.feed.close()


def pending_ids(trainer) -> set[bytes]:
    rows = trainer.client.xpending_range(
        KEYS.train, trainer.s.run_name, min="-", max="+", count=100
    )
    return {row["message_id"] for row in rows}


def test_an_ack_returns_while_redis_is_frozen_and_is_sent_once_it_thaws(trainer, redis7):
    feed, client = trainer.feed, trainer.client
    first = [feed.next().entry_id for _ in range(2)]
    second = [feed.next().entry_id for _ in range(2)]
    assert set(first + second) <= pending_ids(trainer)

    redis7.proc.send_signal(signal.SIGSTOP)
    try:
        # Two steps' acks while Redis answers nothing: the caller (the thread that
        # launches the steps) goes on at once, whatever the socket timeout is.
        caller = threading.Thread(target=lambda: (feed.ack(first), feed.ack(second)))
        caller.start()
        caller.join(timeout=5)
        returned = not caller.is_alive()
        assert feed.acked == 0  # nothing could have been sent
    finally:
        redis7.proc.send_signal(signal.SIGCONT)
    assert returned, "ack() waited for the frozen Redis"

    feed.flush()  # returns once both steps' entries are acked
    assert feed.acked == 4 and feed.double_acks == 0
    assert not set(first + second) & pending_ids(trainer)
    for entry_id in first + second:  # and deleted: the stream's length is the backlog
        assert client.xrange(KEYS.train, entry_id, entry_id) == []


def test_an_entry_acked_twice_counts_as_a_double_ack(trainer):
    feed = trainer.feed
    ids = [feed.next().entry_id for _ in range(3)]
    feed.ack(ids)
    feed.ack(ids[:1])
    feed.flush()
    assert (feed.acked, feed.double_acks) == (3, 1)


def test_a_refused_ack_is_raised_to_the_training_loop(trainer):
    """Permissions withdrawn while training: the acker's error is the training
    loop's, as the same exception (the trainer's exit code depends on it)."""
    feed, client = trainer.feed, trainer.client
    ids = [feed.next().entry_id for _ in range(2)]
    client.execute_command("ACL", "SETUSER", "default", "-xack")
    feed.ack(ids)
    with pytest.raises(NoPermissionError):
        feed.flush()
    with pytest.raises(NoPermissionError):
        feed.ack(ids)
    assert feed.acked == 0
    client.execute_command("ACL", "SETUSER", "default", "+xack")
    assert set(ids) <= pending_ids(trainer)  # still pending: delivered again after a restart


def test_close_sends_what_is_queued(trainer):
    feed = trainer.feed
    ids = [feed.next().entry_id for _ in range(3)]
    feed.ack(ids)
    feed.close()
    assert feed.acked == 3
    assert not set(ids) & pending_ids(trainer)
    with pytest.raises(RuntimeError, match="after close"):  # never queued where nobody sends
        feed.ack(ids)


class DeviceStep:
    """Stands in for the CUDA event recorded after a step (no GPU here):
    ``synchronize`` notes that the host waited for the device to run it."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def synchronize(self) -> None:
        self.log.append(("waited", self.name))


class RecordingFeed:
    def __init__(self, log: list) -> None:
        self.log = log

    def ack(self, entry_ids: list[bytes]) -> None:
        self.log.append(("ack", entry_ids))

    def flush(self) -> None:
        self.log.append(("flush",))

    def close(self) -> None:
        pass


def test_alone_on_a_gpu_a_step_is_acked_once_the_device_has_run_it(trainer):
    """The single-GPU rule: step N's entries are acked after the host waited
    for step N's end, which it does once step N+1 is queued."""
    trainer.feed.close()
    log: list = []
    trainer.feed = RecordingFeed(log)
    trainer._ack_after_previous_step([b"1-0"], DeviceStep("step 1", log))
    assert log == []  # step 1 is queued, perhaps not run: nothing acked, no wait
    trainer._ack_after_previous_step([b"2-0"], DeviceStep("step 2", log))
    assert log == [("waited", "step 1"), ("ack", [b"1-0"])]
    trainer._ack_after_previous_step([b"3-0"], DeviceStep("step 3", log))
    assert log[2:] == [("waited", "step 2"), ("ack", [b"2-0"])]
    assert trainer.unacked_prev == [b"3-0"]  # the last step's: acked at the checkpoint


def test_steps_go_on_from_the_read_ahead_while_redis_is_frozen(trainer, redis7):
    """What the trainer already holds, it trains on with Redis frozen: neither
    the acks nor anything else in the step waits for Redis."""
    wait_until(lambda: trainer.feed._queue.qsize() >= 3, 30, "3 entries read ahead")
    losses: list[float] = []
    redis7.proc.send_signal(signal.SIGSTOP)
    try:
        steps = threading.Thread(
            target=lambda: losses.extend(trainer.train_step().item() for _ in range(3))
        )
        steps.start()
        steps.join(timeout=30)  # a step here takes well under a second
        finished = not steps.is_alive()
    finally:
        redis7.proc.send_signal(signal.SIGCONT)
    assert finished, "a step waited for the frozen Redis"
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    trainer.feed.flush()
    assert trainer.feed.acked == 3


def test_entries_whose_read_reply_was_lost_are_taken_again_while_the_trainer_runs(
    redis7, shakespeare, start_producer, tmp_path, monkeypatch
):
    """A read that Redis ran but whose reply never arrived (a reset connection, which the
    client's own retry hides) leaves entries in this consumer's pending list that no one
    holds. No other consumer may take them while it lives: the feed itself must."""
    monkeypatch.setattr(feed_module, "ORPHAN_SWEEP_S", 0.5)
    trainer = started_trainer(
        redis7, shakespeare, start_producer, tmp_path, 24, "--prefetch_batches=2"
    )
    try:
        feed, client, group = trainer.feed, trainer.client, trainer.s.run_name
        wait_until(lambda: len(pending_ids(trainer)) == 4, 30, "the feed's read-ahead")
        # The lost reply: rank0 is delivered three entries that never reach its feed.
        lost = client.xreadgroup(group, "rank0", {KEYS.train: ">"}, count=3)[0][1]
        lost_ids = {entry_id for entry_id, _ in lost}
        everything = {entry_id for entry_id, _ in client.xrange(KEYS.train)}
        got = []
        give_up = threading.Event()
        threading.Timer(30, give_up.set).start()  # fail, not hang, if they never come
        for _ in range(24):
            mb = feed.next(give_up)
            assert mb is not None, f"{len(got)} of 24 entries in 30 s; lost: {lost_ids}"
            got.append(mb.entry_id)
            feed.ack([mb.entry_id])
        feed.flush()
        assert set(got) == everything and len(got) == 24  # each once, the lost ones included
        assert lost_ids <= set(got) and feed.reclaimed >= 3
        assert pending_ids(trainer) == set() and client.xlen(KEYS.train) == 0
    finally:
        trainer.feed.close()


def test_a_group_recreated_mid_run_serves_no_entry_twice(trainer):
    """XGROUP DESTROY (an admin's, or a Redis restarted from an old file): the feed re-creates
    the group from id 0, which delivers again the entries already handed to training. Their
    steps' acks cover them; handing them out twice would train on them twice."""
    feed, client, group = trainer.feed, trainer.client, trainer.s.run_name
    first = [feed.next().entry_id for _ in range(2)]
    client.xgroup_destroy(KEYS.train, group)
    give_up = threading.Event()
    threading.Timer(20, give_up.set).start()
    got = list(first)
    while len(got) < 12 and (mb := feed.next(give_up)) is not None:
        got.append(mb.entry_id)
    assert len(got) == 12 and len(set(got)) == 12, got
    quiet = threading.Event()
    threading.Timer(3, quiet.set).start()  # the feed re-read the new group meanwhile
    assert feed.next(quiet) is None
    feed.ack(got)
    feed.flush()
    assert pending_ids(trainer) == set() and client.xlen(KEYS.train) == 0
