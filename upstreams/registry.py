"""Look up and build upstreams: registered names, checkpoint cards, local paths, HF hub ids and ``s3prl:<name>``.

``build_upstream(NAME_OR_PATH, ckpt=None, trust_checkpoint=False)`` resolves, in this order:

1. ``s3prl:<name>``: the s3prl bridge (s3prl imported only then);
2. a registered weight-free upstream (``fbank``, ``fbank_no_cmvn``, ``mfcc``);
3. a card ``upstreams/cards/<name>.yaml`` (``wav2vec2``, ``hubert``, ``apc``, ...): its published checkpoint, or the
   ``ckpt`` path when given (which must hold the card's model family);
4. an existing path: a checkpoint file or directory, format detected (:func:`upstreams.checkpoints.detect_checkpoint`);
5. an HF hub id ``org/name`` (or ``hf:org/name``): HF cache first, network only when not offline.

Anything else is a one-line error listing what was tried.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from speechbench.common import UnknownNameError, sha256_text
from speechbench.upstreams import fbank  # noqa: F401  (registers fbank, fbank_no_cmvn, mfcc)
from speechbench.upstreams.base import UPSTREAMS, Upstream, UpstreamEntry
from speechbench.upstreams.checkpoints import (
    PRETRAIN_CONFIG,
    PRETRAIN_UPSTREAM_DIR,
    CheckpointError,
    DetectedCheckpoint,
    detect_checkpoint,
)
from speechbench.upstreams.families import family_names, get_family

log = logging.getLogger("speechbench")

CARDS_DIR = Path(__file__).resolve().parent / "cards"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"  # checkpoints shipped inside the package
CARD_FIELDS = ("name", "family", "description", "source", "license", "sha256", "reference", "params_m", "gflops_per_s",
               "recipe", "command", "data", "seed", "steps")
NUMBER_FIELDS = ("params_m", "gflops_per_s")


class UnknownUpstreamError(UnknownNameError):
    """No registered upstream, card, path, hub id or s3prl name matches."""


@dataclass(frozen=True)
class Card:
    """A named published checkpoint (``upstreams/cards/<name>.yaml``)."""

    name: str
    family: str
    description: str
    source: str  # "hf:<org/name>", an URL, or "bundled:<dir>" (upstreams/bundled/<dir>, shipped with the package)
    license: str | None = None
    sha256: str | None = None  # of the weights file (model.safetensors for bundled and HF directories)
    reference: str | None = None
    # cost of the architecture (tests/benchmarks/card_costs.py): millions of parameters of the modules that compute
    # the hidden states, and GFLOPs (matmuls and convolutions) per second of audio for a 10 s input
    params_m: float | None = None
    gflops_per_s: float | None = None
    # how a checkpoint we trained ourselves was produced (bundled cards), so anyone can rebuild it:
    recipe: str | None = None
    command: str | None = None
    data: str | None = None
    seed: str | None = None
    steps: str | None = None


def _read_card(path: Path) -> Card:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: unreadable card ({type(e).__name__})") from None
    unknown = sorted(set(raw) - set(CARD_FIELDS))
    missing = [k for k in ("name", "family", "description", "source") if not raw.get(k)]
    if unknown or missing:
        raise CheckpointError(f"{path}: card has unknown field(s) {unknown} / lacks {missing}")
    if raw["family"] not in family_names() or raw["name"] != path.stem:
        raise CheckpointError(f"{path}: family must be one of {', '.join(family_names())} and name must match the "
                              f"file name")
    bad = [k for k in NUMBER_FIELDS if raw.get(k) is not None and
           (isinstance(raw[k], bool) or not isinstance(raw[k], int | float) or raw[k] < 0)]
    if bad:
        raise CheckpointError(f"{path}: card field(s) {bad} must be non-negative numbers")
    return Card(**{k: (None if v is None else float(v) if k in NUMBER_FIELDS else str(v)) for k, v in raw.items()})


def card_cost_text(card: Card) -> str:
    """``"94.4 M params, 14.8 GFLOPs per audio second"`` (the parts the card has), or ``""``."""
    parts = ([f"{card.params_m:g} M params"] if card.params_m is not None else []) + \
        ([f"{card.gflops_per_s:g} GFLOPs per audio second"] if card.gflops_per_s is not None else [])
    return ", ".join(parts)


@functools.lru_cache(maxsize=1)
def load_cards() -> dict[str, Card]:
    """Every card shipped in ``upstreams/cards``, by name."""
    return {card.name: card for card in map(_read_card, sorted(CARDS_DIR.glob("*.yaml")))}


def _card_entry(card: Card) -> UpstreamEntry:
    cost = card_cost_text(card)
    if card.source.startswith("bundled:"):
        summary = f"{card.description}\n{card.family}, shipped with the package; rebuilt by: {card.command}"
    else:
        summary = (f"{card.description}\n{card.family} checkpoint: {card.source} (license "
                   f"{card.license or 'unknown'}); or your own: --upstream {card.name} --ckpt PATH")
    summary += f"\n{cost}" if cost else ""
    return UpstreamEntry(card.name, functools.partial(build_upstream, card.name), summary, needs_weights=True,
                         params_m=card.params_m, gflops_per_s=card.gflops_per_s)


def get_upstream_entry(name: str) -> UpstreamEntry:
    if name in UPSTREAMS:
        return UPSTREAMS[name]
    cards = load_cards()
    if name in cards:
        return _card_entry(cards[name])
    available = ", ".join(sorted(set(UPSTREAMS) | set(cards)))
    raise UnknownUpstreamError(f"unknown upstream {name!r}; available: {available}")


def list_upstreams() -> list[UpstreamEntry]:
    """Registered weight-free upstreams and checkpoint cards, by name."""
    entries = {**{c.name: _card_entry(c) for c in load_cards().values()}, **UPSTREAMS}
    return [entries[name] for name in sorted(entries)]


def upstream_from_checkpoint(detected: DetectedCheckpoint, name: str) -> Upstream:
    """Build the upstream of a detected checkpoint (any format, any family)."""
    return get_family(detected.family).load(detected, name)


def _card_source(card: Card) -> Path:
    from speechbench.upstreams.fetch import hub_directory, url_file

    if card.source.startswith("bundled:"):
        path = BUNDLED_DIR / card.source[len("bundled:"):]
        if not path.is_dir():
            raise CheckpointError(f"{path}: the bundled checkpoint of card {card.name} is missing from the "
                                  f"installation; rebuild it with: {card.command or 'bench pretrain'}")
        return path
    if card.source.startswith("hf:"):
        return hub_directory(card.source[3:], card.name, is_card=True)
    return url_file(card.source, card.name, card.sha256)


def _check_family(detected: DetectedCheckpoint, family: str, name: str) -> None:
    if detected.family != family:
        raise CheckpointError(f"{detected.path}: holds a {detected.family} model, but --upstream {name} is a {family} "
                              f"upstream; pass --upstream {detected.family} (or the path alone)")


def local_upstream_path(name_or_path: str) -> Path | None:
    """The resolved local path ``build_upstream`` would load ``name_or_path`` from, or None (a registered name, a
    card, an HF hub id or an s3prl name). ``DIR/upstream`` of a ``bench pretrain --out DIR`` folder gives ``DIR``."""
    text = str(name_or_path)
    if text.startswith("s3prl:") or text in UPSTREAMS or text in load_cards():
        return None
    path = Path(text).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    if path.name == PRETRAIN_UPSTREAM_DIR and (path.parent / PRETRAIN_CONFIG).is_file():
        return path.parent  # DIR/upstream of a `bench pretrain --out DIR` folder: the same checkpoint as DIR
    return path


def upstream_slug(name_or_path: str) -> str:
    """A readable, stable folder name for an upstream: its name, or for a local path the checkpoint folder (or file)
    name plus 8 hex digits of the resolved path's sha256 (``./ckpts/my_hubert`` -> ``my_hubert-1a2b3c4d``)."""
    path = local_upstream_path(name_or_path)
    if path is None:
        return str(name_or_path).replace("/", "_").replace(":", "_")
    stem = path.stem if path.is_file() else path.name
    return f"{stem or 'upstream'}-{sha256_text(str(path))[:8]}"


