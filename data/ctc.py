"""CTC facts every stage shares: the frames a feature encoder produces for some audio, the frames
a phone sequence needs, and best-path decoding.

A wav2vec 2.0 feature encoder is a stack of strided convolutions: 16 kHz audio becomes about 50
output frames per second. CTC can emit one label per frame and needs a blank between two equal
labels, so a clip with fewer frames than phones (+1 per repeated neighbour) has no alignment at all:
its loss is infinite. `phonetune prepare` rejects such clips for the standard encoder, training
drops them for the model it trains, and inference decodes only a clip's own frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from phonetune.data.vocab import BLANK_ID, SPECIAL_TOKENS

# wav2vec 2.0's feature encoder, (kernel, stride) per convolution: a 400-sample receptive field
# and a 320-sample hop.
WAV2VEC2_CONV_LAYERS: tuple[tuple[int, int], ...] = (
    (10, 5),
    (3, 2),
    (3, 2),
    (3, 2),
    (3, 2),
    (2, 2),
    (2, 2),
)

Lengths = TypeVar("Lengths")  # an int, a numpy array or a torch tensor of sample counts


def conv_layers(model_config: Any) -> tuple[tuple[int, int], ...]:
    """(kernel, stride) of each convolution of a Wav2Vec2Config's feature encoder."""
    return tuple(zip(model_config.conv_kernel, model_config.conv_stride, strict=True))


def count_frames(
    num_samples: Lengths, layers: Sequence[tuple[int, int]] = WAV2VEC2_CONV_LAYERS
) -> Lengths:
    """Output frames of a feature encoder for inputs of `num_samples` samples (0 when shorter than
    its receptive field). Elementwise for numpy arrays and torch tensors, which stay where they
    are: counting the frames of a batch on a GPU reads nothing back to the host."""
    length = num_samples
    for kernel, stride in layers:
        length = (length - kernel) // stride + 1
        length = length * (length > 0)  # clamp at 0 for int, array and tensor alike
    return length


def min_samples(layers: Sequence[tuple[int, int]] = WAV2VEC2_CONV_LAYERS) -> int:
    """The shortest input that yields one output frame (the encoder's receptive field)."""
    samples = 1
    for kernel, stride in reversed(layers):
        samples = (samples - 1) * stride + kernel
    return samples


def count_min_frames(phones: Sequence[str]) -> int:
    """Fewest CTC frames that can carry `phones`: one per phone plus a blank between repeats."""
    repeats = sum(
        1 for previous, current in zip(phones, phones[1:], strict=False) if previous == current
    )
    return len(phones) + repeats


def greedy_decode(
    ids: Iterable[int], id_to_token: Mapping[int, str], blank_id: int = BLANK_ID
) -> str:
    """Best-path CTC decoding: collapse repeated ids, drop blanks and special tokens.

    Phones are joined with single spaces and there is no word delimiter, as in the released model.
    """
    phones: list[str] = []
    previous = None
    for token_id in ids:
        token_id = int(token_id)
        if token_id != previous and token_id != blank_id:
            token = id_to_token.get(token_id, "<unk>")
            if token not in SPECIAL_TOKENS:
                phones.append(token)
        previous = token_id
    return " ".join(phones)


def count_min_frames_padded(labels: Any, pad: int) -> Any:
    """`count_min_frames` of each row of a padded label tensor (padding `pad`), on its device."""
    real = labels != pad
    repeats = (labels[:, 1:] == labels[:, :-1]) & real[:, 1:]
    return real.sum(dim=1) + repeats.sum(dim=1)
