"""Silero VAD shipped in the ``silero-vad`` package (``silero_vad_16k_op15.onnx``; ``silero_vad_half.onnx``
in :mod:`vad_silero_half`): voice activity per 32 ms chunk.

(Named ``vad_silero`` because a module ``silero_vad`` here would shadow the package.)

Data: 16 kHz clips of 5-10 s: sentences spoken by ``espeak-ng`` (English, German, French,
Spanish, Italian; voice variants, speeds and pitches drawn at random; resampled from 22,050 Hz)
placed between gaps of 0.3-1.5 s, with background noise over the whole clip (white, pink,
brown or mains hum, 5-30 dB below the speech, or none).

Labels are exact, from the clean speech before mixing: a 512-sample chunk is speech when the
RMS of the clean espeak signal in it is above -35 dB relative to that utterance's loudest
chunk; pauses shorter than 250 ms inside an utterance (between words) count as speech, as a
VAD's speech segments include them.

Inference is silero's own ``OnnxWrapper`` loop: 512-sample chunks, each prefixed by the last 64
samples of the previous one (zeros at the start), the recurrent ``state`` (2, 1, 128) carried
from chunk to chunk and reset per clip, ``sr`` = 16000 where the model takes it.

Metric (headline ``accuracy``): frame accuracy of ``prob > 0.5`` against the labels, over all
chunks of the eval set. Calibration samples are the feeds (input chunk with context, state, sr)
recorded while the fp32 model runs over the calibration clips, evenly subsampled.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import wave

import numpy as np

from common import Evaluation, package_file

NAME = "silero_vad"
TITLE = "Silero VAD 16k op15 (silero-vad 6.2.3), voice activity"
METRIC = "accuracy"
MODEL_FILE = "silero_vad_16k_op15.onnx"
SR = 16000
CHUNK = 512
CONTEXT = 64
FEEDS_PER_CLIP = 8
# eval/calib: clips; a calibration set has FEEDS_PER_CLIP feeds per clip
SIZES = {"eval": 40, "calib": 32, "eval_quick": 20, "calib_quick": 16}

SENTENCES = {
    "en": ["The quick brown fox jumps over the lazy dog.", "Please call me back when you get this message.",
           "The train to the airport leaves at seven fifteen.", "I think we should meet again next week.",
           "Turn left at the second traffic light.", "Numbers like three hundred and forty two are easy to say."],
    "de": ["Der Zug nach Berlin hat zehn Minuten Verspätung.", "Ich hätte gern einen Kaffee mit Milch."],
    "fr": ["Le petit déjeuner est servi jusqu'à dix heures.", "Nous allons au marché samedi matin."],
    "es": ["El tren sale de la estación a las ocho.", "Me gustaría reservar una mesa para dos."],
    "it": ["Il museo apre alle nove del mattino.", "Vorrei un biglietto per Roma, per favore."],
}
VARIANTS = ["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4", "+klatt", "+croak"]


def model_path(model_file: str = MODEL_FILE):
    return package_file("silero_vad", "data", model_file)


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as float32 at 16 kHz."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        try:
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text],
                           check=True, capture_output=True)
        except FileNotFoundError as e:
            raise FileNotFoundError("espeak-ng not found: apt-get install espeak-ng") from e
        with wave.open(path) as f:
            rate = f.getframerate()
            x = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768.0
    g = np.gcd(SR, rate)
    return resample_poly(x, SR // g, rate // g).astype(np.float32)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS background noise of a random colour, or mains hum."""
    kind = rng.integers(4)
    if kind == 3:
        t = np.arange(n) / SR
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3))
    else:
        spec = np.fft.rfft(rng.normal(size=n))
        f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
        x = np.fft.irfft(spec / f ** (0.5 * kind), n)  # white, pink (1/f), brown (1/f^2)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def _label_utterance(speech: np.ndarray, start: int, n_chunks: int) -> np.ndarray:
    """Per-chunk speech labels of one utterance placed at sample ``start`` of the clip."""
    clean = np.zeros(n_chunks * CHUNK, np.float32)
    end = min(start + len(speech), len(clean))
    clean[start:end] = speech[: end - start]
    rms = np.sqrt(np.mean(clean.reshape(n_chunks, CHUNK) ** 2, axis=1))
    on = rms > rms.max() * 10 ** (-35 / 20)
    idx = np.flatnonzero(on)
    gap = int(0.25 * SR / CHUNK)
    for a, b in zip(idx[:-1], idx[1:]):  # bridge inter-word pauses
        if 1 < b - a <= gap + 1:
            on[a:b] = True
    return on


