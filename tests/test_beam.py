"""`phonetune lm` and `--beam B [--lm phones.arpa --lm-weight W]`: the ARPA file is a proper
distribution in every context as the decoder's KenLM reads it; prefix beam search finds what
greedy decoding misses; the LM moves the decision its way; option mistakes are clear errors."""

import json

import numpy as np
import pytest
from helpers import VOCAB, constant_model, speech, write_checkpoint, write_prepared

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError
from phonetune.infer.beam import BeamDecoder, BeamSearch
from phonetune.infer.lm import estimate_arpa
from phonetune.infer.transcribe import transcribe_files

ID_TO_TOKEN = {index: token for token, index in VOCAB.items()}
PHONES = [token for token in VOCAB if not token.startswith("<")]
# Train transcripts: "a" is followed by "n" nine times in ten, by "s" once.
TRAIN = ["a n ə", "s a n", "t a n ə", "a n", "n a n", "ə a n", "a n t", "s a n ə", "a n s", "a s"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = [
        {"audio": speech("ah na"), "phones": t, "locale": "en", "split": "train"} for t in TRAIN
    ]
    rows.append({"audio": speech("an"), "phones": "a n", "locale": "en", "split": "test"})
    rows.append({"audio": speech("assa"), "phones": "a s", "locale": "en", "split": "test"})
    return write_prepared(tmp_path_factory.mktemp("prepared") / "prep", rows)


@pytest.fixture(scope="module")
def arpa(prepared, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "phones.arpa"
    assert main(["lm", "--data", str(prepared), "--order", "3", "--out", str(path)]) == 0
    return path


def log_probs(*frames):
    """Frames given as {token: probability}; the rest of each frame's mass spread evenly."""
    rows = []
    for frame in frames:
        rest = (1 - sum(frame.values())) / (len(VOCAB) - len(frame))
        row = np.full(len(VOCAB), rest)
        for token, p in frame.items():
            row[VOCAB[token]] = p
        rows.append(np.log(row))
    return np.array(rows, dtype=np.float32)


def greedy(lp):
    from phonetune.data.ctc import greedy_decode

    return greedy_decode(lp.argmax(-1).tolist(), ID_TO_TOKEN)


# --- the LM -----------------------------------------------------------------------------------
def test_lm_is_a_distribution_in_every_context(arpa):
    """Sum over the next phone and the end of the utterance of p(. | context) is 1, for contexts
    the data has (at orders 1 to 3) and one it has not, as the decoder's KenLM computes them.
    The ARPA file keeps 7 decimals of each log10: about 2e-7 relative error per probability,
    and each sum adds a back-off weight's and a probability's rounding."""
    decoder = BeamDecoder(ID_TO_TOKEN, 4, arpa, 1.0)
    lm = decoder.lm
    contexts = [[], ["a"], ["a", "n"], ["s", "a"], ["t", "t"], ["ə", "ə", "s"]]
    for context in contexts:
        state = lm.start(False)  # after <s>
        for phone in context:
            state, _ = lm.score(state, VOCAB[phone])
        total = sum(10 ** lm.score(state, VOCAB[p])[1] for p in PHONES)
        total += 10 ** lm.finish(state)[1]
        assert total == pytest.approx(1.0, abs=1e-5), context
    state, _ = lm.score(lm.start(False), VOCAB["a"])
    after_a = {p: 10 ** lm.score(state, VOCAB[p])[1] for p in PHONES}
    assert max(after_a, key=after_a.get) == "n" and after_a["n"] > 5 * after_a["s"]
    # Phones absent from the transcripts are named: beam search with this LM cannot output them.
    assert decoder.missing_from_lm == ["aɪ", "tʃ", "i5", "ʁ", "ɛ"]


def test_lm_counts_and_discounts():
    """Kneser-Ney's discount per order, D = n1 / (n1 + 2 n2), from counts worked out by hand:
    "a b" twice and "b a" once give bigrams <s> a (2), a b (2), b </s> (2), <s> b (1), b a (1),
    a </s> (1): n1 = 3, n2 = 3, D2 = 3 / 9."""
    arpa, summary = estimate_arpa(["a b", "a b", "b a", ""], order=2)
    assert summary["sentences"] == 3 and summary["phones"] == 6
    assert summary["ngrams"] == [4, 6]  # <s>, </s>, a, b; the six bigrams
    assert summary["discounts"] == [0, round(3 / 9, 4)]
    assert arpa.startswith("\\data\\\nngram 1=4\nngram 2=6\n") and arpa.endswith("\\end\\\n")


def test_lm_command_errors(prepared, tmp_path, capsys):
    assert main(["lm", "--data", str(tmp_path), "--out", str(tmp_path / "x.arpa")]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    out = str(tmp_path / "x.arpa")
    assert main(["lm", "--data", str(prepared), "--order", "7", "--out", out]) == 2
    assert "--order must be between 1 and 6" in capsys.readouterr().err
    assert main(["lm", "--data", str(prepared), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.arpa").exists()


# --- the search -------------------------------------------------------------------------------
def test_prefix_beam_search_sums_the_paths_greedy_decoding_misses():
    """Blank wins both frames (0.4), so greedy decoding says nothing; but "a" has
    0.35 * 0.35 + 2 * 0.35 * 0.4 = 0.4025 over its three paths against 0.16 for nothing."""
    lp = log_probs({"<pad>": 0.4, "a": 0.35, "s": 0.2}, {"<pad>": 0.4, "a": 0.35, "s": 0.2})
    assert greedy(lp) == ""
    assert BeamDecoder(ID_TO_TOKEN, 8).decode(lp) == "a"
    # Repeats need a blank between them, as in greedy decoding.
    lp = log_probs({"a": 0.9}, {"a": 0.9}, {"<pad>": 0.9}, {"a": 0.9}, {"n": 0.9})
    assert BeamDecoder(ID_TO_TOKEN, 8).decode(lp) == greedy(lp) == "a a n"
    assert BeamDecoder(ID_TO_TOKEN, 8).decode(lp[:0]) == ""


def test_the_lm_decides_what_the_audio_leaves_open(arpa):
    """After "a", "s" sounds a little likelier (0.5 against 0.4) but the LM has "n" nine times
    likelier: log(0.5 / 0.4) = 0.22 nats, log10(9) = 0.95, so a weight of 1 turns the decision
    and a weight of 0.1 (0.095) does not."""
    lp = log_probs({"a": 0.95}, {"s": 0.5, "n": 0.4})
    assert BeamDecoder(ID_TO_TOKEN, 8).decode(lp) == "a s"
    assert BeamDecoder(ID_TO_TOKEN, 8, arpa, 0.1).decode(lp) == "a s"
    assert BeamDecoder(ID_TO_TOKEN, 8, arpa, 1.0).decode(lp) == "a n"


def test_bad_lm_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.arpa").write_text("these are my notes\n", encoding="utf-8")
    with pytest.raises(PhonetuneError, match=r"notes.arpa is not an ARPA .*notes"):
        BeamDecoder(ID_TO_TOKEN, 4, tmp_path / "notes.arpa")
    with pytest.raises(PhonetuneError, match=r"missing.arpa: no such file.*phonetune lm"):
        BeamDecoder(ID_TO_TOKEN, 4, tmp_path / "missing.arpa")
    with pytest.raises(PhonetuneError, match="is a folder"):
        BeamDecoder(ID_TO_TOKEN, 4, tmp_path)


# --- the commands -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def constant_run(tmp_path_factory, prepared):
    """A checkpoint whose every frame says "a" (p = e^5 / (e^5 + 13) = 0.92): any decoding of it
    gives "a", so its PER on the test split is known: "a n" one deletion, "a s" one: 2 / 4."""
    run = tmp_path_factory.mktemp("constant") / "run"
    write_checkpoint(run, 1, constant_model("a"), prepared_dir=prepared)
    return run


def test_evaluate_with_beam_and_lm(constant_run, prepared, arpa, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(constant_run), "--data", str(prepared), "--out", str(out)]
    assert main([*argv, "--beam", "8", "--lm", str(arpa), "--lm-weight", "0.3"]) == 0
    printed = capsys.readouterr()
    assert f"beam search, beam 8, LM {arpa} weight 0.3" in printed.out
    assert "5 of the model's phones never occur" in printed.err
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["decoding"] == {"method": "beam", "beam": 8, "lm": str(arpa), "lm_weight": 0.3}
    assert results["overall"]["per"] == pytest.approx(2 / 4)
    assert main(argv) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["decoding"] == {"method": "greedy"}


def test_transcribe_with_beam(constant_run, prepared, arpa, tmp_path):
    import soundfile

    wave = speech("a short phrase")
    soundfile.write(tmp_path / "clip.wav", wave, 16000)
    beam = BeamSearch(4, arpa, 0.5)
    (transcript,) = transcribe_files(constant_run, [tmp_path / "clip.wav"], beam=beam)
    assert transcript.phones == "a"
    assert transcript.error is None


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lm", "x.arpa"], "--lm is used by beam search: give --beam B"),
        (["--beam", "4", "--lm-weight", "0.5"], "--lm-weight weighs the LM of --lm"),
        (["--beam", "4", "--lm", "nowhere.arpa"], "--lm nowhere.arpa: no such file"),
    ],
)
def test_option_mistakes(constant_run, prepared, options, message, capsys):
    assert main(["evaluate", str(constant_run), "--data", str(prepared), *options]) == 2
    assert message in capsys.readouterr().err
    assert main(["transcribe", str(constant_run), "clip.wav", *options]) == 2
    assert message in capsys.readouterr().err


def test_beam_results_stay_out_of_the_model_card(constant_run, prepared, arpa, tmp_path, capsys):
    """Next to a checkpoint, beam search results go to eval_<split>_beam.json, which export does
    not put in the card (its code decodes greedily); given with --metrics, it is refused."""
    from phonetune.infer.export import export_model

    step = constant_run / "checkpoints" / "step_1"
    assert main(["evaluate", str(constant_run), "--data", str(prepared), "--beam", "4"]) == 0
    assert (step / "eval_test_beam.json").is_file() and not (step / "eval_test.json").exists()
    out = export_model(constant_run, tmp_path / "export", verbose=False)
    assert "50.00 %" not in (out / "README.md").read_text(encoding="utf-8")  # the beam PER
    with pytest.raises(PhonetuneError, match="decoded with beam search"):
        export_model(
            constant_run, tmp_path / "again", metrics=[step / "eval_test_beam.json"], verbose=False
        )
    (step / "eval_test_beam.json").unlink()


def test_streamed_recordings_are_beam_searched_piece_by_piece():
    """Each window's frames up to its cut go to the decoder once: the pieces are the stitched path."""
    from phonetune.infer.transcribe import FrameStitcher

    class Recorder:
        def __init__(self):
            self.pieces = []

        def decode(self, lp):
            self.pieces.append(lp.copy())
            return f"p{len(self.pieces)}"

    rng = np.random.default_rng(0)
    recorder = Recorder()
    stitcher = FrameStitcher(recorder)
    windows = [(0, 50), (40, 90), (80, 120)]  # (first frame, end frame): 10 frames overlap
    whole = rng.normal(size=(120, len(VOCAB))).astype(np.float32)  # one recording's frames
    ids = whole.argmax(-1)
    ids[[45, 85]] = 0  # a frame both windows call blank in each overlap
    for first, end in windows:
        stitcher.add(first, ids[first:end], np.ones(end - first, np.float32), whole[first:end])
    path, _ = stitcher.finish()
    assert np.array_equal(path, ids)
    assert [len(p) for p in recorder.pieces] == [45, 40, 35]  # cut at the shared blanks
    assert np.array_equal(np.concatenate(recorder.pieces), whole)
    assert stitcher.texts == ["p1", "p2", "p3"]


def test_beam_gives_no_timestamps(constant_run, capsys):
    for option in (["--timestamps"], ["--textgrid", "grids"]):
        assert main(["transcribe", str(constant_run), "clip.wav", "--beam", "4", *option]) == 2
        assert "beam search gives phones without times" in capsys.readouterr().err
