"""Where espeak-ng comes from, and speech synthesis through it.

espeak-ng is taken from the `espeakng-loader` wheel so that a fresh machine needs no system package.
A user can point elsewhere with the same variables phonemizer and espeak-ng honour:
`PHONEMIZER_ESPEAK_LIBRARY` (the shared library) and `ESPEAK_DATA_PATH` (its data folder).
Both phonemization (through phonemizer) and synthesis (through ctypes) use the library chosen here.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EspeakLocation:
    library: str
    data_path: str | None
    source: str  # "wheel" or "environment"


@functools.cache
def locate_espeak() -> EspeakLocation:
    """Return the espeak-ng library and data folder to use (environment first, then the wheel)."""
    env_library = os.environ.get("PHONEMIZER_ESPEAK_LIBRARY")
    env_data = os.environ.get("ESPEAK_DATA_PATH")
    if env_library:
        if not Path(env_library).is_file():
            raise FileNotFoundError(
                f"PHONEMIZER_ESPEAK_LIBRARY={env_library} does not exist. Unset it to use the "
                "espeak-ng library shipped by the espeakng-loader wheel."
            )
        # A system library knows its own data folder; only pass one when the user named it.
        return EspeakLocation(env_library, env_data, "environment")
    import espeakng_loader

    data = env_data or espeakng_loader.get_data_path()
    return EspeakLocation(espeakng_loader.get_library_path(), str(data), "wheel")


@functools.cache
def configure_phonemizer() -> EspeakLocation:
    """Point phonemizer's espeak backend at the chosen library (idempotent, per process)."""
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    location = locate_espeak()
    EspeakWrapper.set_library(location.library)
    if location.data_path is not None:
        EspeakWrapper.set_data_path(location.data_path)
    return location


@functools.cache
def espeak_version() -> str:
    """The espeak-ng version string, e.g. '1.52.0' (recorded in reports, caches and checkpoints)."""
    configure_phonemizer()
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    return ".".join(str(part) for part in EspeakWrapper().version)


@functools.cache
def synthesis_voice(language: str) -> str:
    """espeak-ng's voice file name for a phonemizer language code ('fr-fr' -> 'fr').

    phonemizer selects voices by language, espeak_SetVoiceByName by voice file name.
    """
    configure_phonemizer()
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    for voice in EspeakWrapper().available_voices():
        if voice.language == language:
            return voice.identifier.rsplit("/", 1)[-1]
    raise ValueError(f"espeak-ng has no voice for language {language!r}")


# --- synthesis -------------------------------------------------------------------------------
# espeak-ng's C API (speak_lib.h). Only what synthesis needs.
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Synthesizer:
    """Speaks text into a float32 waveform with espeak-ng's library (no espeak-ng binary).

    One instance per process: espeak-ng keeps global state, so the voice and parameters are set
    before every utterance rather than assumed.
    """

    def __init__(self) -> None:
        location = locate_espeak()
        self._lib = ctypes.CDLL(location.library)
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        data = location.data_path.encode() if location.data_path else None
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise from {location.library}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # Keep a reference to the callback: ctypes does not, and a collected one crashes espeak.
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        # espeak-ng draws breath noise from rand(); seeding it per utterance makes audio repeatable.
        self._set_seed = getattr(self._lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]

    def _collect(self, wav: ctypes.Array, num_samples: int, _events: int) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = carry on synthesising

    def speak(
        self,
        text: str,
        voice: str,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        seed: int | None = None,
    ) -> np.ndarray:
        """Return `text` spoken by `voice` (e.g. 'en-us+f3') as float32 samples at `sample_rate`.

        With `seed`, espeak-ng's noise source is seeded first. Bit-identical audio also needs a
        fresh process: espeak-ng keeps other state (pitch flutter phase, gain) between utterances.
        """
        if seed is not None and self._set_seed is not None:
            self._set_seed(seed)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in (
            (_PARAM_RATE, rate),
            (_PARAM_PITCH, pitch),
            (_PARAM_RANGE, pitch_range),
        ):
            self._lib.espeak_SetParameter(parameter, value, 0)
        self._chunks = []
        # espeak-ng holds one callback per process: claim it again in case another Synthesizer
        # took it (that one's callback dies with it).
        self._lib.espeak_SetSynthCallback(self._callback)
        encoded = text.encode("utf-8")
        status = self._lib.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(
                f"espeak-ng failed to speak {text!r} with voice {voice!r} (status {status})"
            )
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0
