import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from shared.masking import SpanStage, StickyStage
from shared.settings import (
    AutoscalerConfig,
    ProducerConfig,
    Settings,
    SettingsError,
    TrainerConfig,
    help_text,
    load_settings,
)

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "char_diffusion_reference.json").read_text()
)
REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_preset_env_cli(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("batch_size = 3\nblock_size = 64\nn_layer = 2\nseed = 5\n")
    env = {"BLOCK_SIZE": "32", "N_LAYER": "3"}
    s = load_settings([f"--preset={preset}", "--n_layer=4"], env=env)
    assert s.max_backlog == Settings.model_fields["max_backlog"].default  # default
    assert s.batch_size == 3  # preset over default
    assert s.seed == 5
    assert s.block_size == 32  # env over preset
    assert s.n_layer == 4  # command line over env


def test_preset_from_environment(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"batch_size": 7}))
    assert load_settings([], env={"PRESET": str(preset)}).batch_size == 7


def test_char_diffusion_preset_reproduces_every_reference_value():
    s = load_settings(["--preset=char_diffusion"], env={})
    sections = dict(REFERENCE["data"], **REFERENCE["model"], **REFERENCE["training"])
    sections["corpus"] = sections.pop("dataset")
    # The model has one architecture, not a setting: what the reference names.
    assert (sections.pop("attention"), sections.pop("position_encoding")) == (
        "bidirectional",
        "rotary",
    )
    for key, value in sections.items():
        assert getattr(s, key) == value, key
    for ours, theirs in (
        (s.unmasking_stages, "unmasking_stages"),
        (s.validation_stages, "validation_stages"),
    ):
        # The reference corrupts 80/10/10, the default shares a contract leaves out.
        listed = [stage.contract_entry() for stage in ours]
        assert [{k: v for k, v in e.items() if v is not None} for e in listed] == REFERENCE[theirs]
    assert len(s.unmasking_stages) == 9 and len(s.validation_stages) == 14


def test_stages_from_command_line_json():
    s = load_settings(
        [
            '--unmasking_stages=[{"type":"span","spans_count":3},'
            '{"type":"sticky","target_masked_ratio":0.5,"p1_probability":0.2,"p2_probability":0.4}]'
        ],
        env={},
    )
    assert s.unmasking_stages == [
        SpanStage(type="span", spans_count=3),
        StickyStage(type="sticky", target_masked_ratio=0.5, p1_probability=0.2, p2_probability=0.4),
    ]
    # Without validation stages, validation uses the training stages.
    assert s.stages("val") == s.stages("train")


def test_no_stages_means_classic_bert_at_mask_probability():
    (stage,) = load_settings(["--mask_probability=0.2"], env={}).stages("train")
    assert stage.type == "bernoulli" and stage.masked_ratio == 0.2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--batch_size=-1"],
            ["batch_size", "'-1'", "greater than or equal to 1", "--batch_size="],
        ),
        (["--dtype=fp8"], ["dtype", "'fp8'", "'float32', 'bfloat16' or 'float16'"]),
        (['--unmasking_stages=[{"type":"zigzag"}]'], ["unmasking_stages", "zigzag", "'random'"]),
        (
            ['--unmasking_stages=[{"type":"sticky","p1_probability":0.1,"p2_probability":0.1}]'],
            ["target_masked_ratio", "Field required"],
        ),
        (
            ['--unmasking_stages=[{"type":"span","spans_count":2,"spans":1}]'],
            ["spans", "Extra inputs are not permitted"],
        ),
        (["--redis_url=http://x"], ["redis_url", "redis://"]),
        (["--redis_url=redis://h:notaport/0"], ["redis_url", "port must be a number"]),
        (["--redis_url=redis://h:6379/x"], ["redis_url", "database number, not 'x'"]),
        (["--redis_url=unix://"], ["redis_url", "socket's path"]),
        (["--learning_rate=inf"], ["learning_rate", "finite number"]),
        (["--rate_limit=nan"], ["rate_limit", "finite number"]),
        (["--seed=99999999999999999999999"], ["seed", "less than or equal to 4294967295"]),
        (["--out_dir="], ["--out_dir= is empty", "leave it out"]),
        (["--prometheus_url=notaurl"], ["prometheus_url", "http:// or https:// URL"]),
        (["--n_embd=100", "--n_head=8"], ["n_embd=100", "multiple of n_head=8"]),
        (["--batchsize=3"], ["unknown setting 'batchsize'", "batch_size"]),
        (["--preset=nonexistent"], ["no such preset", "char_diffusion"]),
        (["batch_size=3"], ["use --key=value"]),
        (["--seed"], ["--seed needs a value"]),
    ],
)
def test_mistakes_name_field_value_and_fix(argv, expected):
    with pytest.raises(SettingsError) as err:
        load_settings(argv, env={})
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_environment_value_is_reported():
    with pytest.raises(SettingsError, match=r"max_backlog = 'lots'"):
        load_settings([], env={"MAX_BACKLOG": "lots"})


