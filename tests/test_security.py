"""Nothing a user hands phonetune can run code, leave the corpus, or leak a credential.

- Weights are read from safetensors; any `.pt`/`.bin` pickle goes through `weights_only=True`, so a
  planted pickle is refused with a clear error and its payload never runs (checked with a payload
  that is shown to work when unpickled the unsafe way).
- The package source never unpickles, never uses yaml.load, never trusts remote code.
- Paths from TSVs cannot name a file outside `<locale>/clips`.
- A wandb API key in the environment is written to none of the run's files.
"""

import ast
import json
import os
import secrets
import shutil
from pathlib import Path

import pytest
import torch
from helpers import MICRO, config

from phonetune.data.commonvoice import resolve_clip_path
from phonetune.data.errors import PhonetuneError
from phonetune.train import checkpoint as ckpt
from phonetune.train.loop import train

ROOT = Path(__file__).parents[1]
SOURCE_DIRS = ("data", "train", "configs", "scripts")


class Payload:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    """A `.pt` file as torch.save writes one, whose unpickling would create `marker`."""
    path.unlink(missing_ok=True)
    torch.save({"state": Payload(marker), "param_groups": []}, path)


def test_the_payload_runs_when_unpickled_the_unsafe_way(tmp_path):
    """The planted files below are live: loading one without weights_only runs its code."""
    marker = tmp_path / "ran"
    plant_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what phonetune never does
    assert marker.exists()


# --- a real checkpoint with planted files ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(prepared_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("secure") / "run"
    train(config(prepared_dir, run, *MICRO, "train.max_steps=2", "train.save_steps=2"))
    assert (run / "checkpoints" / "step_2" / "optimizer.pt").is_file()
    return run


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "checkpoints" / "step_2"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_pickle_planted_in_a_checkpoint_is_refused_on_resume(
    trained_run, prepared_dir, tmp_path, name
):
    run, step = copy_run(trained_run, tmp_path)
    marker = tmp_path / "ran"
    plant_pickle(step / name, marker)
    resumed = config(prepared_dir, run, *MICRO, "train.max_steps=3", "resume=auto")
    with pytest.raises(PhonetuneError, match=rf"{name} holds objects other than tensors"):
        train(resumed)
    assert not marker.exists()


def test_planted_pickle_through_the_cli_exits_2_without_traceback(
    trained_run, prepared_dir, tmp_path, capsys
):
    from phonetune.cli import main

    run, step = copy_run(trained_run, tmp_path)
    marker = tmp_path / "ran"
    plant_pickle(step / "optimizer.pt", marker)
    resumed = [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run}", *MICRO]
    overrides = [*resumed, "train.batch_seconds=12", "data.max_duration=12", "resume=auto"]
    code = main(["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "optimizer.pt holds objects other than tensors" in err and "resume=PATH" in err
    assert not marker.exists()


def test_pytorch_model_bin_planted_in_a_checkpoint_is_never_read(
    trained_run, prepared_dir, tmp_path
):
    from phonetune.infer.export import export_model
    from phonetune.infer.recognize import load_model

    run, step = copy_run(trained_run, tmp_path)
    marker = tmp_path / "ran"
    (step / "model" / "model.safetensors").unlink()
    plant_pickle(step / "model" / "pytorch_model.bin", marker)
    # phonetune's checkpoints hold safetensors only: another weights file there is never opened
    only_safetensors = "cannot load the model weights of .*no file named model.safetensors"
    with pytest.raises(PhonetuneError, match="no checkpoint .*model.safetensors is missing"):
        train(config(prepared_dir, run, *MICRO, "train.max_steps=3", "resume=auto"))
    with pytest.raises(PhonetuneError, match=only_safetensors):
        export_model(run, tmp_path / "export", verbose=False)
    assert not (tmp_path / "export").exists()
    with pytest.raises(PhonetuneError, match="holds objects other than tensors"):
        load_model(run)  # evaluate / transcribe: a .bin is allowed there, read weights_only
    assert not marker.exists()


def test_pytorch_model_bin_planted_as_a_pretrained_model_is_refused(trained_run, tmp_path):
    from phonetune.infer.recognize import load_model
    from phonetune.train.config import ModelConfig
    from phonetune.train.model import build_model

    step = trained_run / "checkpoints" / "step_2"
    folder = tmp_path / "downloaded"
    folder.mkdir()
    shutil.copy(step / "model" / "config.json", folder / "config.json")
    shutil.copy(step / "vocab.json", folder / "vocab.json")
    marker = tmp_path / "ran"
    plant_pickle(folder / "pytorch_model.bin", marker)
    vocab = ckpt.read_checkpoint_vocab(step)
    with pytest.raises(PhonetuneError, match="pytorch_model.bin holds objects other than tensors"):
        build_model(ModelConfig(name_or_path=str(folder)), vocab)
    with pytest.raises(PhonetuneError, match="pytorch_model.bin holds objects other than tensors"):
        load_model(folder)  # an export-style folder given to evaluate / transcribe
    assert not marker.exists()


# --- the source ------------------------------------------------------------------------------------
UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("yaml", "load"),
    ("yaml", "load_all"),
    ("yaml", "full_load"),
    ("yaml", "unsafe_load"),
    ("yaml", "unsafe_load_all"),
}
UNSAFE_NAMES = {("yaml", "Loader"), ("yaml", "FullLoader"), ("yaml", "UnsafeLoader")}


def find_unsafe_loading(source: str, filename: str) -> list[str]:
    """Every place in `source` that could unpickle, load unsafe YAML or run remote code."""
    tree = ast.parse(source, filename)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    called = {id(call.func) for call in calls}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            if pair in UNSAFE_CALLS or pair in UNSAFE_NAMES:
                problems.append(f"{filename}:{node.lineno}: {pair[0]}.{pair[1]}")
            elif pair == ("torch", "load") and id(node) not in called:
                problems.append(f"{filename}:{node.lineno}: torch.load passed around")
    for call in calls:
        where = f"{filename}:{call.lineno}"
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) == ("torch", "load")
            and not _is_constant(keywords.get("weights_only"), True)
        ):
            problems.append(f"{where}: torch.load without weights_only=True")
        for name, safe in (("trust_remote_code", False), ("allow_pickle", False)):
            if name in keywords and not _is_constant(keywords[name], safe):
                problems.append(f"{where}: {name} other than {safe}")
        if "weights_only" in keywords and not _is_constant(keywords["weights_only"], True):
            problems.append(f"{where}: weights_only other than True")
        if "use_safetensors" in keywords and _is_constant(keywords["use_safetensors"], False):
            problems.append(f"{where}: use_safetensors=False")
    return problems


