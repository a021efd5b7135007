"""Pieces shared by the CTC tasks (ASR, PR): the head output, the loss, greedy decoding and the LibriSpeech reader.

Tasks never import each other; both import this module. Blank is class 0 (see :mod:`downstreams.text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from speechbench.downstreams.data import DataError, Utterance, audio_duration_s, expect_path, read_manifest
from speechbench.downstreams.hf_data import Field, TaskRows, read_task_rows

LIBRISPEECH = "LibriSpeech"
OFFICIAL_TEST_UTTERANCES = {"test-clean": 2620, "test-other": 2939}  # LibriSpeech's test sets
# The published layouts of LibriSpeech as a Hugging Face dataset, from huggingface/datasets' loading scripts before they
# moved to the hub (commit d7dfbc83): datasets/superb/superb.py, config "asr": file, audio, text, speaker_id,
# chapter_id, id; splits train (train-clean-100), validation (dev-clean), test (test-clean).
# datasets/librispeech_asr/librispeech_asr.py: the same columns; config "clean": train.100, train.360, validation, test;
# "other": train.500, validation, test (the "other" sets); "all": train.clean.100 ... validation.clean, test.clean ...
# ``phonemes``: the synthetic corpus' export (PR targets from the synthesiser).
HF_FIELDS = {"text": Field(("text", "transcription", "sentence")),
             "speaker": Field(("speaker_id", "speaker"), required=False),
             "phonemes": Field(("phonemes",), required=False)}
HF_SPLITS = {"train": ("train", "train.100", "train.clean.100"), "dev": ("validation", "validation.clean", "dev"),
             "test": ("test", "test.clean")}


class CTCOutput(NamedTuple):
    """A CTC head's output: ``logits [B, T', C]`` (unnormalised) and the valid output frames ``lengths [B]``."""

    logits: torch.Tensor
    lengths: torch.Tensor


def ctc_loss(output: CTCOutput, targets: Sequence[torch.Tensor], blank: int = 0) -> torch.Tensor:
    """Mean CTC loss of a batch (PyTorch's default reduction: per-utterance loss over target length, batch mean).

    ``targets``: one int64 tensor of class ids (no blanks) per utterance. Impossible alignments (more labels than
    frames) contribute zero instead of infinity, as in s3prl (``zero_infinity``).
    """
    logits, lengths = output
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T', B, C]
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.cat([t.long() for t in targets]) if len(targets) else torch.zeros(0, dtype=torch.long)
    return F.ctc_loss(log_probs, flat, lengths.long().cpu(), target_lengths, blank=blank, reduction="mean",
                      zero_infinity=True)


def greedy_collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Best-path CTC decoding of one frame-wise argmax sequence: merge repeats, then drop blanks.

    ``[0, 3, 3, 0, 3, 5, 5, 0]`` -> ``[3, 3, 5]``.
    """
    out: list[int] = []
    previous = None
    for i in ids:
        if i != previous and i != blank:
            out.append(int(i))
        previous = i
    return out


def greedy_decode(output: CTCOutput, blank: int = 0) -> list[list[int]]:
    """Greedy (best-path) decoding of a batch: ``logits [B, T', C]`` -> one id list per utterance."""
    logits, lengths = output
    best = logits.argmax(dim=-1).cpu()  # [B, T']
    return [greedy_collapse(best[b, : int(n)].tolist(), blank) for b, n in enumerate(lengths.tolist())]


def read_librispeech_split(root: Path, split: str) -> list[Utterance]:
    """One LibriSpeech split ``<root>/<split>/<speaker>/<chapter>/`` -> utterances with their ``text``.

    Paths are relative to ``root``. Every line ``<utt-id> TRANSCRIPT`` of every ``<speaker>-<chapter>.trans.txt``
    must name an existing ``<utt-id>.flac`` beside it.
    """
    split_dir = expect_path(root / split, f"the {split}/ folder", LIBRISPEECH)
    trans_files = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise DataError(f"{split_dir}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt found; expected the "
                        f"{LIBRISPEECH} layout {split}/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac")
    utts = []
    for trans in trans_files:
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            raise DataError(f"{trans}: expected the name {speaker}-{chapter}.trans.txt in the {LIBRISPEECH} layout")
        for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if not uid.startswith(f"{speaker}-{chapter}-") or not text.strip():
                raise DataError(f"{trans}:{line_no}: expected '{speaker}-{chapter}-<utt> TRANSCRIPT', "
                                f"found {line.strip()[:80]!r}")
            flac = trans.parent / f"{uid}.flac"
            duration = audio_duration_s(flac, trans)
            rel = f"{split}/{speaker}/{chapter}/{uid}.flac"
            utts.append(Utterance(uid, rel, duration, speaker, split, {"text": " ".join(text.split())}))
    return utts


def read_librispeech(root: Path, train: Sequence[str], dev: str, test: str) -> dict[str, list[Utterance]]:
    """train/dev/test utterances from the named LibriSpeech splits (several training splits are concatenated)."""
    expect_path(root, "the corpus folder", LIBRISPEECH)
    if not train:
        raise DataError("task_options.train_splits is empty; name at least one LibriSpeech training split")
    splits = {"train": [u for name in train for u in read_librispeech_split(root, name)],
              "dev": read_librispeech_split(root, dev), "test": read_librispeech_split(root, test)}
    # the manifests keep split = train/dev/test; the LibriSpeech split name stays in the path
    return {s: [Utterance(u.id, u.path, u.duration_s, u.speaker, s, u.labels) for u in utts]
            for s, utts in splits.items()}


def read_librispeech_hf(root: str, options) -> tuple[TaskRows, str]:
    """train/dev/test of a Hugging Face LibriSpeech dataset (``HF_SPLITS``, or ``options.splits``) and the name of its
    test set: ``test-clean`` for a split named ``test`` or ``test.clean`` (superb asr, librispeech_asr clean and all;
    the protocol's test-size check flags the "other" config, whose ``test`` is test-other), else the split name."""
    rows = read_task_rows(root, HF_FIELDS, HF_SPLITS, options)
    test = rows.record["splits"]["test"]
    return rows, "test-clean" if test in (["test"], ["test.clean"]) else ",".join(test)


def read_synth_asr(corpus_dir: Path) -> dict[str, list[Utterance]]:
    """The synthetic corpus' ``asr/{train,dev,test}.jsonl`` (fields ``text`` and ``phonemes``), speaker-disjoint."""
    splits = {s: read_manifest(corpus_dir / "asr" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    for split, utts in splits.items():
        missing = [u.id for u in utts if "text" not in u.labels or "phonemes" not in u.labels]
        if missing:
            raise DataError(f"{corpus_dir / 'asr' / split}.jsonl: row {missing[0]!r} lacks text or phonemes")
    return splits
