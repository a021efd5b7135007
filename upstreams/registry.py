"""Look up and build upstreams by name. Importing this module registers every built-in upstream."""

from __future__ import annotations

from upstreams import fbank  # noqa: F401  (registers fbank, fbank_no_cmvn, mfcc)
from upstreams.base import UPSTREAMS, Upstream, UpstreamEntry


class UnknownUpstreamError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_upstream_entry(name: str) -> UpstreamEntry:
    if name not in UPSTREAMS:
        available = ", ".join(sorted(UPSTREAMS))
        raise UnknownUpstreamError(f"unknown upstream {name!r}; available: {available}")
    return UPSTREAMS[name]


def build_upstream(name: str, **options) -> Upstream:
    """Build a frozen upstream by registry name."""
    return get_upstream_entry(name).build(**options)


def list_upstreams() -> list[UpstreamEntry]:
    return [UPSTREAMS[name] for name in sorted(UPSTREAMS)]
