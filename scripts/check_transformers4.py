"""Check that an export folder works with the transformers installed in *this* interpreter.

Meant to be run twice, with transformers 5.x and then with the last 4.x release (in its own venv),
so that the second run compares against the first:

    python scripts/check_transformers4.py EXPORT_DIR --save /tmp/ref.npz            # transformers 5.x
    /tmp/tf4/bin/python scripts/check_transformers4.py EXPORT_DIR --compare /tmp/ref.npz  # 4.x

It runs the released model card's code and the ASR pipeline on a fixed speech-like signal, checks
the tokenizer (no espeak-ng needed, single-spaced phones, no word delimiter) and the feature
extractor settings, and with --compare requires the same logits (max |diff| <= 1e-4) and the same
transcription. It imports nothing from phonetune. Prints one JSON line; exit status 1 on failure.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, pipeline

SAMPLE_RATE = 16_000
TOLERANCE = 1e-4


def test_signal() -> np.ndarray:
    """3 s of a voiced, pitch- and amplitude-modulated tone: deterministic, no files needed."""
    time = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    pitch = 120 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * time))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (
        0.5 + 0.5 * np.sin(2 * np.pi * 3 * time)
    )
    return (0.1 * voiced).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export_dir", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--save", type=Path, help="write logits and transcription here (first run)")
    group.add_argument("--compare", type=Path, help="compare with a file written by --save")
    args = parser.parse_args()
    failures = []
    audio = test_signal()

    # The model card's code, unchanged.
    processor = Wav2Vec2Processor.from_pretrained(str(args.export_dir))
    model = Wav2Vec2ForCTC.from_pretrained(str(args.export_dir))
    model.eval()
    input_values = processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    with torch.no_grad():
        logits = model(input_values).logits
    transcription = processor.batch_decode(torch.argmax(logits, dim=-1))[0]
    if "  " in transcription or transcription != transcription.strip():
        failures.append(f"transcription is not single-space separated: {transcription!r}")

    asr = pipeline("automatic-speech-recognition", model=str(args.export_dir), device="cpu")
    piped = asr(audio)["text"]
    if piped != transcription:
        failures.append(f"pipeline gives {piped!r}, the model card's code {transcription!r}")

    tokenizer = processor.tokenizer
    vocab = json.loads((args.export_dir / "vocab.json").read_text(encoding="utf-8"))
    id_to_token = {i: t for t, i in vocab.items()}
    phones = [i for i in sorted(id_to_token) if i >= 4][:3]
    ids = [0, phones[0], phones[0], 0, phones[0], phones[1], 0, phones[2], phones[2]]
    expected = " ".join(id_to_token[i] for i in (phones[0], phones[0], phones[1], phones[2]))
    if tokenizer.decode(ids) != expected:
        failures.append(
            f"tokenizer decodes {ids} as {tokenizer.decode(ids)!r}, expected {expected!r}"
        )
    if getattr(tokenizer, "do_phonemize", True):
        failures.append("tokenizer has do_phonemize=True: inference would need espeak-ng")
    uses_mask = model.config.feat_extract_norm == "layer"
    if processor.feature_extractor.return_attention_mask != uses_mask:
        failures.append(
            f"return_attention_mask is {processor.feature_extractor.return_attention_mask}, "
            f"the model's feature encoder ({model.config.feat_extract_norm}) needs {uses_mask}"
        )

    max_diff = None
    if args.save:
        np.savez(
            args.save,
            logits=logits.numpy(),
            transcription=np.array(transcription),
            version=np.array(transformers.__version__),
        )
    if args.compare:
        reference = np.load(args.compare)
        if reference["logits"].shape != tuple(logits.shape):
            failures.append(f"logits shape {tuple(logits.shape)} != {reference['logits'].shape}")
        else:
            max_diff = float(np.abs(reference["logits"] - logits.numpy()).max())
            if max_diff > TOLERANCE:
                failures.append(
                    f"logits differ from transformers {reference['version']} by {max_diff:.3g}"
                )
        if str(reference["transcription"]) != transcription:
            failures.append("transcription differs from the reference run")

    print(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "export_dir": str(args.export_dir),
                "transcription_phones": len(transcription.split()),
                "max_abs_logit_diff": max_diff,
                "ok": not failures,
                "failures": failures,
            },
            ensure_ascii=False,
        )
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
