"""What several test modules share: the training test knobs (a micro model, fast settings, every
random draw on), tiny checkpoints in the training stage's layout, speech from espeak-ng, and tiny
prepared datasets. Test modules import these from here, never from each other."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import soxr
import torch
import yaml
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from phonetune.data.audio import SAMPLE_RATE
from phonetune.train.config import load_config

# Locales of the shared corpus (conftest.py): Latin, Cyrillic and Han scripts, tone digits included.
TEST_LOCALES = ["en", "fr", "ru", "zh-CN"]
TEST_CLIPS_PER_LOCALE = 30

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"

# The kill -9 harness (scripts/kill_trials.py), which test_faults.py runs too; its micro model, smaller
# than tiny_cpu.yaml's, serves the tests that check plumbing rather than learning.
_spec = importlib.util.spec_from_file_location("kill_trials", ROOT / "scripts" / "kill_trials.py")
kill_trials = sys.modules["kill_trials"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_trials)
MICRO = kill_trials.MICRO
FAST = [
    "train.batch_seconds=12",
    "data.max_duration=12",
    "log.progress_bar=false",
    "log.every_steps=1",
    "train.eval_batch_seconds=60",
]
# Masking, LayerDrop and dropout on: a resumed run only matches if every RNG is restored.
RANDOM = [
    "model.mask_time_prob=0.3",
    "model.mask_time_length=4",
    "model.mask_feature_prob=0.2",
    "model.mask_feature_length=4",
    "model.layerdrop=0.2",
    "model.hidden_dropout=0.1",
    "model.attention_dropout=0.1",
    "model.final_dropout=0.1",
    "model.activation_dropout=0.1",
]


def normalisation_tolerance(samples, largest):
    """How far two float32 computations of (x - mean) / sqrt(var + 1e-7) over the same `samples`
    may differ when their sums run in another order (or numpy adds the 1e-7 in float64): numpy's
    pairwise sums err by about log2(n) units in the last place (2^-23 of 1), and the result, of
    size up to `largest`, carries that relative error; 4x for the mean, the variance and the
    square root together."""
    return 4 * np.log2(samples) * np.finfo(np.float32).eps * largest


def on_a_free_port(launcher):
    """An `accelerate launch` command line with a rendezvous port of its own: the default, 29500,
    is taken while another launch (another test run on the machine, a user's job) holds it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return launcher.replace(
        "accelerate.commands.launch", f"accelerate.commands.launch --main_process_port {port}", 1
    )


def config(prepared_dir, run_dir, *overrides):
    return load_config(
        TINY, [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}", *FAST, *overrides]
    )


def read_metrics(run_dir):
    lines = [
        json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_per" in r]


# Multi-character phones (aɪ, tʃ) and a Mandarin tone-bearing one (i5) are single tokens.
VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "a": 4,
    "aɪ": 5,
    "tʃ": 6,
    "n": 7,
    "i5": 8,
    "ə": 9,
    "s": 10,
    "t": 11,
    "ʁ": 12,
    "ɛ": 13,
}


def tiny_model(seed=0, feat_extract_norm="layer", vocab_size=None):
    """A 2-layer wav2vec 2.0 with a random CTC head: milliseconds per second of audio on a CPU."""
    torch.manual_seed(seed)
    layer = feat_extract_norm == "layer"
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # A 320-sample hop like the real feature encoder: 50 frames per second, so attention over
        # a few seconds of audio stays cheap.
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 4, 4),
        conv_stride=(5, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=vocab_size or len(VOCAB),
        pad_token_id=0,
        feat_extract_norm=feat_extract_norm,
        do_stable_layer_norm=layer,
    )
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # a spread-out head, so that argmax is not all blanks
        model.lm_head.weight.normal_(0, 1.0)
    return model


def constant_model(token):
    """The tiny model with a head that says `token` on every frame, whatever it hears (its
    probability e^5 / (e^5 + len(VOCAB) - 1)): what any decoding of it gives is known."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[VOCAB[token]] = 5.0
    return model


def write_checkpoint(
    run_dir,
    step,
    model=None,
    *,
    seed=0,
    feat_extract_norm="layer",
    prepared_dir=None,
    eval_per=None,
    vocab=VOCAB,
):
    """RUN_DIR/checkpoints/step_<step>/ exactly as the training stage writes it."""
    model = model if model is not None else tiny_model(seed, feat_extract_norm, len(vocab))
    path = run_dir / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    model.save_pretrained(path / "model")
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    config = {
        "data": {"prepared_dir": str(prepared_dir) if prepared_dir else None},
        "model": {"name_or_path": "tiny-random-wav2vec2"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    state = {
        "step": step,
        "epoch": 1,
        "eval_per": eval_per,
        "versions": {
            "espeak_ng": "1.52.0",
            "phonemizer": "3.3.0",
            "transformers": "5.24.0",
            "torch": "2.13.0",
            "phonetune": "0.1.0",
        },
    }
    (path / "state.json").write_text(json.dumps(state), encoding="utf-8")
    return path


@functools.cache
def synthesizer():
    from phonetune.data.espeak import Synthesizer

    return Synthesizer()  # one per process: espeak-ng keeps global state


def speech(text, voice="en-us", rate=SAMPLE_RATE):
    """`text` spoken by espeak-ng at `rate` Hz: real speech, no download."""
    from phonetune.data.espeak import synthesis_voice

    synth = synthesizer()
    wave = synth.speak(text, synthesis_voice(voice))
    return soxr.resample(wave, synth.sample_rate, rate).astype(np.float32)


def write_prepared(path, rows):
    """A prepared dataset (docs/formats.md) from rows of {audio (float), phones, locale, split}."""
    import datasets

    from phonetune.data.audio import to_pcm16
    from phonetune.data.ctc import count_frames

    splits = {}
    for row in rows:
        pcm = to_pcm16(row["audio"])
        splits.setdefault(row["split"], []).append(
            {
                "audio": pcm.tolist(),
                "phones": row["phones"],
                "num_phones": len(row["phones"].split()),
                "locale": row["locale"],
                "split": row["split"],
                "duration": len(pcm) / SAMPLE_RATE,
                "num_frames": count_frames(len(pcm)),
                "client_id": row.get("client_id", "spk"),
                "sentence": "",
                "path": f"{row['locale']}/clips/x.mp3",
            }
        )
    features = datasets.Features(
        {
            "audio": datasets.Sequence(datasets.Value("int16")),
            "phones": datasets.Value("string"),
            "num_phones": datasets.Value("int32"),
            "locale": datasets.Value("string"),
            "split": datasets.Value("string"),
            "duration": datasets.Value("float32"),
            "num_frames": datasets.Value("int32"),
            "client_id": datasets.Value("string"),
            "sentence": datasets.Value("string"),
            "path": datasets.Value("string"),
        }
    )
    dataset = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(items, features=features)
            for name, items in splits.items()
        }
    )
    dataset.save_to_disk(str(path))
    (path / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False), encoding="utf-8")
    locales = sorted({row["locale"] for row in rows})
    report = {
        "versions": {"phonetune": "0.1.0", "espeak_ng": "1.52.0", "phonemizer": "3.3.0"},
        "settings": {
            "language_switch": "remove-flags",
            "phonemizer_strip": False,
            "with_stress": False,
        },
        "per_locale": {
            loc: {
                "espeak_language": {"en": "en-us", "fr": "fr-fr"}.get(loc, loc),
                "splits": {"train": {"hours": 0.25 if loc == "en" else 0.5}},
            }
            for loc in locales
        },
    }
    (path / "prep_report.json").write_text(json.dumps(report), encoding="utf-8")
    return path
