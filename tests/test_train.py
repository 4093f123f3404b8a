"""The training loop on the shared synthetic corpus: learning, exact resume, checkpoints, refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, MICRO, RANDOM, TINY, config, read_metrics

from phonetune.data.errors import PhonetuneError
from phonetune.train import checkpoint as ckpt
from phonetune.train.loop import Hooks, train


def test_tiny_model_learns(prepared_dir, tmp_path):
    steps = ["train.max_steps=20", "train.eval_steps=20", "train.save_steps=20"]
    result = train(config(prepared_dir, tmp_path / "run", *steps))
    losses, evals = read_metrics(tmp_path / "run")
    assert [r["step"] for r in losses] == list(range(1, 21))
    first = sum(r["loss"] for r in losses[:3]) / 3
    last = sum(r["loss"] for r in losses[-5:]) / 5
    assert last < 0.4 * first, (first, last)  # from random outputs to (at least) the blank plateau
    assert all(r["skipped_steps"] == 0 and r["audio_seconds"] > 0 for r in losses)
    assert evals[-1]["step"] == 20 and evals[-1]["eval_per"] >= 0.0
    assert set(evals[-1]["eval_per_locale"]) == {"en", "fr", "ru", "zh-CN"}
    assert 0.0 <= evals[-1]["eval_blank_fraction"] <= 1.0
    assert [e["locale"] for e in evals[-1]["eval_examples"]] == ["en", "fr", "ru", "zh-CN"]
    assert all(e["reference"] for e in evals[-1]["eval_examples"])
    assert result["step"] == 20 and result["best_checkpoint"].endswith("step_20")


@pytest.mark.parametrize(
    "data_settings",
    [
        [],
        [
            "data.language_sampling_alpha=0.3",
            "data.max_hours_per_locale=0.004",
            "train.batch_seconds_by_width={3: 20}",
        ],
        ["train.mixed_precision=bf16-weights"],
        # the checkpoint (step 4) falls in the frozen phase: the transformer has no Adam state yet
        ["train.freeze_finetune_updates=5"],
    ],
    ids=["proportional", "language_sampling_budget_by_width", "bf16_weights", "frozen_phase"],
)
def test_resume_is_exact(prepared_dir, tmp_path, data_settings):
    common = [
        *MICRO,
        *RANDOM,
        *data_settings,
        "train.max_steps=7",
        "train.save_steps=2",
        "train.eval_steps=3",
        "train.lr=3e-3",
    ]
    train(config(prepared_dir, tmp_path / "straight", *common))

    def killed_in_step_6(run, step):
        if step == 6:
            raise KeyboardInterrupt  # as if killed: step 5 is logged but its state never saved

    with pytest.raises(KeyboardInterrupt):
        train(
            config(prepared_dir, tmp_path / "stopped", *common), Hooks(before_step=killed_in_step_6)
        )
    assert ckpt.find_latest_checkpoint(tmp_path / "stopped").name == "step_4"
    assert read_metrics(tmp_path / "stopped")[0][-1]["step"] == 5
    train(config(prepared_dir, tmp_path / "stopped", *common, "resume=auto"))

    straight, straight_evals = read_metrics(tmp_path / "straight")
    resumed, resumed_evals = read_metrics(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, 8))  # step 5 was replaced, not duplicated
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit for bit
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert [r["locale_seconds"] for r in resumed] == [r["locale_seconds"] for r in straight]
    for record in resumed:  # the interval's audio, by locale (each logged to the millisecond)
        by_locale = record["locale_seconds"]
        assert sum(by_locale.values()) == pytest.approx(
            record["audio_seconds"], abs=0.0005 * len(by_locale)
        )
    assert [(r["step"], r["eval_per"]) for r in resumed_evals] == [
        (r["step"], r["eval_per"]) for r in straight_evals
    ]
    from safetensors.torch import load_file

    first = load_file(
        ckpt.find_latest_checkpoint(tmp_path / "straight") / "model" / "model.safetensors"
    )
    second = load_file(
        ckpt.find_latest_checkpoint(tmp_path / "stopped") / "model" / "model.safetensors"
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert {t.dtype for t in first.values()} == {torch.float32}  # bf16 weights: the fp32 masters


def test_checkpoint_contents_keep_last_and_best(prepared_dir, tmp_path):
    run = tmp_path / "run"
    train(
        config(
            prepared_dir,
            run,
            *MICRO,
            "train.max_steps=8",
            "train.save_steps=2",
            "train.eval_steps=2",
            "train.keep_last=2",
            "train.lr=3e-3",
        )
    )
    checkpoints = ckpt.list_checkpoints(run)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    kept = {step for step, _ in checkpoints}
    assert {6, 8} <= kept and kept <= {6, 8, best["step"]}
    assert ckpt.find_best_checkpoint(run).name == best["path"] == f"step_{best['step']}"
    _, evals = read_metrics(run)
    assert best["eval_per"] == min(r["eval_per"] for r in evals)

    latest = ckpt.find_latest_checkpoint(run)
    names = {p.name for p in latest.iterdir()}
    assert {
        "model",
        "vocab.json",
        "config.yaml",
        "state.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
    } <= names
    assert {p.name for p in (latest / "model").iterdir()} >= {"config.json", "model.safetensors"}
    model_config = json.loads((latest / "model" / "config.json").read_text())
    vocab = json.loads((latest / "vocab.json").read_text())
    assert vocab == json.loads((Path(prepared_dir) / "vocab.json").read_text())
    assert (
        model_config["vocab_size"] == len(vocab)
        and model_config["pad_token_id"] == 0
        and vocab["<pad>"] == 0
    )
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 8 and state["eval_per"] == evals[-1]["eval_per"]
    assert set(state["versions"]) >= {
        "espeak_ng",
        "phonemizer",
        "transformers",
        "torch",
        "phonetune",
    }
    assert state["versions"]["espeak_ng"] and state["versions"]["phonemizer"]
    assert (
        state["sampler"]["position"] == state["position"] and state["sampler"]["num_processes"] == 1
    )
    assert yaml.safe_load((latest / "config.yaml").read_text())["train"]["max_steps"] == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["prepared_dir"] == str(
        prepared_dir
    )
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(latest / name, weights_only=True)

    from phonetune.train.model import load_checkpoint_model

    model, loaded_vocab = load_checkpoint_model(latest)
    assert loaded_vocab == vocab and model.config.vocab_size == len(vocab)


def test_resume_rules(prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = [*MICRO, "train.save_steps=2", "train.eval_steps=100"]
    train(config(prepared_dir, run, "train.max_steps=2", *common))
    with pytest.raises(
        PhonetuneError, match=r"already holds checkpoints \(newest: step_2\).*resume=auto"
    ):
        train(config(prepared_dir, run, "train.max_steps=4", *common))
    # half-written or incomplete checkpoints newer than step 2 are not resumed from
    (run / "checkpoints" / "step_3.tmp").mkdir()
    (run / "checkpoints" / "step_9").mkdir()
    capsys.readouterr()
    result = train(
        config(
            prepared_dir, run, *common, "train.max_steps=4", "train.eval_steps=50", "resume=auto"
        )
    )
    out = capsys.readouterr().out
    assert "resumed from:" in out and "step_2 (step 2" in out
    assert "warning: train.eval_steps differs from the checkpoint's config: 100 -> 50" in out
    assert "warning: train.max_steps differs" in out
    assert result["step"] == 4 and not (run / "checkpoints" / "step_3.tmp").exists()
    # another model cannot continue this run
    with pytest.raises(
        PhonetuneError,
        match="configured model differs from the checkpoint's.*hidden_size: 48 -> 64",
    ):
        train(
            config(
                prepared_dir,
                run,
                "train.max_steps=6",
                "resume=auto",
                *common,
                "model.config.hidden_size=64",
            )
        )
    # resume=auto in an empty directory starts fresh
    fresh = train(
        config(prepared_dir, tmp_path / "fresh", "train.max_steps=1", "resume=auto", *common)
    )
    assert fresh["step"] == 1


def test_resume_says_when_the_epochs_batches_are_not_the_checkpoints(
    prepared_dir, tmp_path, capsys
):
    """The checkpoint keeps a digest of its epoch's global batches: a resumed run whose batches
    differ with the same budget and batch count (here a digest from another sampler, as after
    the bucketing fix of 2026-12-08; equally other clips or settings) says so, rather than
    taking the saved position in another order for the same place."""
    run = tmp_path / "run"
    common = [*MICRO, "train.save_steps=2", "train.eval_steps=100"]
    train(config(prepared_dir, run, "train.max_steps=2", *common))
    state_file = run / "checkpoints" / "step_2" / "state.json"
    state = json.loads(state_file.read_text())
    assert len(state["sampler"]["plan_sha256"]) == 64
    capsys.readouterr()
    train(config(prepared_dir, run, *common, "train.max_steps=3", "resume=auto"))
    assert "batches differ" not in capsys.readouterr().out  # the same run continues exactly
    (run / "checkpoints" / "step_3").rename(tmp_path / "step_3")  # back to step 2
    state["sampler"]["plan_sha256"] = "0" * 64
    state_file.write_text(json.dumps(state))
    train(config(prepared_dir, run, *common, "train.max_steps=3", "resume=auto"))
    out = capsys.readouterr().out
    assert "warning: epoch 0's batches differ from the checkpoint's with the same budget" in out


def test_resume_from_a_positional_optimizer_state_is_refused_clearly(prepared_dir, tmp_path):
    # Optimizer states are saved by parameter name; one saved by position (optimizer.state_dict(),
    # as phonetune did before FSDP) cannot be matched to the parameters safely.
    run = tmp_path / "run"
    common = [*MICRO, "train.save_steps=2", "train.eval_steps=100"]
    train(config(prepared_dir, run, "train.max_steps=2", *common))
    positional = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"params": [0]}]}
    torch.save(positional, run / "checkpoints" / "step_2" / "optimizer.pt")
    with pytest.raises(PhonetuneError, match="keys its state by position.*phonetune export"):
        train(config(prepared_dir, run, "train.max_steps=4", "resume=auto", *common))


def test_resume_with_another_vocabulary_is_refused(prepared_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    train(config(prepared_dir, run, *MICRO, "train.max_steps=1", "train.eval_steps=100"))
    other = tmp_path / "prep"
    shutil.copytree(prepared_dir, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["zz_new_phone"] = len(vocab)
    (other / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with pytest.raises(
        PhonetuneError, match="trained with another vocabulary.*only in the data: zz_new_phone"
    ):
        train(config(other, run, *MICRO, "train.max_steps=2", "resume=auto"))


def test_non_finite_steps_are_skipped_then_training_stops(prepared_dir, tmp_path):
    def poisoned_from_step_3(run, step, batches):
        if step > 2:
            batches[0].input_values[0, 1000:1100] = float("nan")

    with pytest.raises(PhonetuneError, match="3 steps in a row had a NaN/inf gradient"):
        train(
            config(
                prepared_dir,
                tmp_path / "run",
                *MICRO,
                "train.max_steps=20",
                "train.eval_steps=100",
                "train.max_consecutive_nonfinite=3",
            ),
            Hooks(on_batches=poisoned_from_step_3),
        )
    losses, _ = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in losses] == [0, 0, 1, 2]
    assert losses[2]["loss"] is None and losses[1]["loss"] is not None


def test_cli_reports_config_errors_without_traceback(tmp_path):
    env = dict(os.environ)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "phonetune",
            "train",
            "--config",
            str(TINY),
            "train.lr=fast",
            "trian.max_steps=3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "train.lr must be a number" in done.stderr and "unknown key 'trian'" in done.stderr
    assert "data.prepared_dir is required" in done.stderr


def test_transformer_frozen_for_the_first_updates_then_trained(prepared_dir, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = [
        *MICRO,
        "train.save_steps=1",
        "train.eval_steps=100",
        "train.keep_last=5",
        "train.max_steps=3",
    ]
    train(config(prepared_dir, run, *common, "train.freeze_finetune_updates=2"))
    weights = {
        step: load_file(path / "model" / "model.safetensors")
        for step, path in ckpt.list_checkpoints(run)
    }
    layer = "wav2vec2.encoder.layers.0.attention.q_proj.weight"
    head = "lm_head.weight"
    conv = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(weights[1][layer], weights[2][layer])  # steps 1-2: only the CTC layer moves
    assert not torch.equal(weights[1][head], weights[2][head])
    assert not torch.equal(weights[2][layer], weights[3][layer])  # step 3: the transformer trains
    assert torch.equal(weights[1][conv], weights[3][conv])  # the feature encoder never does
    losses, _ = read_metrics(run)
    assert [r["frozen_transformer"] for r in losses] == [True, True, False]


def test_loss_is_normalised_by_the_tokens_of_the_whole_step(prepared_dir):
    """Two accumulated batches give the update of one batch holding both (CTC summed / all tokens).

    In float64: the two ways sum the same terms in another order, which float32 would blur by up to
    ~1e-6 of a gradient's scale (more on wider SIMD units); float64's rounding (1.1e-16 per
    operation, over sums of at most ~1e4 terms here) stays below 1e-11 of the terms summed, so a
    tolerance of 1e-9 of the largest update entry holds on any CPU (an entry whose true value is
    ~0 carries only that noise), while any error in the normalisation moves updates by percent.
    """
    from phonetune.data.prepared import PreparedSplit
    from phonetune.train.batching import StepBatches, collate, load_training_data
    from phonetune.train.loop import train_step
    from phonetune.train.model import CTCModel, build_model
    from phonetune.train.parallel import make_parallel

    cfg = config(prepared_dir, "/unused", *MICRO, "train.max_grad_norm=0")
    data = load_training_data(cfg)
    split = PreparedSplit(data.train.dataset)
    first, second = [int(r) for r in data.train_rows[:3]], [int(r) for r in data.train_rows[3:5]]
    tokens = sum(len(text.split()) for text in split.column("phones", first + second))
    updates = []
    for batches in (
        [collate(split, first, data.vocab), collate(split, second, data.vocab)],
        [collate(split, first + second, data.vocab)],
    ):
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, data.vocab)
        module = CTCModel(model.double())
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        trained = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trained, lr=1.0, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        step = StepBatches(batches, float(tokens), 0.0, 0.0)
        result = train_step(module, optimizer, scheduler, step, make_parallel(cfg), cfg, False)
        update = {n: before[n] - p.detach() for n, p in module.named_parameters() if n in before}
        updates.append((float(result.loss_share), update))
    (loss_a, update_a), (loss_b, update_b) = updates
    assert loss_a == pytest.approx(loss_b, rel=1e-9)
    scale = max(float(update.abs().max()) for update in update_b.values())
    for name in update_a:
        torch.testing.assert_close(update_a[name], update_b[name], rtol=0, atol=1e-9 * scale)


def test_wandb_is_offline_without_a_key_and_never_fatal(prepared_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb key
    seen = {"logged": []}

    class FakeRun:
        def log(self, values, step):
            seen["logged"].append((step, values))

        def finish(self):
            seen["finished"] = True

    def fake_init(**kwargs):
        seen["mode"] = os.environ.get("WANDB_MODE")
        seen["config"] = kwargs["config"]
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    common = [*MICRO, "train.max_steps=2", "train.eval_steps=2", "log.report_to=[wandb]"]
    train(config(prepared_dir, tmp_path / "run", *common))
    assert seen["mode"] == "offline" and seen["finished"]
    assert seen["config"]["train"]["max_steps"] == 2
    assert [step for step, _ in seen["logged"]] == [1, 2, 2]
    assert "loss" in seen["logged"][0][1] and "eval_per_locale/en" in seen["logged"][2][1]

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb disabled: no network"):
        result = train(config(prepared_dir, tmp_path / "run2", *common))
    assert result["step"] == 2


def test_clips_shorter_than_a_time_mask_are_skipped_and_counted(prepared_dir):
    from phonetune.train.batching import drop_unalignable, load_training_data
    from phonetune.train.model import CTCModel, build_model

    cfg = config(prepared_dir, "/unused", *MICRO, "model.mask_time_prob=0.1")
    cfg.model.mask_time_length = 150  # 3 s of 20 ms frames: some synthetic clips are shorter
    data = load_training_data(cfg)
    model, _ = build_model(cfg.model, data.vocab)
    module = CTCModel(model)
    before = len(data.train_rows)
    frames = module.output_lengths(torch.from_numpy(data.train.num_samples()[data.train_rows]))
    short = int((frames < 150).sum())
    assert 0 < short < before
    drop_unalignable(data, module.conv_layers, cfg)
    assert data.skipped["shorter_than_mask_time_length"] == short
    assert (
        len(data.train_rows)
        == before - short - data.skipped["fewer_frames_than_phones_or_no_phones"]
    )


def test_run_dir_of_other_files_is_refused_and_setup_failures_release_the_lock(
    prepared_dir, tmp_path
):

    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(PhonetuneError, match="not a phonetune run .thesis.tex"):
        train(config(prepared_dir, foreign, *MICRO))
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]

    run = tmp_path / "run"
    unknown_locale = config(prepared_dir, run, *MICRO, "data.locales=[xx]")
    with pytest.raises(PhonetuneError, match="data.locales"):  # found after taking the lock
        train(unknown_locale)
    # released: another process may use the directory
    taker = [sys.executable, "-c", "import sys; from pathlib import Path; from phonetune.train."
             "run_dir import acquire; print(acquire(Path(sys.argv[1])) or 'locked')", str(run)]  # fmt: skip
    assert subprocess.run(taker, capture_output=True, text=True).stdout.strip() == "locked"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_while_logging_is_a_clear_error(prepared_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    with pytest.raises(PhonetuneError, match="cannot write .*metrics.jsonl: No space left"):
        train(config(prepared_dir, run, *MICRO, "train.max_steps=2"))


@pytest.mark.parametrize("precision", ["no", "bf16-weights"])
def test_steps_read_nothing_back_between_logging_steps(prepared_dir, tmp_path, precision):
    """The training step keeps its values on the device: no tensor is read on the host
    (`item`, `tolist`, `bool`, `float`, `int`, `cpu`, `numpy`) in steps that neither log nor save,
    with masking, dropout and LayerDrop on, and with bf16 weights and fp32 masters. On a GPU each such read would stall the host until the
    device caught up. (One read is not the step's: a new epoch's DataLoader iterator draws its
    workers' base seed from the loader's own CPU generator, a host tensor.)"""
    import sys

    from torch.overrides import TorchFunctionMode

    def in_data_loader() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "torch/utils/data/" in frame.f_code.co_filename.replace("\\", "/"):
                return True
            frame = frame.f_back
        return False

    reads = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
    seen: dict[int, list[str]] = {}
    current = {"step": 0}

    class CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in reads and not in_data_loader():
                seen.setdefault(current["step"], []).append(name)
            return func(*args, **(kwargs or {}))

    def before_step(run, step):
        current["step"] = step

    steps = [
        "train.max_steps=8",
        "log.every_steps=4",
        "train.eval_steps=100",
        "train.save_steps=100",
    ]
    precision = f"train.mixed_precision={precision}"
    settings = config(prepared_dir, tmp_path / "run", *MICRO, *RANDOM, *steps, precision)
    with CountReads():
        train(settings, Hooks(before_step=before_step))
    assert seen.get(1) is None, seen  # a step that neither logs nor saves
    assert sorted(step for step in seen if step > 0) == [4, 8], seen  # logging steps (8 also saves)
    losses, _ = read_metrics(tmp_path / "run")
    assert [r["step"] for r in losses] == [4, 8] and all(r["loss"] > 0 for r in losses)


@pytest.mark.slow  # Triton's interpreter runs the kernels on the CPU: ~10 s per step here
def test_triton_ctc_trains_as_pytorch_ctc(prepared_dir, tmp_path, monkeypatch):
    """train.ctc_implementation=triton in the training loop (lengths read on the device): the
    first step's loss is PyTorch's CTC's, to float32 rounding. The kernels add one rounded
    log-sum-exp per frame (T of them), so each utterance's loss may differ by ~T eps |loss|;
    doubled for margin. (Later steps follow updates whose Adam normalisation turns tiny gradient
    differences into differences of any size: only the first step is the loss's own.)"""
    from phonetune.train import ctc_triton

    calls = []
    kernel_loss = ctc_triton.ctc_loss
    monkeypatch.setattr(ctc_triton, "ctc_loss", lambda *a: calls.append(a) or kernel_loss(*a))
    short = ["data.max_duration=4", "train.batch_seconds=8", "train.max_steps=1", *RANDOM]
    for implementation in ("pytorch", "triton"):
        run = tmp_path / implementation
        settings = [*short, f"train.ctc_implementation={implementation}"]
        train(config(prepared_dir, run, *settings))
    (theirs,), (ours,) = (read_metrics(tmp_path / run)[0] for run in ("pytorch", "triton"))
    frames = 4 * 50  # the longest clip: 4 s at the encoder's 50 frames per second
    eps = torch.finfo(torch.float32).eps
    assert abs(ours["loss"] - theirs["loss"]) <= 2 * frames * eps * (theirs["loss"] + 1)
    assert calls and all(a[2].device == a[0].device for a in calls)  # lengths on the device


@pytest.mark.slow  # compiles (once per process; later runs reuse the compiled blocks)
@pytest.mark.parametrize("precision", ["no", "bf16-weights"])
def test_compiled_training_resumes_exactly_and_exports_as_transformers_weights(
    prepared_dir, tmp_path, precision
):
    from transformers import Wav2Vec2ForCTC

    common = [*MICRO, "train.compile=true", "train.max_steps=4", "train.save_steps=2"]
    common.append(f"train.mixed_precision={precision}")
    train(config(prepared_dir, tmp_path / "straight", *common))

    def killed_in_step_4(run, step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            config(prepared_dir, tmp_path / "stopped", *common), Hooks(before_step=killed_in_step_4)
        )
    train(config(prepared_dir, tmp_path / "stopped", *common, "resume=auto"))
    straight, resumed = (read_metrics(tmp_path / run)[0] for run in ("straight", "stopped"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit for bit
    final = ckpt.find_latest_checkpoint(tmp_path / "stopped") / "model"
    model = Wav2Vec2ForCTC.from_pretrained(final)  # transformers' own names: no compile prefixes
    assert model.config.vocab_size == len(json.loads((prepared_dir / "vocab.json").read_text()))


def test_the_update_clips_and_skips_on_the_device_as_torch_does(prepared_dir):
    """Parallel.update (fused AdamW given the clipping as grad_scale and the skip as found_inf) is
    torch's clip_grad_norm_ followed by AdamW's step; a NaN gradient leaves weights and optimizer
    state as they were. In float64, except the clip factor, which the fused kernels take in
    float32: a relative rounding of at most 2^-24 (6e-8) of the gradient, which Adam's update
    (nearly invariant to the gradient's scale) passes on at most in full, so the weights may
    differ by up to lr x 1e-7 per update and not more."""
    from phonetune.train.parallel import make_parallel
    from phonetune.train.schedule import make_optimizer

    cfg = config(prepared_dir, "/unused", *MICRO, "train.max_grad_norm=0.5")
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4).double()
    twin = torch.nn.Linear(8, 4).double()
    twin.load_state_dict(layer.state_dict())
    ours, theirs = make_optimizer(layer, cfg), make_optimizer(twin, cfg)
    parallel, updates = make_parallel(cfg), 0
    for step in range(3):
        grads = [torch.randn_like(p) * 10 for p in layer.parameters()]  # a norm well above 0.5
        if step == 1:
            grads[0][0, 0] = float("nan")
        for module, grad in ((layer, grads), (twin, grads)):
            for p, g in zip(module.parameters(), grad, strict=True):
                p.grad = g.clone()
        before = [p.detach().clone() for p in layer.parameters()]
        norm, skipped = parallel.update(layer, ours, cfg.train.max_grad_norm)
        assert bool(skipped) == (step == 1)
        if step == 1:  # skipped: nothing moved, the step count neither
            assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
            assert all(float(s["step"]) == 1 for s in ours.state.values())
            continue
        total = torch.nn.utils.clip_grad_norm_(list(twin.parameters()), cfg.train.max_grad_norm)
        theirs.step()
        updates += 1
        torch.testing.assert_close(norm, total.to(norm.dtype), rtol=1e-12, atol=0)
        for a, b in zip(layer.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=updates * cfg.train.lr * 1e-7)


def test_what_a_finished_run_says(prepared_dir, tmp_path, capsys):
    """The summary counts the steps this session ran; a half-written metrics line left by a kill
    is dropped with a word; a model that outputs only blanks gets a note; the command names the
    next one."""
    from phonetune.cli import main

    run_dir = tmp_path / "run"
    common = [
        f"data.prepared_dir={prepared_dir}",
        f"run.output_dir={run_dir}",
        *MICRO,
        *FAST,
        "train.eval_steps=2",
        "train.save_steps=2",
    ]
    assert main(["train", "--config", str(TINY), *common, "train.max_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps in" in printed
    assert f"next: phonetune export {run_dir} --best --out {run_dir}-model" in printed
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        metrics.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a write

    def say_only_blanks(run, step, result):  # every frame's blank logit far above the rest
        with torch.no_grad():
            run.parallel.unwrap(run.module).model.lm_head.bias[0] = 1e4

    resumed = [*common, "train.max_steps=4", "resume=auto"]
    assert main(["train", "--config", str(TINY), *resumed], Hooks(after_step=say_only_blanks)) == 0
    printed = capsys.readouterr().out
    assert "metrics.jsonl: dropped 1 line(s) cut short" in printed
    assert "done: 2 steps (2 -> 4) in" in printed
    assert "note: after 4 steps the model outputs only blanks" in printed
    assert "resume=auto train.max_steps=N` continues this run" in printed
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "step,blank,per,expected",
    [
        (500, 1.0, 1.0, True),  # past warm-up and a quarter of the run, all blank
        (500, 0.99, 1.0, False),  # some phones come out
        (500, 1.0, 0.95, False),  # (a few right)
        (60, 1.0, 1.0, False),  # still in the warm-up (10% of 1000 steps)
        (200, 1.0, 1.0, False),  # before a quarter of the run
    ],
)
def test_blank_collapse_is_told_only_past_the_warm_up(step, blank, per, expected, tmp_path):
    from phonetune.train.report import is_blank_collapse

    settings = config(
        tmp_path / "prep", tmp_path / "run", "train.max_steps=1000", "train.warmup_ratio=0.1"
    )
    result = {"eval_blank_fraction": blank, "eval_per": per}
    assert is_blank_collapse(step, result, settings) is expected
    frozen = config(
        tmp_path / "prep",
        tmp_path / "run",
        "train.max_steps=1000",
        "train.freeze_finetune_updates=600",
    )
    assert is_blank_collapse(500, {"eval_blank_fraction": 1.0, "eval_per": 1.0}, frozen) is False


def test_training_warns_once_when_dev_output_stays_blank(
    prepared_dir, tmp_path, monkeypatch, capsys
):
    from phonetune.train import loop

    blank = {"eval_per": 1.0, "eval_per_locale": {"en": 1.0}, "eval_utterances": 4,
             "eval_blank_fraction": 1.0, "eval_examples": []}  # fmt: skip
    monkeypatch.setattr(loop, "evaluate_dev", lambda *args: dict(blank))
    train(config(prepared_dir, tmp_path / "run", *MICRO, "train.max_steps=8", "train.eval_steps=2"))
    printed = capsys.readouterr().out
    # once (evaluations at steps 2, 4, 6, 8), from the first one past the warm-up (0.05 of 8
    # steps) and a quarter of the run (step 2)
    assert printed.count("still outputs (nearly) only blanks") == 1
    assert "warning: at step 2," in printed
