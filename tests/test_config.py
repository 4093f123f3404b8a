"""Training configs: every shipped file validates; mistakes are reported all at once, with valid keys."""

import re
from pathlib import Path

import pytest
import yaml

from phonetune.data.errors import PhonetuneError
from phonetune.data.locales import LOCALES
from phonetune.train.config import (
    SECTIONS,
    Config,
    config_differences,
    config_to_dict,
    dump_config,
    load_config,
    shipped_recipes,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
REQUIRED = ["data.prepared_dir=/prep", "run.output_dir=/nonexistent/run"]
# What a recipe needs on the command line besides REQUIRED.
ALSO_REQUIRED = {"adapter_tiny.yaml": ["model.name_or_path=/exports/base"]}

# Common Voice 6.1 locales (the release the paper fine-tuned on).
CV61_LOCALES = set(
    "ab ar as br ca cnh cs cv cy de dv el en eo es et eu fa fi fr fy-NL ga-IE hsb ia id it ja ka kab ky "
    "lg lt lv mn mt nl or pa-IN pl pt rm-sursilv rm-vallader ro ru rw sah sl sv-SE ta th tr tt uk vi vot "
    "zh-CN zh-HK zh-TW".split()
)


def test_shipped_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"xlsr53_espeak_cv.yaml", "tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path, [*REQUIRED, *ALSO_REQUIRED.get(path.name, [])])
    assert isinstance(config, Config)
    # The file names every key of every section it has, so nothing is left to a silent default.
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(raw) <= {*SECTIONS, "resume"}
    for section, values in raw.items():
        if isinstance(values, dict):
            assert set(values) == set(config_to_dict(config)[section]), f"{path.name}: {section}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_value_of_shipped_configs_is_commented(path):
    uncommented = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and "#" not in value:  # a leaf value with no comment
            uncommented.append(f"{number}: {stripped}")
    assert not uncommented, f"{path.name} has values without a comment:\n" + "\n".join(uncommented)


def test_xlsr_recipe_follows_fairseq_and_lists_espeak_cv61_locales():
    config = load_config(Path(__file__).parents[1] / "configs" / "xlsr53_espeak_cv.yaml", REQUIRED)
    assert config.model.name_or_path == "facebook/wav2vec2-large-xlsr-53"
    assert config.train.lr_schedule == "tri_stage"
    assert (config.train.warmup_ratio, config.train.hold_ratio) == (0.1, 0.4)
    assert config.train.final_lr_scale == 0.05
    assert config.model.mask_time_prob == 0.75 and config.model.mask_feature_prob == 0.25
    assert config.model.mask_feature_length == 64 and config.model.layerdrop == 0.1
    assert config.train.freeze_finetune_updates == 10000 and config.train.batch_seconds == 80.0
    assert config.train.betas == [0.9, 0.98]
    locales = config.data.locales
    assert len(locales) == len(set(locales))
    assert set(locales) <= CV61_LOCALES and set(locales) <= set(LOCALES)
    assert set(locales) == CV61_LOCALES & set(LOCALES)
    text = (Path(__file__).parents[1] / "configs" / "xlsr53_espeak_cv.yaml").read_text(
        encoding="utf-8"
    )
    assert "reconstruction" in text


def test_overrides_are_yaml_scalars_with_dotted_keys(tmp_path):
    config = load_config(
        Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml",
        REQUIRED
        + [
            "train.max_steps=40",
            "train.lr=2e-3",
            "train.betas=[0.8, 0.9]",
            "log.progress_bar=false",
            "model.config.hidden_size=64",
            "data.locales=[en, fr]",
            "resume=auto",
            "data.eval_max_utterances=null",
        ],
    )
    assert config.train.max_steps == 40 and config.train.lr == 2e-3
    assert config.train.betas == [0.8, 0.9]
    assert config.log.progress_bar is False
    assert config.model.config["hidden_size"] == 64
    assert config.data.locales == ["en", "fr"]
    assert config.resume == "auto"
    assert config.data.eval_max_utterances is None
    assert config.data.prepared_dir == "/prep"


def test_yes_no_on_off_are_words_on_the_command_line_and_named_in_files(tmp_path):
    # PyYAML reads no/yes/on/off as booleans (YAML 1.1); train.mixed_precision=no means "no".
    config = load_config(None, ["model.config={}", *REQUIRED, "train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
    with pytest.raises(
        PhonetuneError, match=r"log\.progress_bar must be true or false \(got 'off'\)"
    ):
        load_config(None, ["model.config={}", *REQUIRED, "log.progress_bar=off"])
    path = tmp_path / "config.yaml"
    path.write_text("model: {config: {}}\ntrain: {mixed_precision: no}\n", encoding="utf-8")
    with pytest.raises(PhonetuneError, match="train.mixed_precision must be a string.*quote it"):
        load_config(path, REQUIRED)


def test_integers_are_accepted_for_floats_but_not_bools_for_integers():
    config = load_config(None, ["model.config={}", *REQUIRED, "train.lr=1", "data.max_duration=10"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    with pytest.raises(PhonetuneError, match=r"train\.max_steps must be an integer"):
        load_config(None, ["model.config={}", *REQUIRED, "train.max_steps=true"])


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(PhonetuneError) as error:
        load_config(None, ["model.config={}", *REQUIRED, "train.learning_rate=1e-3"])
    message = str(error.value)
    assert "unknown key train.learning_rate" in message
    assert "valid keys in train:" in message and "lr" in message and "max_steps" in message


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.max_step=3", "did you mean train.max_steps?"),  # a typo
        ("train.layerdrop=0.1", "did you mean model.layerdrop?"),  # the wrong section
        ("max_steps=3", "did you mean train.max_steps?"),  # no section
        ("trian.lr=1", "did you mean train?"),  # a misspelt section
    ],
)
def test_an_unknown_key_suggests_the_nearest_valid_one(override, suggestion):
    with pytest.raises(PhonetuneError) as error:
        load_config(None, ["model.config={}", *REQUIRED, override])
    assert suggestion in str(error.value)


def test_an_unknown_key_far_from_every_valid_one_suggests_nothing():
    with pytest.raises(PhonetuneError) as error:
        load_config(None, ["model.config={}", *REQUIRED, "train.zzzzqqq=1"])
    assert "did you mean" not in str(error.value)


def test_shipped_recipes_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in ("tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu.yaml"):
        assert load_config(name, REQUIRED).model.config["hidden_size"] == 192, name
    assert shipped_recipes().keys() == {
        "tiny_cpu",
        "xlsr53_espeak_cv",
        "zero_shot_tiny",
        "adapter_tiny",
    }
    assert all(description for description in shipped_recipes().values())
    # A file of that name in the working folder is the user's and wins.
    (tmp_path / "tiny_cpu.yaml").write_text("train: {max_steps: 7}\nmodel: {config: {}}\n")
    assert load_config("tiny_cpu.yaml", REQUIRED).train.max_steps == 7
    with pytest.raises(PhonetuneError, match="Shipped recipes .*tiny_cpu, xlsr53_espeak_cv"):
        load_config("tiny_gpu", REQUIRED)


def test_unknown_section_names_the_sections():
    with pytest.raises(
        PhonetuneError, match=r"unknown key 'optim'.*data, model, train, run, log, resume"
    ):
        load_config(None, ["model.config={}", *REQUIRED, "optim.lr=1"])


def test_all_problems_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model:\n  name_or_path: facebook/wav2vec2-large-xlsr-53\n  config: {hidden_size: 64}\n"
        "  mask_time_prob: 1.5\n"
        "train:\n  warmup_ratio: 0.7\n  hold_ratio: 0.5\n  max_steps: seven\n  batch_seconds: 5\n"
        "  mixed_precision: fp8\n  typo_key: 1\n  ctc_implementation: cudnn\n"
        "log:\n  report_to: [mlflow]\n",
        encoding="utf-8",
    )
    with pytest.raises(PhonetuneError) as error:
        load_config(path)
    message = str(error.value)
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    expected = [
        r"train\.max_steps must be an integer",
        r"unknown key train\.typo_key",
        r"data\.prepared_dir is required",
        r"run\.output_dir is required",
        r"exactly one of model\.name_or_path .* both are set",
        r"model\.mask_time_prob must be in \[0, 1\)",
        r"warmup_ratio \+ train\.hold_ratio = 1\.2 exceeds 1",
        r"train\.batch_seconds \(5\.0\) is smaller than data\.max_duration",
        r"train\.mixed_precision must be one of",
        r"train\.ctc_implementation must be one of pytorch, triton, not 'cudnn'",
        r"unknown reporter 'mlflow'",
    ]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), (
            f"missing {pattern!r} in:\n{message}"
        )
    assert str(path) in message


def test_model_config_rejects_unknown_and_misplaced_keys():
    with pytest.raises(PhonetuneError) as error:
        load_config(
            None, [*REQUIRED, "model.config.hidden_sise=64", "model.config.mask_time_prob=0.5"]
        )
    message = str(error.value)
    assert "model.config.hidden_sise is not a Wav2Vec2Config argument" in message
    assert "model.config.mask_time_prob: set model.mask_time_prob instead" in message


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(PhonetuneError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(PhonetuneError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(PhonetuneError, match="not of the form key=value"):
        load_config(None, ["model.config={}", *REQUIRED, "train.max_steps"])
    with pytest.raises(PhonetuneError, match="is a folder: give one of its YAML recipes"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  lr: \xff\xfe\n")
    with pytest.raises(PhonetuneError, match=r"is not UTF-8 text \(byte 0xff at offset 13\)"):
        load_config(binary)


def test_resolved_config_round_trips_and_differences_are_listed(tmp_path):
    config = load_config(Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml", REQUIRED)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(config)
    changed = load_config(path, ["train.eval_steps=7", "model.config.hidden_size=32"])
    differences = {
        key for key, _, _ in config_differences(config_to_dict(config), config_to_dict(changed))
    }
    assert differences == {"train.eval_steps", "model.config"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1e-4", r"train\.lr must be positive, not -0\.0001"),
        ("train.lr=0", r"train\.lr must be positive, not 0\.0"),
        ("train.batch_seconds=0", r"train\.batch_seconds must be positive, not 0\.0"),
        ("model.mask_time_prob=-0.1", r"model\.mask_time_prob must be in \[0, 1\), not -0\.1"),
        ("model.mask_feature_prob=1", r"model\.mask_feature_prob must be in \[0, 1\), not 1\.0"),
        ("train.lr=.nan", r"train\.lr must be a finite number \(got nan\)"),
        ("train.lr=nan", r"train\.lr must be a finite number \(got nan\)"),
        ("train.lr=.inf", r"train\.lr must be a finite number \(got inf\)"),
        ("data.max_duration=-.inf", r"data\.max_duration must be a finite number"),
        ("train.grad_accum=0", r"train\.grad_accum must be at least 1, not 0"),
        ("train.betas=[0.9, 1.5]", r"train\.betas must be two numbers in \[0, 1\)"),
        (
            "model.mask_feature_length=100",
            r"model\.mask_feature_length \(100\) is longer than the 64 feature channels",
        ),
    ],
)
def test_impossible_values_are_named_with_their_limits(override, message):
    tiny = Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml"
    overrides = [*REQUIRED, "model.config.hidden_size=64", "model.mask_feature_prob=0.1", override]
    with pytest.raises(PhonetuneError, match=message):
        load_config(tiny, overrides)


def test_a_file_as_run_directory_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(PhonetuneError, match=r"run\.output_dir=.*run is a file: give a folder"):
        load_config(
            None,
            ["model.config={}", "data.prepared_dir=/prep", f"run.output_dir={tmp_path / 'run'}"],
        )
