"""ASR: character CTC on LibriSpeech (SUPERB protocol, WER without a language model).

Real corpus: ``--data-root`` is the ``LibriSpeech/`` folder holding ``<split>/<speaker>/<chapter>/`` with
``<speaker>-<chapter>-<utt>.flac`` files and one ``<speaker>-<chapter>.trans.txt`` transcript per chapter.
Train = ``train-clean-100``, dev = ``dev-clean``, test = ``test-clean``; other splits through
``task_options.train_splits`` (a list, concatenated), ``dev_split``, ``test_split``.

Targets: the 28 characters A-Z, apostrophe and the word boundary ``|``, CTC blank at class 0. A transcript with any
other character is a one-line error naming the utterance.

Head (s3prl ``downstream/asr``): Linear(D, 1024) -> 2-layer BiLSTM, 1024 units per direction, dropout 0.2 after
each layer -> Linear(2048, 29); SpecAugment on the featurizer output during training only (``spec_*`` options: time
warping within a window of ``spec_time_warp`` frames (s3prl: 5), then frequency and time masks; warps and masks drawn
from the torch RNG, which the training loop seeds and checkpoints, so a resumed run masks exactly as an
uninterrupted one). Decoding is greedy (best path); the metric is corpus-level WER (jiwer), CER is reported beside
it. Test hypotheses and references are written to ``hyp.txt`` / ``ref.txt`` (``<utt-id> TEXT``) for audit.

Synthetic corpus: ``asr/{train,dev,test}.jsonl`` of the generated corpus (grammar sentences, speaker-disjoint
splits, dev/test sentences never seen in training).

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): the published columns of ``superb`` (config
``asr``) and ``openslr/librispeech_asr``: ``audio``, ``text``, optionally ``speaker_id``, ``id``, ``file``; splits
``train`` / ``train.100`` / ``train.clean.100``, ``validation`` / ``validation.clean`` (dev), ``test`` / ``test.clean``
(``task_options.splits.train=train.100,train.360`` concatenates several); ``train_splits``, ``dev_split`` and
``test_split`` name LibriSpeech folders and do not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speechbench.common import atomic_write_text, hf_location
from speechbench.downstreams.ctc import (
    LIBRISPEECH,
    OFFICIAL_TEST_UTTERANCES,
    CTCOutput,
    ctc_loss,
    greedy_decode,
    read_librispeech,
    read_librispeech_hf,
    read_synth_asr,
)
from speechbench.downstreams.data import DataError, Utterance
from speechbench.downstreams.metrics import token_error_rate_percent, word_error_rate_percent
from speechbench.downstreams.tasks import PreparedData, Task, edit_items, register_task
from speechbench.downstreams.text import CHAR_VOCAB, chars_to_text, normalise_transcript, text_to_chars

S3PRL_TIME_WARP = 5


@dataclass(frozen=True)
class ASROptions:
    project_dim: int = 1024  # Linear(D, project_dim) before the recurrent layers
    hidden_size: int = 1024  # LSTM units per direction
    num_layers: int = 2
    dropout: float = 0.2  # after every recurrent layer
    downsample: int = 1  # concatenate this many consecutive frames after the projection (s3prl sample_style concat)
    specaug: bool = field(default=True, metadata={"protocol": "task"})
    # time-warp window in frames, 0 = off (s3prl downstream/asr/config.yaml: 5)
    spec_time_warp: int = field(default=S3PRL_TIME_WARP, metadata={"protocol": "task"})
    spec_freq_masks: int = 4  # s3prl downstream/asr/config.yaml
    spec_freq_width: int = 50  # mask widths drawn from [0, width)
    spec_time_masks: int = 2
    spec_time_width: int = 40  # frames
    train_splits: tuple[str, ...] = ("train-clean-100",)
    dev_split: str = "dev-clean"
    test_split: str = "test-clean"
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


def _check_text(splits: dict[str, list[Utterance]], where: str) -> dict[str, list[Utterance]]:
    allowed = set(CHAR_VOCAB.symbols) | {" "}
    out = {}
    for split, utts in splits.items():
        checked = []
        for u in utts:
            text = normalise_transcript(u.labels["text"])
            bad = sorted(set(text) - allowed)
            if bad or not text:
                why = f"characters {bad} outside A-Z and apostrophe" if bad else "an empty transcript"
                raise DataError(f"{where}: utterance {u.id} has {why}")
            checked.append(Utterance(u.id, u.path, u.duration_s, u.speaker, u.split, {**u.labels, "text": text}))
        out[split] = checked
    return out


def prepare(data_cfg, options: ASROptions) -> PreparedData:
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits = _check_text(read_synth_asr(corpus_dir), str(corpus_dir / "asr"))
        return PreparedData(corpus_dir, splits, "synth", CHAR_VOCAB,
                            {"profile": data_cfg.profile, "root": str(corpus_dir), "vocabulary": CHAR_VOCAB.name})
    if hf_location(data_cfg.root) is not None:
        rows, test_split = read_librispeech_hf(data_cfg.root, options)
        splits = _check_text(rows.splits, rows.record["dataset"])
        info = rows.info(test_split=test_split, vocabulary=CHAR_VOCAB.name)
        return PreparedData(rows.dataset.audio_root, splits, rows.corpus, CHAR_VOCAB, info)
    if not data_cfg.root:
        raise DataError(f"ASR on the real corpus needs --data-root pointing at the {LIBRISPEECH}/ folder")
    root = Path(data_cfg.root)
    splits = _check_text(read_librispeech(root, options.train_splits, options.dev_split, options.test_split),
                         str(root))
    info = {"root": str(root), "train_splits": list(options.train_splits), "dev_split": options.dev_split,
            "test_split": options.test_split, "vocabulary": CHAR_VOCAB.name}
    return PreparedData(root, splits, LIBRISPEECH, CHAR_VOCAB, info)


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> list[torch.Tensor]:
    """One int64 tensor of character ids per utterance."""
    vocab = prepared.label_space
    return [torch.tensor(vocab.encode(text_to_chars(u.labels["text"])), dtype=torch.long) for u in utterances]


def time_warp(x: torch.Tensor, window: int) -> torch.Tensor:
    """SpecAugment time warping of one utterance's valid frames ``x [T, D]`` -> ``[T, D]`` (s3prl's rule).

    A centre frame ``c ~ U[window, T - window)`` moves to ``w ~ c + U[-window, window) + 1``: frames ``[0, c)`` are
    resampled (bicubic along time, ``align_corners=False``) onto ``[0, w)`` and frames ``[c, T)`` onto ``[w, T)``.
    Utterances with ``T <= 2 * window`` are returned unchanged. Randomness from the global torch RNG.
    """
    t = x.shape[0]
    if window <= 0 or t - window <= window:
        return x
    centre = int(torch.randint(window, t - window, (1,)))
    warped = int(torch.randint(centre - window, centre + window, (1,))) + 1
    grid = x[None, None]  # [1, 1, T, D]: bicubic over (time, dim) with dim kept at its size moves time only
    left = nn.functional.interpolate(grid[:, :, :centre], (warped, x.shape[1]), mode="bicubic", align_corners=False)
    right = nn.functional.interpolate(grid[:, :, centre:], (t - warped, x.shape[1]), mode="bicubic",
                                      align_corners=False)
    return torch.cat([left, right], dim=2)[0, 0]


class SpecAugment(nn.Module):
    """Time warping, then frequency and time masking of ``x [B, T, D]`` (valid frames ``lengths [B]``), in training
    mode only.

    Per utterance: :func:`time_warp` of its valid frames within ``time_warp`` frames (0: none), then ``freq_masks``
    bands of width ``U[0, freq_width)`` over D and ``time_masks`` spans of width ``U[0, time_width)`` inside the valid
    frames are set to zero. All randomness comes from the global torch RNG.
    """

    def __init__(self, freq_masks: int, freq_width: int, time_masks: int, time_width: int, time_warp: int = 0):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.time_warp = time_warp

    @staticmethod
    def _spans(count: int, width: int, size: torch.Tensor, axis_len: int) -> torch.Tensor:
        """Boolean mask ``[B, axis_len]``: ``count`` random spans of width < ``width`` inside ``size [B]``."""
        b = size.shape[0]
        widths = torch.randint(0, max(width, 1), (b, count))
        room = (size[:, None] - widths).clamp(min=1)
        starts = (torch.rand(b, count) * room).long()
        pos = torch.arange(axis_len)[None, None, :]
        return ((pos >= starts[..., None]) & (pos < (starts + widths)[..., None])).any(dim=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, t, d = x.shape
        if self.time_warp > 0:  # a loop over the utterances of the batch, not over frames
            x = torch.stack([torch.cat([time_warp(x[i, :n], self.time_warp), x[i, n:]]) for i, n in
                             enumerate(lengths.tolist())])
        mask = torch.zeros(b, t, d, dtype=torch.bool)
        if self.freq_masks and self.freq_width:
            mask |= self._spans(self.freq_masks, self.freq_width, torch.full((b,), d), d)[:, None, :]
        if self.time_masks and self.time_width:
            mask |= self._spans(self.time_masks, self.time_width, lengths.cpu(), t)[:, :, None]
        return x.masked_fill(mask.to(x.device), 0.0)


def reverse_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse every sequence of ``x [B, T, H]`` within its own ``lengths [B]``; padding stays at the end."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    n = lengths.to(x.device)[:, None]
    idx = torch.where(t < n, n - 1 - t, t)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class BiLSTMLayer(nn.Module):
    """One bidirectional LSTM layer over padded batches, exact on the valid frames:
    ``[B, T, I] -> [B, T, 2H]``.

    The backward direction runs on each sequence reversed within its length, so neither direction ever reads
    padding before a valid frame. On a CPU this is several times faster than packed sequences.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.forward_rnn = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.backward_rnn = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ahead, _ = self.forward_rnn(x)
        back, _ = self.backward_rnn(reverse_valid(x, lengths))
        return torch.cat([ahead, reverse_valid(back, lengths)], dim=-1)


