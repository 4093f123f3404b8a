"""model.adapter: lora: a LoRA adapter trained on top of an exported model, checkpoints that stay plain
transformers folders (merged weights), exact resume, and refusals."""

import json

import pytest
import torch
from helpers import FAST, RANDOM, TINY, read_metrics, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

from phonetune.data.errors import PhonetuneError
from phonetune.data.vocab import load_vocab
from phonetune.train import checkpoint as ckpt
from phonetune.train.adapter import add_adapter, load_adapter
from phonetune.train.config import load_config
from phonetune.train.loop import Hooks, train
from phonetune.train.model import build_model

ADAPTER = [
    "model.config=null",
    "model.feature_encoder_init=random",
    "model.adapter=lora",
    "model.adapter_rank=4",
    "model.adapter_target_modules=[q_proj,v_proj,intermediate_dense]",
    "train.lr=1e-2",
]


@pytest.fixture
def base_model(prepared_dir, tmp_path):
    """An "earlier export" that knows only the first 2/3 of the prepared vocabulary: the adapter run
    must extend its output layer by the rest."""
    vocab = load_vocab(prepared_dir / "vocab.json")
    known = {token: i for token, i in vocab.items() if i < 2 * len(vocab) // 3}
    folder = tmp_path / "base"
    tiny_model(seed=3, vocab_size=len(known)).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(known, ensure_ascii=False), encoding="utf-8")
    return folder


def adapter_config(prepared_dir, run_dir, base, *overrides):
    return load_config(
        TINY,
        [
            f"data.prepared_dir={prepared_dir}",
            f"run.output_dir={run_dir}",
            f"model.name_or_path={base}",
            *FAST,
            *ADAPTER,
            *overrides,
        ],
    )


def test_adapter_trains_only_lora_and_head_and_checkpoints_hold_merged_weights(
    prepared_dir, base_model, tmp_path
):
    steps = ["train.max_steps=4", "train.save_steps=4", "train.eval_steps=4"]
    train(adapter_config(prepared_dir, tmp_path / "run", base_model, *steps))
    step = ckpt.find_latest_checkpoint(tmp_path / "run")
    saved = load_file(step / "model" / "model.safetensors")
    base = load_file(base_model / "model.safetensors")
    # A plain Wav2Vec2ForCTC folder: the names of the base model, no peft names (training without
    # SpecAugment builds no mask embedding).
    assert set(saved) == set(base) - {"wav2vec2.masked_spec_embed"}
    targets = ("q_proj.weight", "v_proj.weight", "intermediate_dense.weight")
    for name, tensor in saved.items():
        if name.startswith("lm_head."):
            assert tensor.shape[0] == len(load_vocab(prepared_dir / "vocab.json"))
        elif name.endswith(targets):
            assert not torch.equal(tensor, base[name]), name  # the LoRA update, merged
        else:
            assert torch.equal(tensor, base[name]), name  # frozen: untouched, bit for bit
    # The kept output rows started from the base model's (the others are new).
    known = json.loads((base_model / "vocab.json").read_text(encoding="utf-8"))
    assert set(known) <= set(json.loads((step / "vocab.json").read_text(encoding="utf-8")))

    # The merged folder computes what the live LoRA model computed: rebuild base + adapter from the
    # checkpoint's adapter.safetensors and compare logits with the plain folder's.
    config = adapter_config(prepared_dir, tmp_path / "run", base_model, *steps)
    live, _ = build_model(config.model, load_vocab(step / "vocab.json"))
    add_adapter(live, config.model)
    load_adapter(live, step)
    plain = ckpt.load_model_folder(step / "model")
    audio = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = live.eval()(audio).logits
        merged = plain.eval()(audio).logits
    # float32: W + s*B@A rounded once in the merge vs x@W + s*(x@A^T)@B^T summed in another order
    # over 32 inputs per layer, through 2 layers: a few hundred ulps of the logits' size.
    tolerance = 512 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert torch.allclose(expected, merged, rtol=0, atol=tolerance)

    # A damaged adapter file makes the checkpoint damaged (resume=auto then falls back).
    assert ckpt.find_damage(step) is None
    adapter_file = step / ckpt.ADAPTER_FILE
    adapter_file.write_bytes(adapter_file.read_bytes()[:100])
    assert "adapter.safetensors is damaged" in ckpt.find_damage(step)


def test_adapter_run_resumes_exactly(prepared_dir, base_model, tmp_path):
    common = [*RANDOM, "model.layerdrop=0", "train.max_steps=5", "train.save_steps=2"]
    train(adapter_config(prepared_dir, tmp_path / "straight", base_model, *common))

    def killed_in_step_4(run, step):
        if step == 4:
            raise KeyboardInterrupt

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(
            adapter_config(prepared_dir, stopped, base_model, *common),
            Hooks(before_step=killed_in_step_4),
        )
    train(adapter_config(prepared_dir, stopped, base_model, *common, "resume=auto"))
    straight, resumed = read_metrics(tmp_path / "straight")[0], read_metrics(stopped)[0]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit for bit
    first, second = (
        load_file(ckpt.find_latest_checkpoint(run) / ckpt.ADAPTER_FILE)
        for run in (tmp_path / "straight", stopped)
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # the base's digest, hashed at a session's first save and reused: the same in every checkpoint
    digests = []
    for run in (tmp_path / "straight", stopped):
        for step in sorted(ckpt.checkpoints_dir(run).glob("step_*")):
            with safe_open(str(step / ckpt.ADAPTER_FILE), framework="pt") as handle:
                digests.append(handle.metadata()["base_sha256"])
    assert len(digests) >= 4 and len(set(digests)) == 1, digests


def test_adapter_resume_refuses_another_rank_or_a_changed_base(prepared_dir, base_model, tmp_path):
    common = ["train.max_steps=2", "train.save_steps=2", "train.eval_steps=2"]
    train(adapter_config(prepared_dir, tmp_path / "run", base_model, *common))
    tiny_model(
        seed=4, vocab_size=len(json.loads((base_model / "vocab.json").read_text()))
    ).save_pretrained(base_model)
    more = ["train.max_steps=4", "resume=auto"]
    with pytest.raises(PhonetuneError, match="does not fit the adapter"):
        train(
            adapter_config(
                prepared_dir, tmp_path / "run", base_model, *common, *more, "model.adapter_rank=2"
            )
        )
    with pytest.raises(PhonetuneError, match="base model's weights differ"):
        train(adapter_config(prepared_dir, tmp_path / "run", base_model, *common, *more))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.adapter=lora"], "set model.name_or_path"),
        (["model.adapter=lora", "model.adapter_rank=0"], "adapter_rank must be at least 1"),
        (["model.adapter=lora", "model.adapter_target_modules=[conv]"], "conv not a linear layer"),
        (["model.adapter=dora"], "model.adapter"),
    ],
)
def test_adapter_settings_are_checked_up_front(prepared_dir, tmp_path, overrides, message):
    with pytest.raises(PhonetuneError, match=message):
        load_config(
            TINY, [f"data.prepared_dir={prepared_dir}", f"run.output_dir={tmp_path}", *overrides]
        )
