"""The stack's Redis ACL users (deploy/redis/acl.sh) on a real redis-server 7 running the
generated file: every service works as its own user, with no refusal in ACL LOG, and each
role is refused what it must never do."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from shared.redis_server import free_port
from shared.settings import password_problem
from shared.streams import PAYLOAD_FIELD, StreamKeys, connect
from tests.helpers import (
    ACL_SCRIPT,
    REPO,
    ROLES,
    SMALL_RECIPE,
    AclRedisServer,
    generate_acl,
    newest_redis_binary,
    wait_until,
    write_role_secrets,
)

KEYS = StreamKeys("maskstream")


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acl")
    secrets_dir = tmp / "secrets"
    passwords = write_role_secrets(secrets_dir)
    aclfile = generate_acl(secrets_dir, tmp / "users.acl")
    server = AclRedisServer(newest_redis_binary(), aclfile, passwords["admin"], workdir=tmp / "r")
    server.start()
    yield server, secrets_dir, passwords
    server.kill()


@pytest.fixture
def acl(acl_server):
    """(server, secrets dir, role -> password): Redis 7 running the generated users.acl,
    empty, with an empty ACL LOG."""
    server = acl_server[0]
    admin = server.client()
    admin.flushall()
    admin.acl_log_reset()
    return acl_server


def as_role(server, passwords, role: str) -> redis.Redis:
    return redis.Redis(port=server.port, username=role, password=passwords[role])


def denials(server) -> list[str]:
    """What ACL LOG recorded: '<user> <object>' for every refusal since the last reset."""
    return [f"{e['username']} {e['object']} ({e['reason']})" for e in server.client().acl_log()]


# --------------------------------------------------------------------- the file itself


def test_the_acl_file_holds_only_hashes_and_refuses_weak_passwords(tmp_path):
    passwords = write_role_secrets(tmp_path / "s")
    text = generate_acl(tmp_path / "s", tmp_path / "users.acl").read_text()
    assert all(password not in text for password in passwords.values())
    assert "user default off" in text
    for role in ROLES:
        assert f"user {role} on #" in text
    for bad, why in [
        ("change-me", "placeholder"),
        ("short-one", "at least 16"),
        ("0123456789abcdef\nuser x on nopass +@all ~*", "printable ASCII"),
        ("0123456789abcdef #comment", "printable ASCII"),
        ("0123456789abcdef>other", "printable ASCII"),
    ]:
        (tmp_path / "s" / "redis-trainer").write_text(bad)
        result = subprocess.run(
            ["sh", str(ACL_SCRIPT), str(tmp_path / "s")], capture_output=True, text=True
        )
        assert result.returncode == 2 and why in result.stderr, (bad, result.stderr)
        assert "user" not in result.stdout
    (tmp_path / "s" / "redis-trainer").write_text(passwords["trainer"])
    (tmp_path / "s" / "redis-admin").unlink()
    result = subprocess.run(["sh", str(ACL_SCRIPT), str(tmp_path / "s")], capture_output=True)
    assert result.returncode == 2 and b"redis-admin is missing" in result.stderr


@pytest.mark.parametrize(
    "password",
    [
        "0123456789abcdef!@$%^&*()",
        "a{b}[c]|~-=+.,;:?/0123456789",
        "0123456789abcdef\tx",
        "0123456789abcdef'x",
        '0123456789abcdef"x',
        "0123456789abcdef`x",
        "0123456789abcdef\\x",
        "0123456789abcdefé",
        "0123456789abcdef\x01",
        "0123456789abcdef!\r\n",  # a CRLF file: both drop the line end
        "  0123456789abcdef!  ",
        "0123456789abcdef\nx",
    ],
)
def test_acl_sh_takes_exactly_the_passwords_the_services_take(tmp_path, password):
    """A password a service accepts must load in Redis too, and one it refuses must not."""
    write_role_secrets(tmp_path / "s")
    (tmp_path / "s" / "redis-trainer").write_bytes(password.encode())
    result = subprocess.run(
        ["sh", str(ACL_SCRIPT), str(tmp_path / "s")], capture_output=True, text=True
    )
    # The services read the file stripped (shared/settings.py, redis_password_file).
    services_take = password_problem(password.strip(), "trainer") is None
    assert (result.returncode == 0) == services_take, (password, result.stderr)
    if services_take:
        digest = hashlib.sha256(password.strip().encode()).hexdigest()
        assert f"user trainer on #{digest} " in result.stdout


def test_the_default_user_is_off(acl):
    server, _, passwords = acl
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port).ping()
    with pytest.raises(redis.AuthenticationError):  # not even with a role's password
        redis.Redis(port=server.port, password=passwords["admin"]).ping()
    with pytest.raises(redis.AuthenticationError):  # nor a role with another's password
        redis.Redis(port=server.port, username="trainer", password=passwords["admin"]).ping()


# ------------------------------------------------------------------- what each role may not

EVERYONE_BUT_ADMIN = [role for role in ROLES if role != "admin"]
ADMIN_ONLY = [
    ("FLUSHALL",),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*"),
    ("ACL", "LIST"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("MONITOR",),
    ("SET", "other:key", "x"),  # outside the namespace
    ("GET", "other:key"),
]
FORBIDDEN = [
    *[(role, command) for role in EVERYONE_BUT_ADMIN for command in ADMIN_ONLY],
    # The trainer consumes the training stream but never writes entries into it, nor
    # the contract, the validation set or the producers' bookkeeping.
    ("trainer", ("XADD", KEYS.train, "*", "d", "x")),
    ("trainer", ("SET", KEYS.meta, "{}")),
    ("trainer", ("DEL", KEYS.meta)),
    ("trainer", ("XADD", KEYS.val, "*", "d", "x")),
    ("trainer", ("DEL", KEYS.train)),
    ("trainer", ("XTRIM", KEYS.train, "MAXLEN", "0")),
    ("trainer", ("XGROUP", "DESTROY", KEYS.train, "g")),
    ("trainer", ("XGROUP", "SETID", KEYS.train, "g", "$")),
    ("trainer", ("HSET", KEYS.produced, "0", "9")),
    ("trainer", ("XREADGROUP", "GROUP", "g", "c", "STREAMS", KEYS.dead, ">")),
    # Producers add; they never consume, acknowledge or delete entries.
    ("producer", ("XDEL", KEYS.train, "0-1")),
    ("producer", ("XACK", KEYS.train, "g", "0-1")),
    ("producer", ("XREADGROUP", "GROUP", "g", "c", "STREAMS", KEYS.train, ">")),
    ("producer", ("XGROUP", "CREATE", KEYS.train, "g", "0")),
    ("producer", ("XTRIM", KEYS.train, "MAXLEN", "0")),
    ("producer", ("SET", KEYS.stage, "3")),
    ("producer", ("XADD", KEYS.dead, "*", "d", "x")),
    ("producer", ("FUNCTION", "FLUSH")),
    ("producer", ("SCRIPT", "FLUSH")),
    # The exporter and the autoscaler write nothing.
    ("exporter", ("SET", KEYS.meta, "{}")),
    ("exporter", ("XADD", KEYS.train, "*", "d", "x")),
    ("exporter", ("XADD", KEYS.dead, "*", "d", "x")),
    ("exporter", ("DEL", KEYS.train)),
    ("exporter", ("XGROUP", "CREATE", KEYS.train, "g", "0", "MKSTREAM")),
    ("exporter", ("CONFIG", "RESETSTAT")),
    ("exporter", ("GET", KEYS.meta)),  # it reads streams' shapes, not their data
    ("exporter", ("XRANGE", KEYS.train, "-", "+")),
    ("autoscaler", ("XADD", KEYS.train, "*", "d", "x")),
    ("autoscaler", ("SET", KEYS.stage, "1")),
    ("autoscaler", ("XRANGE", KEYS.train, "-", "+")),
    ("autoscaler", ("GET", KEYS.meta)),
]


@pytest.mark.parametrize(
    ("role", "command"), FORBIDDEN, ids=[f"{r}-{' '.join(c[:2])}" for r, c in FORBIDDEN]
)
def test_each_role_is_refused_what_it_must_not_do(acl, role, command):
    server, _, passwords = acl
    admin = server.client()
    admin.xadd(KEYS.train, {PAYLOAD_FIELD: b"x"}, id="0-1")
    admin.set(KEYS.meta, "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_role(server, passwords, role).execute_command(*command)
    # Nothing changed: the entry, the contract and the user list are as they were.
    assert admin.xlen(KEYS.train) == 1 and admin.get(KEYS.meta) == b"{}"
    assert sorted(u.split()[1] for u in admin.acl_list()) == sorted(["default", *ROLES])
    assert admin.dbsize() == 2


def test_admin_may_do_everything(acl):
    server, _, passwords = acl
    admin = as_role(server, passwords, "admin")
    admin.set("other:key", "x")
    assert admin.keys("*") == [b"other:key"]
    assert admin.acl_whoami() == "admin"
    admin.config_set("maxmemory", "0")


# ------------------------------------------------------------- every service as its role


def test_every_service_works_as_its_own_user(acl, shakespeare, start_producer, tmp_path):
    """Real producer and trainer processes, the autoscaler's read and (where Debian's
    prometheus-redis-exporter is installed) the exporter, each with its user and password
    file: they do their work and Redis refuses none of them anything (ACL LOG stays empty)."""
    server, secrets_dir, passwords = acl
    common = [f"--redis_url={server.url}", f"--corpus_path={shakespeare}", *SMALL_RECIPE]

    def role_args(role: str) -> list[str]:
        return [f"--redis_username={role}", f"--redis_password_file={secrets_dir}/redis-{role}"]

    producers = [
        start_producer(*common, *role_args("producer"), "--max_backlog=32", "--metrics_port=0")
        for _ in range(2)
    ]
    admin = server.client()
    wait_until(lambda: admin.get(KEYS.val_done), 60, "the validation set")
    log = tmp_path / "trainer.log"
    with open(log, "w") as out:
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.trainer",
                *common,
                *role_args("trainer"),
                "--max_iters=12",
                "--eval_interval=6",
                "--trainer_metrics_port=0",
                f"--out_dir={tmp_path / 'run'}",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        ).returncode
    assert code == 0, log.read_text()[-3000:]
    assert (tmp_path / "run" / "ckpt.pt").exists()
    (group,) = admin.xinfo_groups(KEYS.train)  # the trainer's, which read 12 steps' batches
    assert group["entries-read"] - group["pending"] >= 12, group  # acked (and deleted)

    # The autoscaler's only Redis call: XLEN of the training stream.
    scaler = connect(server.url, passwords["autoscaler"], username="autoscaler")
    assert scaler.xlen(KEYS.train) == admin.xlen(KEYS.train)

    exporter = shutil.which("prometheus-redis-exporter") or shutil.which("redis_exporter")
    if exporter:
        metrics = scrape_exporter(exporter, server, passwords["exporter"], tmp_path)
        assert "redis_up 1" in metrics
        assert f'redis_stream_length{{db="db0",stream="{KEYS.train}"}}' in metrics
        assert f'redis_stream_groups{{db="db0",stream="{KEYS.train}"}} 1' in metrics

    assert [p.terminate() for p in producers] == [0, 0]
    assert denials(server) == []


def scrape_exporter(binary: str, server, password: str, tmp_path: Path) -> str:
    """One scrape of the exporter as the stack runs it (user exporter, the JSON password
    file the compose stack mounts)."""
    addr = f"redis://127.0.0.1:{server.port}"
    password_file = tmp_path / "exporter.json"
    password_file.write_text(json.dumps({addr: password}))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--redis.addr={addr}",
            "--redis.user=exporter",
            f"--redis.password-file={password_file}",
            f"--check-single-streams={KEYS.train},{KEYS.val},{KEYS.dead}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return None

        return wait_until(scrape, 20, "the exporter's /metrics")
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_service_under_the_wrong_role_exits_2_naming_user_and_command(
    acl, shakespeare, start_producer
):
    server, secrets_dir, _ = acl
    producer = start_producer(
        f"--redis_url={server.url}",
        f"--corpus_path={shakespeare}",
        *SMALL_RECIPE,
        "--redis_username=autoscaler",
        f"--redis_password_file={secrets_dir}/redis-autoscaler",
        "--metrics_port=0",
    )
    assert producer.wait(60) == 2
    out = producer.output()
    assert "user 'autoscaler'" in out and "'get' command" in out and "ACL LOG" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize(
    ("password", "username", "why"),
    [
        ("change-me", None, "placeholder"),
        ("Change-Me", "producer", "placeholder"),
        ("0123456789abcdef 0123", "producer", "whitespace"),
        ("0123456789abcdef#0123", "producer", "# < >"),
        ("0123456789abcdef>0123", "producer", "# < >"),
        ("0123456789\nabcdef0123", "producer", "whitespace"),
        ("short-but-ok", "producer", "at least 16"),
    ],
)
def test_services_refuse_placeholder_weak_and_unsafe_passwords(tmp_path, password, username, why):
    from shared.settings import SettingsError, load_settings

    secret = tmp_path / "pw"
    secret.write_text(password)
    args = [f"--redis_password_file={secret}"]
    if username:
        args.append(f"--redis_username={username}")
    with pytest.raises(SettingsError, match=f"redis_password_file: .*{why}") as err:
        load_settings(args, env={})
    if why != "placeholder":
        assert password not in str(err.value)


def test_the_autoscaler_refused_by_redis_exits_2_naming_its_user(acl, tmp_path):
    """A wrong password or an unknown user stops the autoscaler at start (exit 2, the user
    named), instead of retrying a login forever as if Redis were down."""
    server, secrets_dir, _ = acl
    (tmp_path / "wrong").write_text("0123456789abcdef0123456789abcdef")
    for user, password_file, said in [
        ("autoscaler", tmp_path / "wrong", "refused the credentials of user 'autoscaler'"),
        ("nobody", secrets_dir / "redis-autoscaler", "refused the credentials of user 'nobody'"),
    ]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.autoscaler",
                "--dry_run",
                f"--redis_url={server.url}",
                f"--redis_username={user}",
                f"--redis_password_file={password_file}",
                "--prometheus_url=http://127.0.0.1:9/",
                "--autoscaler_metrics_port=0",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "DOCKER_HOST": "unix:///nonexistent"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_clients_may_announce_themselves_where_redis_knows_how(tmp_path):
    """Redis 7.2+ gets CLIENT SETINFO for every role (redis-py sends it on connect); 7.0,
    which has no such subcommand and would refuse to load the file, does not."""
    write_role_secrets(tmp_path)
    for version, expected in (("7.0", 0), ("7.2", 4), ("7.4", 4), ("8.0", 4)):
        text = subprocess.run(
            ["sh", str(ACL_SCRIPT), str(tmp_path)],
            env={**os.environ, "REDIS_VERSION": version},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert text.count("+client|setinfo") == expected, version


def test_a_crash_loses_no_transaction_written_by_a_role(tmp_path):
    """Redis replays its append-only file as a client with the `default` user's permissions,
    and EXEC re-checks them (Redis 7.0): were `default` allowed nothing, every MULTI/EXEC in
    the AOF (each producer send: XADDs and its sequence number) would be dropped on
    reload, silently. `default` stays off, so nobody can act as it, but holds every
    permission: a SIGKILL and a restart from the AOF keep every transaction."""
    passwords = write_role_secrets(tmp_path / "s")
    aclfile = generate_acl(tmp_path / "s", tmp_path / "users.acl")
    server = AclRedisServer(
        newest_redis_binary(), aclfile, passwords["admin"], workdir=tmp_path / "r"
    )
    server.extra_args += ["--appendonly", "yes", "--appendfsync", "always"]
    server.start()
    try:
        producer = as_role(server, passwords, "producer")
        for seq in range(3):
            pipe = producer.pipeline(transaction=True)
            pipe.xadd(KEYS.train, {"d": b"x"})
            pipe.hset(KEYS.produced, "0", seq)
            pipe.execute()
        producer.set(KEYS.meta, "{}")  # outside a transaction
        server.restart()  # SIGKILL, then a start that replays the AOF
        admin = server.client()
        assert admin.get(KEYS.meta) == b"{}"
        assert admin.xlen(KEYS.train) == 3 and admin.hget(KEYS.produced, "0") == b"2"
        assert "NOPERM" not in server.log.read_text()
        with pytest.raises(redis.AuthenticationError):  # and still nobody is `default`
            redis.Redis(port=server.port).set("maskstream:meta", "x")
    finally:
        server.kill()
