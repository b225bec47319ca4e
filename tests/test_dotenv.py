"""deploy/docker/dotenv.sh: the stack's scripts read .env as compose does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

DOTENV = REPO / "deploy" / "docker" / "dotenv.sh"


def bash(cwd: Path, script: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("A", "B", "C", "D", "E", "F")}
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n. {DOTENV}\n{script}"],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_dotenv_value_reads_the_file_as_compose_does(tmp_path):
    (tmp_path / ".env").write_text(
        'A=first\n# B=commented\nC="two words"\nD=value # a note\n'
        " export E='quoted' # note\r\nF=\nA=last\nG=\"keep # this\"\n"
    )
    script = 'for k in A B C D E F G; do printf "%s|" "$(dotenv_value $k)"; done'
    assert bash(tmp_path, script) == "last||two words|value|quoted||keep # this|"


def test_nothing_is_exported_and_no_file_means_no_value(tmp_path):
    assert bash(tmp_path, 'printf "[%s]" "$(dotenv_value A)"') == "[]"
    (tmp_path / ".env").write_text("A=1\n")
    assert bash(tmp_path, 'dotenv_value A >/dev/null; printf "%s" "${A-unset}"') == "unset"


def test_setting_takes_the_shell_then_the_file_then_the_default(tmp_path):
    (tmp_path / ".env").write_text("A=file\nB=file\n")
    script = 'printf "%s|%s|%s" "$(setting A d)" "$(setting B d)" "$(setting C d)"'
    assert bash(tmp_path, script, A="shell") == "shell|file|d"


def test_set_dotenv_rewrites_its_line_in_place_and_appends_a_new_one(tmp_path):
    env = tmp_path / ".env"
    env.write_text("# settings\nA=1\nAB=keep\nexport B=2\nC=3")  # no final newline
    env.chmod(0o600)
    bash(tmp_path, r"set_dotenv A 'gpu,autoscale'; set_dotenv B 'x\y&z'; set_dotenv D new")
    assert env.read_text() == "# settings\nA=gpu,autoscale\nAB=keep\nB=x\\y&z\nC=3\nD=new\n"
    assert env.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary file left


@pytest.mark.parametrize(
    ("profiles", "gpu"),
    [("cpu", "gpu"), ("", "gpu"), ("gpu", "gpu"), ("cpu,autoscale", "gpu,autoscale"),
     ("autoscale,gpu,cpu", "gpu,autoscale")],
)  # fmt: skip
def test_the_gpu_trainer_takes_the_cpu_ones_place_among_the_profiles(tmp_path, profiles, gpu):
    # Under pipefail: a grep that keeps nothing must not end the script.
    assert bash(tmp_path, f'with_trainer gpu "{profiles}"; echo " reached"') == f"{gpu} reached\n"


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
