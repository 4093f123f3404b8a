"""phonetune: train multilingual phone recognizers (wav2vec 2.0 + CTC on espeak-ng phones).

One import name over the repository's stage folders (pyproject.toml maps them):

    phonetune.data    data/    Common Voice -> phones + 16 kHz audio; the facts every stage shares
    phonetune.train   train/   prepared dataset -> checkpoints (the loop, parallel backends, resume)
    phonetune.infer   infer/   checkpoint -> model folder (+ ONNX); evaluate, transcribe
    phonetune.configs configs/ training recipes and launcher configs
    phonetune.cli, phonetune.demo   the `phonetune` command and the end-to-end demo, over every stage

Imports run one way: infer reads data and train's checkpoints (train.checkpoint), train reads data,
data reads nothing of the others.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phonetune")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"
