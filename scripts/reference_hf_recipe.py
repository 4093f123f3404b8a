"""The Hugging Face CTC fine-tuning recipe, written the way its users write it: the contender that
`scripts/bench_train.py` measures phonetune against.

    python scripts/reference_hf_recipe.py --prepared-dir PREP --out runs/hf [--batch-size 7]

It follows transformers' speech-recognition example (`run_speech_recognition_ctc.py`) and the
"Fine-tune XLS-R" blog post: a `Wav2Vec2Processor` (feature extractor + phone tokenizer), the
dataset mapped once to normalised `input_values` and `labels` with `datasets.map`, a collator that
pads with `processor.pad` and masks label padding with -100, and `transformers.Trainer` with
length-grouped sampling and a fixed number of utterances per batch. None of phonetune's training
code is used; only the model comes from phonetune (`phonetune.train.model.build_model` with the same config
and seed), so both contenders start from identical weights, the mel filterbank feature encoder
included. Data: the `train` split of a `phonetune prepare` folder (int16 audio, space-separated
phones, its vocab.json).

Deviations from the blog, each neutral for speed: `ctc_loss_reduction="mean"` as the blog sets it
(phonetune's tiny config sums and normalises by tokens itself, which the Trainer does not),
`save_strategy="no"`, and `map` writes its cache into the run folder instead of the prepared one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

SAMPLE_RATE = 16_000
DEFAULT_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def build_processor(vocab_path: Path):  # -> Wav2Vec2Processor
    """Feature extractor + phone tokenizer, as the released espeak-cv-ft model's processor."""
    from transformers import (
        Wav2Vec2FeatureExtractor,
        Wav2Vec2PhonemeCTCTokenizer,
        Wav2Vec2Processor,
    )

    tokenizer = Wav2Vec2PhonemeCTCTokenizer(
        str(vocab_path),
        do_phonemize=False,  # the labels are phones already
        phone_delimiter_token=" ",
        word_delimiter_token=None,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,  # XLS-R style (layer-norm) feature encoders take the mask
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def prepare_dataset(prepared_dir: Path, processor, cache_dir: Path):  # -> datasets.Dataset
    """The train split mapped to `input_values`, `input_length` and `labels` (the blog's map)."""
    import datasets

    train = datasets.load_from_disk(str(prepared_dir))["train"]

    def prepare_example(example: dict) -> dict:
        audio = np.asarray(example["audio"], dtype=np.float32) / 32768.0
        example["input_values"] = processor(audio, sampling_rate=SAMPLE_RATE).input_values[0]
        example["input_length"] = len(example["input_values"])
        example["labels"] = processor(text=example["phones"]).input_ids
        return example

    cache_dir.mkdir(parents=True, exist_ok=True)
    return train.map(
        prepare_example,
        remove_columns=train.column_names,
        # named after the prepared split's fingerprint: another prepared folder gets another file
        cache_file_name=str(cache_dir / f"train_{train._fingerprint}.arrow"),
        desc="preprocess train",
    )


@dataclasses.dataclass
class DataCollatorCTCWithPadding:
    """Pads inputs with the feature extractor, labels with the tokenizer; label padding -> -100."""

    processor: object  # Wav2Vec2Processor
    padding: bool | str = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{"input_values": feature["input_values"]} for feature in features]
        labels = [{"input_ids": feature["labels"]} for feature in features]
        batch = self.processor.pad(inputs, padding=self.padding, return_tensors="pt")
        labels_batch = self.processor.pad(labels=labels, padding=self.padding, return_tensors="pt")
        batch["labels"] = labels_batch["input_ids"].masked_fill(
            labels_batch.attention_mask.ne(1), -100
        )
        return batch


def build_model(config_path: Path, overrides: list[str], vocab_path: Path):
    """phonetune's model for this config (same weights as `phonetune train` starts from)."""
    from phonetune.data.vocab import load_vocab
    from phonetune.train.config import load_config
    from phonetune.train.model import build_model as build_phonetune_model

    config = load_config(
        config_path, [f"data.prepared_dir={vocab_path.parent}", "run.output_dir=unused", *overrides]
    )
    torch.manual_seed(config.train.seed)  # as `phonetune train` seeds before building
    model, _ = build_phonetune_model(config.model, load_vocab(vocab_path))
    model.config.ctc_loss_reduction = "mean"  # as the blog; see the module docstring
    return model, config


def training_arguments(output_dir: Path, config, batch_size: int, max_steps: int, **extra):
    """The blog's TrainingArguments with the phonetune config's optimiser values."""
    from transformers import TrainingArguments

    t = config.train
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    # transformers 5 renamed `group_by_length=True` to `train_sampling_strategy="group_by_length"`.
    grouping = (
        {"group_by_length": True}
        if "group_by_length" in fields
        else {"train_sampling_strategy": "group_by_length"}
    )
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        length_column_name="input_length",
        max_steps=max_steps,
        learning_rate=t.lr,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_epsilon=t.eps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=int(t.warmup_ratio * max_steps),
        logging_steps=extra.pop("logging_steps", 50),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=t.seed,
        dataloader_num_workers=config.data.num_workers,
        # the config's precision and memory settings, as the blog's `fp16=True` and
        # `gradient_checkpointing=True` flags
        use_cpu=not torch.cuda.is_available(),  # else bf16 on a CPU is refused
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        gradient_checkpointing=config.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True,
        **grouping,
        **extra,
    )


def make_trainer(
    prepared_dir: Path,
    output_dir: Path,
    batch_size: int,
    max_steps: int | None = None,
    config_path: Path = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    callbacks: list | None = None,
):  # -> transformers.Trainer
    from transformers import Trainer

    vocab_path = Path(prepared_dir) / "vocab.json"
    processor = build_processor(vocab_path)
    model, config = build_model(config_path, list(overrides or []), vocab_path)
    train_dataset = prepare_dataset(Path(prepared_dir), processor, Path(output_dir) / "cache")
    collator = DataCollatorCTCWithPadding(processor=processor)
    args = training_arguments(
        Path(output_dir), config, batch_size, max_steps or config.train.max_steps
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor.feature_extractor,
        callbacks=callbacks,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="Trainer output_dir")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--batch-size", type=int, default=7, help="utterances per batch")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    trainer = make_trainer(
        args.prepared_dir,
        args.out,
        args.batch_size,
        args.max_steps,
        args.config,
        args.overrides,
    )
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
