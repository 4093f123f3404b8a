"""Audio in, phones out: loading a model for inference and recognising batches of waveforms.

A model is an export folder, a run folder (its newest checkpoint) or one checkpoint folder; all
three load as a plain `Wav2Vec2ForCTC` in float32. Audio is normalised and padded exactly as
training fed it (data.audio), batched by seconds of audio (data.prepared.batches_longest_first),
and decoded greedily (data.ctc.greedy_decode), only over each clip's own frames.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phonetune.data import ctc
from phonetune.data.audio import pad_waves
from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json
from phonetune.data.options import non_negative_int, positive_number
from phonetune.data.vocab import VOCAB_FILE, load_vocab
from phonetune.train.checkpoint import load_model_folder, select_checkpoint

if TYPE_CHECKING:
    from transformers import Wav2Vec2ForCTC

    from phonetune.infer.beam import BeamDecoder

DEFAULT_BATCH_SECONDS = 60.0


def normalize_batch(
    waves: Sequence[np.ndarray], uses_attention_mask: bool
) -> dict[str, torch.Tensor]:
    """The model's inputs for a batch, as the training collate and
    Wav2Vec2FeatureExtractor(do_normalize=True) make them.

    Each utterance is scaled to zero mean and unit variance over its own samples (int16 PCM is
    scaled to [-1, 1) first), then padded with 0. The attention mask is returned only for models
    whose feature encoder is layer-normalised: the others were trained without one (padding then
    reaches their group norm, in training as here, so batch such models by similar lengths).
    """
    input_values, lengths = pad_waves(list(waves))
    batch = {"input_values": torch.from_numpy(input_values)}
    if uses_attention_mask:
        mask = np.arange(input_values.shape[1]) < lengths[:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    return batch


@dataclass
class LoadedModel:
    """A model ready for inference, wherever it came from."""

    model: Wav2Vec2ForCTC
    id_to_token: dict[int, str]
    uses_attention_mask: bool
    source: str
    train_locales: list[str] | None = None  # None where it is not recorded

    @property
    def conv_layers(self) -> tuple[tuple[int, int], ...]:
        return ctc.conv_layers(self.model.config)

    @property
    def min_samples(self) -> int:
        """Shortest input that yields one output frame (the feature encoder's receptive field)."""
        return ctc.min_samples(self.conv_layers)


def is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / VOCAB_FILE).is_file()


# What Wav2Vec2Processor.from_pretrained reads of an export besides the model (recognition here
# does not need them, but a damaged one breaks the export for everyone who loads it).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def check_processor_files(folder: Path) -> None:
    for name in PROCESSOR_FILES:
        if (folder / name).is_file():
            read_json(folder / name, dict, "Export the model again (phonetune export).")


def load_model(path: Path, which: str | int = "latest") -> LoadedModel:
    """Load an export folder, a checkpoint step folder, or a run folder's checkpoint `which`
    (latest, best, step N)."""
    path = Path(path)
    if is_export_dir(path):
        if which != "latest":
            raise PhonetuneError(f"{path} is an export folder: --best and --step choose among a "
                                 "run's checkpoints")  # fmt: skip
        model_dir, vocab_path, source = path, path / VOCAB_FILE, str(path)
        train_locales = None  # in the export's config.json, read below
        check_processor_files(path)
    else:
        checkpoint = select_checkpoint(path, which)
        model_dir, vocab_path = checkpoint.model_dir, checkpoint.vocab_path
        source = f"{checkpoint.path} (step {checkpoint.step})"
        train_locales = checkpoint.train_locales()
    vocab = load_vocab(vocab_path)
    model = load_model_folder(model_dir)
    averaged = getattr(model.config, "phonetune_averaged_steps", None)
    if averaged:
        source += f" (the mean of the weights of steps {', '.join(map(str, averaged))})"
    if train_locales is None:
        recorded = getattr(model.config, "phonetune_train_locales", None)
        train_locales = list(recorded) if isinstance(recorded, list) else None
    if model.config.vocab_size != len(vocab):
        raise PhonetuneError(
            f"{path}: the model has {model.config.vocab_size} outputs but vocab.json {len(vocab)} tokens"
        )
    return LoadedModel(
        model=model,
        id_to_token={i: token for token, i in vocab.items()},
        uses_attention_mask=model.config.feat_extract_norm == "layer",
        source=source,
        train_locales=train_locales,
    )


def recognize(
    loaded: LoadedModel, waves: Sequence[np.ndarray], decoder: BeamDecoder | None = None
) -> list[str]:
    """CTC transcription of one batch of 16 kHz waveforms: greedy, or `decoder`'s beam search."""
    if decoder is not None:
        return [decoder.decode(log_probs) for log_probs in frame_log_probs(loaded, waves)]
    return [
        ctc.greedy_decode(log_probs.argmax(axis=-1).tolist(), loaded.id_to_token)
        for log_probs in frame_log_probs(loaded, waves)
    ]


def frame_log_probs(loaded: LoadedModel, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per clip of one batch, its frames' log posteriors over the vocabulary: float32 arrays of
    (frames, vocabulary), computed in float32 (log-softmax of the model's logits)."""
    batch = normalize_batch(waves, loaded.uses_attention_mask)
    with torch.inference_mode():
        log_probs = torch.log_softmax(loaded.model(**batch).logits.float(), dim=-1).numpy()
    frames = ctc.count_frames(np.array([len(wave) for wave in waves]), loaded.conv_layers)
    # Frames past a clip's own length come from padding: only the clip's frames are its own.
    return [log_probs[row, : frames[row]] for row in range(len(waves))]


# --- command line, shared by evaluate and transcribe -------------------------------------------
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """MODEL, and --best / --step to choose among a run folder's checkpoints (as export does)."""
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="an export folder, a run folder (its newest checkpoint) or a checkpoints/step_<n> folder",
    )
    add_checkpoint_choice(parser)


def add_checkpoint_choice(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--best",
        action="store_true",
        help="of a run folder, the checkpoint with the lowest dev PER (checkpoints/best.json)",
    )
    which.add_argument(
        "--step",
        type=non_negative_int,
        default=None,
        help="of a run folder, the checkpoint of this step",
    )


def chosen_checkpoint(args: argparse.Namespace) -> str | int:
    """latest, best or a step, as --best / --step say."""
    return "best" if args.best else args.step if args.step is not None else "latest"


def add_batch_seconds_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-seconds",
        type=positive_number,
        default=DEFAULT_BATCH_SECONDS,
        help=f"seconds of padded audio per batch (default {DEFAULT_BATCH_SECONDS:g})",
    )