def build_upstream(name_or_path: str, ckpt: str | None = None, trust_checkpoint: bool = False,
                   **options) -> Upstream:
    """Build a frozen upstream from a registered name, card, checkpoint path, HF hub id or ``s3prl:<name>``.

    ``ckpt`` replaces a card's published checkpoint with a local one of the same family. ``trust_checkpoint``
    allows full unpickling of checkpoints that need classes outside the safe allow-list.
    """
    text = str(name_or_path)
    if text.startswith("s3prl:"):
        from speechbench.upstreams.s3prl_bridge import build_s3prl_upstream

        return build_s3prl_upstream(text[len("s3prl:"):], ckpt)
    cards = load_cards()
    if text in UPSTREAMS:
        if ckpt:
            raise CheckpointError(f"upstream {text!r} has no weights, so --ckpt does not apply; checkpoint families: "
                                  f"{', '.join(sorted(cards))}")
        return UPSTREAMS[text].build(**options)
    if options:
        raise ValueError(f"upstream {text!r} takes no options; got {sorted(options)}")
    if text in cards:
        card = cards[text]
        if ckpt:
            detected = detect_checkpoint(ckpt, trust_checkpoint)
        else:
            log.info("%s: card %s -> %s", text, CARDS_DIR / f"{text}.yaml", card.source)
            detected = detect_checkpoint(_card_source(card), trust_checkpoint)
            if card.sha256 and detected.sha256 and detected.sha256 != card.sha256.lower():
                raise CheckpointError(f"{detected.path}: sha256 {detected.sha256[:16]}... differs from the card's "
                                      f"{card.sha256[:16]}...; the cached copy is not the published checkpoint")
        _check_family(detected, card.family, text)
        return upstream_from_checkpoint(detected, text)
    if ckpt:
        raise CheckpointError(f"--ckpt needs a model family or card as --upstream ({', '.join(sorted(cards))}); "
                              f"got {text!r}")
    path = Path(text).expanduser()
    if path.exists():
        return upstream_from_checkpoint(detect_checkpoint(path, trust_checkpoint), text)
    from speechbench.upstreams.fetch import hub_directory, looks_like_hub_id

    if text.startswith("hf:") or looks_like_hub_id(text):
        repo = text[3:] if text.startswith("hf:") else text
        try:
            directory = hub_directory(repo, repo)
        except CheckpointError as e:
            prefix = "" if text.startswith("hf:") else f"no file or directory {text}, and as an HF hub id: "
            raise CheckpointError(f"{prefix}{e}") from None
        return upstream_from_checkpoint(detect_checkpoint(directory, trust_checkpoint), text)
    names = ", ".join(sorted(set(UPSTREAMS) | set(cards)))
    raise UnknownUpstreamError(f"unknown upstream {text!r}: not a registered name or card ({names}), not an existing "
                               f"path, not an HF hub id (org/name), not s3prl:<name>")