class BiLSTMCTCHead(nn.Module):
    """s3prl's ASR head: Linear(D, P) -> [concat ``downsample`` frames] -> BiLSTM layers (dropout after each)
    -> Linear(2H, C).

    ``forward(x [B, T, D], lengths [B]) -> CTCOutput(logits [B, ceil(T/k), C], lengths [B])``.
    """

    def __init__(self, input_dim: int, num_classes: int, options: ASROptions):
        super().__init__()
        self.downsample = max(1, options.downsample)
        self.specaug = SpecAugment(options.spec_freq_masks, options.spec_freq_width, options.spec_time_masks,
                                   options.spec_time_width, options.spec_time_warp) if options.specaug else None
        self.projector = nn.Linear(input_dim, options.project_dim)
        size = options.project_dim * self.downsample
        self.rnns = nn.ModuleList()
        for _ in range(options.num_layers):
            self.rnns.append(BiLSTMLayer(size, options.hidden_size))
            size = 2 * options.hidden_size
        self.dropout = nn.Dropout(options.dropout)
        self.classifier = nn.Linear(size, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> CTCOutput:
        if x.dim() != 3 or lengths is None:
            raise ValueError("the ASR head needs frames x [B, T, D] with lengths [B]")
        if self.specaug is not None:
            x = self.specaug(x, lengths)
        x = self.projector(x)
        lengths = lengths.cpu().long()
        k = self.downsample
        if k > 1:  # zero the padding first, so a group of k frames never depends on what the padding held
            valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            x = x * valid[..., None].to(x.device, x.dtype)
            b, t, p = x.shape
            pad = (-t) % k
            x = nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, (t + pad) // k, p * k)
            lengths = (lengths + k - 1) // k
        lengths = lengths.clamp(min=1, max=x.shape[1])
        for rnn in self.rnns:
            x = self.dropout(rnn(x, lengths))
        return CTCOutput(self.classifier(x), lengths)


def build_head(input_dim: int, prepared: PreparedData, options: ASROptions) -> nn.Module:
    return BiLSTMCTCHead(input_dim, len(prepared.label_space), options)


def loss(output: CTCOutput, target: list[torch.Tensor]) -> torch.Tensor:
    return ctc_loss(output, target)


def predict(output: CTCOutput, lengths: torch.Tensor | None = None) -> list[str]:
    """Greedy CTC decoding -> one transcript (upper-case words separated by spaces) per utterance."""
    return [chars_to_text(CHAR_VOCAB.decode(ids)) for ids in greedy_decode(output)]


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> list[str]:
    return [u.labels["text"] for u in utterances]


def score(predictions: list[str], refs: list[str]) -> dict:
    """``wer`` (the metric) and ``cer``, both corpus-level in %."""
    return {"wer": word_error_rate_percent(predictions, refs),
            "cer": token_error_rate_percent([list(p) for p in predictions], [list(r) for r in refs])}


def write_outputs(run_dir: Path, utterances: Sequence[Utterance], predictions: list[str], refs: list[str]) -> None:
    """``hyp.txt`` and ``ref.txt``: one ``<utt-id> TEXT`` line per test utterance, same order."""
    atomic_write_text(run_dir / "hyp.txt", "".join(f"{u.id} {p}\n" for u, p in zip(utterances, predictions,
                                                                                     strict=True)))
    atomic_write_text(run_dir / "ref.txt", "".join(f"{u.id} {r}\n" for u, r in zip(utterances, refs, strict=True)))


def item_scores(predictions: list[str], refs: list[str], utterances: Sequence[Utterance]) -> list[dict]:
    """Word edits and reference word count per test utterance (their sums give the corpus-level WER)."""
    return edit_items([p.split() for p in predictions], [r.split() for r in refs], utterances)


def protocol(prepared: PreparedData, options: ASROptions) -> tuple[dict, list[str]]:
    """Facts: SpecAugment's time warp and the official test size; deviation: no (or another) time warp."""
    warp = options.spec_time_warp if options.specaug else 0
    facts: dict = {"specaug": options.specaug, "time_warp_window": warp}
    deviations = []
    if not options.specaug:
        deviations.append("no SpecAugment (s3prl: time warp 5, 4 frequency masks < 50, 2 time masks < 40)")
    elif warp != S3PRL_TIME_WARP:
        deviations.append(f"SpecAugment time warp window {warp} (s3prl: {S3PRL_TIME_WARP})")
    test_split = prepared.info.get("test_split", options.test_split)
    if prepared.corpus != "synth" and test_split in OFFICIAL_TEST_UTTERANCES:
        facts["test_official"] = OFFICIAL_TEST_UTTERANCES[test_split]
    return facts, deviations


TASK = register_task(Task(
    name="asr", metric="wer", unit="%", higher_is_better=False, granularity="frames",
    options_cls=ASROptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="speech recognition, character CTC with a BiLSTM head, greedy decoding, WER",
    real_corpus=LIBRISPEECH, write_outputs=write_outputs, protocol=protocol, item_scores=item_scores,
))
