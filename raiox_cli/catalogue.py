"""Scan a catalogue folder (and its optional catalogue.csv) into implant records."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")


def _norm(part: str | None) -> str:
    text = unicodedata.normalize("NFKC", part or "").casefold()
    # "/" separates the key's parts, so it may not appear inside one.
    return _SPACES.sub(" ", text.replace("/", "-")).strip()


def implant_key(manufacturer: str, system: str | None, name: str) -> str:
    """The stable key of an implant: `manufacturer/system/name`, each part
    NFKC-normalised, case-folded and whitespace-collapsed, so re-ingesting (or a
    renamed folder that differs only in case or spacing) never duplicates it."""
    return f"{_norm(manufacturer)}/{_norm(system)}/{_norm(name)}"