def make_clip(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(audio float32, per-chunk labels bool) of one clip."""
    pieces, spans, pos = [], [], 0
    target = int(rng.uniform(5.0, 10.0) * SR)
    while pos < target:
        gap = int(rng.uniform(0.3, 1.5) * SR)
        pieces.append(np.zeros(gap, np.float32))
        pos += gap
        lang = list(SENTENCES)[rng.integers(len(SENTENCES))]
        text = SENTENCES[lang][rng.integers(len(SENTENCES[lang]))]
        voice = lang + VARIANTS[rng.integers(len(VARIANTS))]
        speech = _espeak(text, voice, int(rng.integers(130, 200)), int(rng.integers(25, 75)))
        speech *= rng.uniform(0.2, 0.9) / (np.abs(speech).max() + 1e-9)
        pieces.append(speech)
        spans.append((pos, speech))
        pos += len(speech)
    pieces.append(np.zeros(int(rng.uniform(0.3, 1.0) * SR), np.float32))
    clean = np.concatenate(pieces)
    n_chunks = len(clean) // CHUNK
    clean = clean[: n_chunks * CHUNK]
    labels = np.zeros(n_chunks, bool)
    for start, speech in spans:
        labels |= _label_utterance(speech, start, n_chunks)
    speech_rms = np.sqrt(np.mean(clean[np.repeat(labels, CHUNK)] ** 2))
    audio = clean.copy()
    if rng.random() < 0.85:
        snr_db = rng.uniform(5, 30)
        audio += _noise(rng, len(audio)) * speech_rms * 10 ** (-snr_db / 20)
    return np.clip(audio, -1, 1).astype(np.float32), labels


def _has_sr(sess) -> bool:
    return any(i.name == "sr" for i in sess.get_inputs())


def run_clip(sess, audio: np.ndarray, record: list | None = None) -> np.ndarray:
    """silero ``OnnxWrapper`` over one clip: per-chunk speech probabilities (float32)."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = {"sr": np.array(SR, np.int64)} if _has_sr(sess) else {}
    probs = []
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[None, i:i + CHUNK]], axis=1)
        feed = {"input": x, "state": state, **sr}
        if record is not None:
            record.append(feed)
        out, state = sess.run(None, feed)
        probs.append(out.reshape(-1)[0])
        context = x[:, -CONTEXT:]
    return np.array(probs, np.float32)


def make_eval_set(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [dict(zip(("audio", "labels"), make_clip(rng))) for _ in range(n)]


def make_calib_set(seed: int, n: int, model_file: str = MODEL_FILE) -> list[dict[str, np.ndarray]]:
    from common import session

    rng = np.random.default_rng(seed)
    sess = session(model_path(model_file), threads=1)
    feeds = []
    for _ in range(n):
        record: list = []
        run_clip(sess, make_clip(rng)[0], record)
        pick = np.linspace(0, len(record) - 1, FEEDS_PER_CLIP).round().astype(int)
        feeds.extend(record[i] for i in pick)
    return feeds


def evaluate(sess, eval_set: list[dict], reference: Evaluation | None = None) -> Evaluation:
    outputs = [run_clip(sess, s["audio"]) for s in eval_set]
    pred = np.concatenate(outputs) > 0.5
    labels = np.concatenate([s["labels"] for s in eval_set])
    metrics = {"accuracy": float(np.mean(pred == labels)),
               "speech_recall": float(np.mean(pred[labels])),
               "silence_recall": float(np.mean(~pred[~labels]))}
    if reference is not None:
        metrics["agree_fp32"] = float(np.mean(pred == (np.concatenate(reference.outputs) > 0.5)))
    return Evaluation(metrics, outputs)
