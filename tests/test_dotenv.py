"""deploy/docker/dotenv.sh: the stack's scripts read .env as compose does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers import REPO

DOTENV = REPO / "deploy" / "docker" / "dotenv.sh"


def bash(cwd: Path, script: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("A", "B", "C", "D", "E", "F")}
    return subprocess.run(
        ["bash", "-c", f". {DOTENV}\n{script}"],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_load_dotenv_reads_the_file_as_compose_does_and_the_shell_wins(tmp_path):
    (tmp_path / ".env").write_text(
        "A=from-file\n# B=commented\nC=\"two words\"\nD=value # a note\n export E='quoted'\r\nF=\n"
    )
    out = bash(tmp_path, 'load_dotenv; echo "$A|${B-unset}|$C|$D|$E|${F-unset}"', A="shell")
    assert out == "shell|unset|two words|value|quoted|\n"


def test_no_env_file_sets_nothing(tmp_path):
    assert bash(tmp_path, 'load_dotenv; echo "${A-unset}"') == "unset\n"


def test_dotenv_value_reads_one_value_and_exports_nothing(tmp_path):
    (tmp_path / ".env").write_text("A=1\nB=2\n")
    out = bash(tmp_path, 'echo "$(dotenv_value B)|$(dotenv_value C)|${A-unset}"', B="shell")
    assert out == "2||unset\n"


def test_set_dotenv_rewrites_its_line_in_place_and_appends_a_new_one(tmp_path):
    env = tmp_path / ".env"
    env.write_text("# settings\nA=1\nAB=keep\nB=2\n")
    env.chmod(0o600)
    bash(tmp_path, "set_dotenv A gpu,autoscale; set_dotenv C new")
    assert env.read_text() == "# settings\nA=gpu,autoscale\nAB=keep\nB=2\nC=new\n"
    assert env.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary file left


def test_make_env_puts_the_secrets_where_env_says(tmp_path):
    """SECRETS_DIR in .env (as .env.example offers) is where compose looks for the secret
    files, so make-env.sh writes them there too; with no .env it writes one first."""
    scripts = tmp_path / "deploy" / "docker"
    scripts.mkdir(parents=True)
    for name in ("make-env.sh", "dotenv.sh"):
        shutil.copy(REPO / "deploy" / "docker" / name, scripts / name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env.example")
    env = {k: v for k, v in os.environ.items() if k != "SECRETS_DIR"}

    def make_env() -> str:
        return subprocess.run(
            ["bash", str(scripts / "make-env.sh")],
            env=env, capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip

    assert "wrote .env from .env.example" in make_env()
    assert (tmp_path / ".env").read_text() == (REPO / ".env.example").read_text()
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".secrets" / "redis-trainer").is_file()

    with open(tmp_path / ".env", "a") as f:
        f.write("SECRETS_DIR=./elsewhere\n")
    make_env()
    written = sorted(p.name for p in (tmp_path / "elsewhere").iterdir())
    assert "redis-producer" in written and "grafana-admin" in written
    # A deleted secret comes back on the next run, the others stay as they were.
    kept = (tmp_path / "elsewhere" / "redis-admin").read_text()
    (tmp_path / "elsewhere" / "redis-trainer").unlink()
    assert "wrote ./elsewhere/redis-trainer" in make_env()
    assert (tmp_path / "elsewhere" / "redis-admin").read_text() == kept
