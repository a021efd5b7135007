import numpy as np
import pytest
import soundfile as sf

from speechbench.downstreams.data import (
    DataError,
    Utterance,
    bucket_by_duration,
    collate_audio,
    load_audio,
    load_utterance_audio,
    read_manifest,
    write_manifest,
)


def test_manifest_roundtrip(tmp_path):
    utts = [Utterance("a", "wavs/a.wav", 1.0, "s1", "train", {"keyword": "yes"}),
            Utterance("b", "/abs/b.wav", 2.5, "s2", "dev", {"text": "HELLO", "fold": 3})]
    write_manifest(tmp_path / "m.jsonl", utts)
    assert read_manifest(tmp_path / "m.jsonl") == utts


def test_manifest_errors_name_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "path": "x.wav"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: manifest row 'a' lacks field\(s\) \['duration_s'"):
        read_manifest(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="m.jsonl:1: not valid JSON"):
        read_manifest(path)
    with pytest.raises(DataError, match="missing.jsonl: manifest not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_load_audio_refuses_bad_files(tmp_path):
    sf.write(tmp_path / "stereo.wav", np.zeros((1600, 2), dtype=np.float32), 16000)
    with pytest.raises(DataError, match="stereo.wav: expected mono audio, found 2 channels"):
        load_audio(tmp_path / "stereo.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match="empty.wav: audio file is empty"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match="nan.wav: audio contains NaN"):
        load_audio(tmp_path / "nan.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="junk.wav: cannot read audio"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(DataError, match="nowhere.wav: cannot read audio"):
        load_audio(tmp_path / "nowhere.wav")


def test_load_audio_resamples_to_16k(tmp_path):
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "8k.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    audio = load_audio(tmp_path / "8k.wav")
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 1  # the tone stays at 440 Hz


def test_offset_crop(tmp_path):
    sf.write(tmp_path / "long.wav", np.arange(48000, dtype=np.float32) / 48000, 16000, subtype="FLOAT")
    utt = Utterance("c", "long.wav", 1.0, "n", "train", {"offset_s": 1.0})
    audio = load_utterance_audio(utt, tmp_path)
    assert audio.shape == (16000,) and audio[0] == pytest.approx(16000 / 48000)


def test_collate_and_buckets():
    wavs, lengths = collate_audio([np.ones(3, np.float32), np.ones(5, np.float32)])
    assert wavs.shape == (2, 5) and lengths.tolist() == [3, 5] and wavs[0, 3:].abs().sum() == 0
    durations = [1.0, 9.0, 2.0, 2.0, 8.0, 30.0]
    batches = bucket_by_duration(durations, max_batch_s=16.0)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(durations[i] for i in b) <= 16.0
    assert [5] in batches  # longer than the cap: alone
    assert all(len(b) <= 2 for b in bucket_by_duration(durations, 100.0, max_batch_size=2))
