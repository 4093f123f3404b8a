"""phonetune's data stage: a Common Voice release -> espeak-ng phones -> a prepared dataset."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phonetune")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"