def _is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_checker_finds_each_unsafe_pattern():
    unsafe = """
import pickle, torch, yaml, numpy as np
pickle.loads(data)
torch.load(path)
torch.load(path, weights_only=False)
f = torch.load
yaml.load(text, Loader=yaml.Loader)
model = Auto.from_pretrained(name, trust_remote_code=True)
np.load(path, allow_pickle=True)
Auto.from_pretrained(name, use_safetensors=False)
"""
    problems = find_unsafe_loading(unsafe, "example.py")
    flagged = {int(problem.split(":")[1]) for problem in problems}
    assert flagged == set(range(3, 11)), problems  # every line but the import
    safe = "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\n"
    assert find_unsafe_loading(safe, "example.py") == []


def test_package_source_never_unpickles_or_trusts_remote_code():
    files = [path for folder in SOURCE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    for path in files:
        problems += find_unsafe_loading(
            path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))
        )
    assert problems == []


# --- paths from TSVs --------------------------------------------------------------------------------
def test_tsv_paths_cannot_name_a_file_outside_the_clips_folder(tmp_path):
    clips = tmp_path / "cv" / "en" / "clips"
    (clips / "sub").mkdir(parents=True)
    (clips / "a.mp3").write_bytes(b"x")
    (clips / "sub" / "b.mp3").write_bytes(b"x")
    (tmp_path / "cv" / "en" / "train.tsv").write_text("secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.mp3").write_bytes(b"x")
    os.symlink(tmp_path / "outside", clips / "door")
    os.symlink(tmp_path / "outside" / "c.mp3", clips / "c.mp3")
    assert resolve_clip_path(clips, "a.mp3") == (clips / "a.mp3").resolve()
    assert resolve_clip_path(clips, "sub/b.mp3") == (clips / "sub" / "b.mp3").resolve()
    assert resolve_clip_path(clips, "sub/../a.mp3") == (clips / "a.mp3").resolve()
    for escaping in (
        "../train.tsv",
        "sub/../../train.tsv",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        str(clips / "a.mp3"),  # absolute, even when inside
        "door/c.mp3",
        "c.mp3",
        "a.mp3\x00.txt",
        ".",
        "",
    ):
        assert resolve_clip_path(clips, escaping) is None, escaping


# --- credentials -------------------------------------------------------------------------------------
def test_wandb_api_key_is_written_to_no_file_of_the_run(prepared_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    key = "phonetunetest" + secrets.token_hex(14)  # 40 characters, like a real key
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    overrides = ["train.max_steps=2", "train.save_steps=2", "train.eval_steps=2"]
    train(config(prepared_dir, run, *MICRO, *overrides, "log.report_to=[wandb]"))
    # wandb really ran (offline), so its files are among those searched
    assert list((run / "wandb").glob("offline-run-*")), sorted(p.name for p in run.iterdir())
    assert (run / "checkpoints" / "step_2" / "optimizer.pt").is_file()
    searched = [p for folder in (run, home) for p in folder.rglob("*") if p.is_file()]
    assert len(searched) > 10
    leaked = [str(p) for p in searched if key.encode() in p.read_bytes()]
    assert leaked == []
    saved = json.loads((run / "checkpoints" / "step_2" / "state.json").read_text())
    assert key not in json.dumps(saved)


def test_every_pt_file_phonetune_writes_loads_with_weights_only(trained_run):
    files = sorted((trained_run / "checkpoints" / "step_2").glob("*.pt"))
    assert {p.name for p in files} >= {"optimizer.pt", "scheduler.pt", "rng_state_0.pt"}
    for path in files:
        assert ckpt.load_tensors(path.parent, path.name) is not None