def test_unknown_key_in_preset(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("bach_size = 3\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'bach_size'.*batch_size"):
        load_settings([f"--preset={preset}"], env={})


def test_password_never_shown(tmp_path, caplog):
    secret = "hunter2-very-secret"
    s = load_settings([], env={"REDIS_PASSWORD": secret, "REDIS_URL": f"redis://:{secret}@h:1/0"})
    assert s.redis_password.get_secret_value() == secret
    for text in (repr(s), str(s), json.dumps(s.public_dict()), s.redis_url):
        assert secret not in text
    with pytest.raises(SettingsError) as err:
        load_settings(["--redis_url=ftp://u:" + secret + "@h"], env={})
    assert secret not in str(err.value)


def test_password_file(tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    s = load_settings([f"--redis_password_file={secret_file}"], env={})
    assert s.redis_password.get_secret_value() == "from-file"


def test_help_lists_every_setting_with_default():
    text = help_text()
    for name in Settings.model_fields:
        assert f"--{name}=" in text, name
    assert "--batch_size=16" in text and "--max_backlog=256" in text


@pytest.mark.parametrize(
    ("service", "shown", "hidden"),
    [
        ("producer", ["[data]", "--batch_size=16", "[queue]", "--send_batch="], ["--n_layer="]),
        ("trainer", ["[model]", "--n_layer=8", "[train]", "--max_backlog="], ["--batch_size="]),
        ("autoscaler", ["[autoscaler]", "--min_producers="], ["--n_layer=", "--batch_size="]),
    ],
)
def test_each_service_help_lists_only_the_groups_it_reads(service, shown, hidden):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    for fragment in shown:
        assert fragment in result.stdout, fragment
    for fragment in hidden:
        assert fragment not in result.stdout, fragment


def test_every_key_belongs_to_some_service_and_nothing_is_unread():
    by_service = [ProducerConfig, TrainerConfig, AutoscalerConfig]
    union = set().union(*(cls.model_fields for cls in by_service))
    local_only = {"local_producers", "local_seconds"}  # services.local reads these
    assert union | local_only == set(Settings.model_fields)
    assert "attention" not in union and "position_encoding" not in union


def test_a_shared_preset_serves_every_service(tmp_path):
    """A producer loads a preset with model keys; each service keeps its own."""
    producer = load_settings(["--preset=tiny", "--n_layer=3"], env={}, service=ProducerConfig)
    trainer = load_settings(["--preset=tiny", "--n_layer=3"], env={}, service=TrainerConfig)
    assert producer.block_size == 128 and not hasattr(producer, "n_layer")
    assert trainer.n_layer == 3 and trainer.n_embd == 128 and not hasattr(trainer, "block_size")
    # The environment of another service is not this one's business either.
    assert load_settings([], env={"N_LAYER": "many"}, service=ProducerConfig).batch_size == 16
    with pytest.raises(SettingsError, match="n_layer = 'many'"):
        load_settings([], env={"N_LAYER": "many"}, service=TrainerConfig)
    # A key no service knows is refused everywhere, naming the closest one.
    with pytest.raises(SettingsError, match=r"unknown setting 'n_layers'.*n_layer"):
        load_settings(["--n_layers=3"], env={}, service=ProducerConfig)


def test_producer_cli_help_and_bad_config_exit_codes():
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [sys.executable, "-m", "services.producer", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert shown.returncode == 0 and "--max_backlog=256" in shown.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "services.producer", "--block_size=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert "block_size = '1'" in bad.stderr and "greater than or equal to 2" in bad.stderr


def test_summary_logging_masks_secret(caplog):
    s = load_settings([], env={"REDIS_PASSWORD": "pw-123456"})
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings %s", s.public_dict())
    assert "pw-123456" not in caplog.text


def test_password_in_url_moves_to_the_secret():
    s = load_settings([], env={"REDIS_URL": "redis://user:p%40ss@h:1/0"})
    assert s.redis_url == "redis://user@h:1/0"
    assert s.redis_password.get_secret_value() == "p@ss"


def test_an_environment_list_that_is_not_json_names_its_variable():
    with pytest.raises(SettingsError) as err:
        load_settings([], env={"UNMASKING_STAGES": "notjson"})
    message = str(err.value)
    assert "UNMASKING_STAGES environment variable is not valid JSON" in message
    assert "Expecting value" in message
