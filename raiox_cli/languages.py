"""The languages raiox writes what a person reads in (pages, e-mails, contact sheets),
and which of them a language tag means. The words themselves live with what shows
them: server/messages/ for pages and e-mails, search/sheet.py for sheets."""

from __future__ import annotations

LANGUAGES = ("pt-BR", "en")  # the first is the default (RAIOX_LANG's)


def supported(lang: str | None) -> str | None:
    """The supported language a tag means (pt, pt-PT, pt-br -> pt-BR; en-GB -> en)."""
    if not lang:
        return None
    primary = lang.strip().lower().replace("_", "-").split("-")[0]
    return {"pt": "pt-BR", "en": "en"}.get(primary)
