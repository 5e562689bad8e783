"""Languages of what a person reads (pages, e-mails): one message catalogue per
language in server/messages/, the language chosen from a switch or Accept-Language.

Templates hold keys, never sentences: `t("result.title")`. A key missing from a
catalogue is a bug that the tests catch (every catalogue has the same keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from functools import cache
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2

from raiox_cli.languages import LANGUAGES, supported  # i18n.LANGUAGES, i18n.supported too

FILES = {"pt-BR": "pt_BR.json", "en": "en.json"}


@cache
def catalogue(lang: str) -> dict[str, str]:
    text = resources.files("raiox_cli.server").joinpath("messages", FILES[lang]).read_text("utf-8")
    return json.loads(text)


def preferred(lang: str | None, default: str) -> str:
    """A recorded language if supported, else the server's default (RAIOX_LANG)."""
    return supported(lang) or supported(default) or LANGUAGES[0]


def negotiate(accept_language: str | None, default: str) -> str:
    """The best supported language of an Accept-Language header, else `default`."""
    choices: list[tuple[float, int, str]] = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                continue
        lang = supported(tag)
        if lang and quality > 0:
            choices.append((-quality, position, lang))
    return min(choices)[2] if choices else preferred(None, default)


@dataclass(frozen=True)
class Translator:
    lang: str
    timezone: str = "UTC"  # IANA name: the clinic's, else RAIOX_TIMEZONE

    def __call__(self, key: str, **params: Any) -> str:
        message = catalogue(self.lang)[key]
        return message.format(**params) if params else message

    def number(self, value: float, digits: int = 3) -> str:
        text = f"{value:.{digits}f}"
        return text.replace(".", ",") if self.lang == "pt-BR" else text

    def size(self, diameter: float | None, length: float | None) -> str:
        if diameter is None and length is None:
            return ""
        parts = [self.number(v, 1) if v is not None else "?" for v in (diameter, length)]
        return " \u00d7 ".join(parts) + " mm"  # the multiplication sign

    def when(self, moment: datetime | None) -> str:
        if moment is None:
            return ""
        local = moment.astimezone(zone(self.timezone))
        pattern = "%d/%m/%Y %H:%M" if self.lang == "pt-BR" else "%Y-%m-%d %H:%M"
        return f"{local.strftime(pattern)} {_zone_label(local)}"

    def vocabulary(self, kind: str, value: str | None) -> str | None:
        """A catalogue value of a known vocabulary (a connection: "conical"), in this
        language; free text, and any value not in the vocabulary, as it is."""
        if not value:
            return value
        return catalogue(self.lang).get(f"vocab.{kind}.{value.strip().lower()}", value)

    def seconds(self, value: float) -> str:
        return self("unit.seconds", n=self.number(value, 1))

    def failure(self, analysis: dict[str, Any]) -> str:
        """Why an analysis failed, in words a dentist understands (from error_kind;
        the technical line stays in `error` for the operator)."""
        kind = analysis.get("error_kind") or "internal"
        if kind not in ("image", "download", "catalogue"):
            return self("result.failed.internal", attempts=analysis.get("attempts") or 1)
        return self(f"result.failed.{kind}")


@cache
def zone(name: str | None) -> tzinfo:
    """The time zone of this IANA name; UTC for None or a name this system lacks."""
    try:
        return ZoneInfo(name) if name and name != "UTC" else timezone.utc
    except (ValueError, ZoneInfoNotFoundError):
        return timezone.utc


def _zone_label(moment: datetime) -> str:
    """UTC, or the zone's abbreviation when it has a real one (CET), else its offset
    (-03:00, as São Paulo's zone names it only "-03")."""
    label = moment.strftime("%Z")
    if label in ("UTC", "") or label.isalpha():
        return label or "UTC"
    offset = moment.strftime("%z")
    return f"UTC{offset[:3]}:{offset[3:]}"


@cache
def environment(autoescape: bool = True) -> jinja2.Environment:
    """The templates of server/templates/. Escaping is on for HTML (and off only for
    the plain-text e-mail, where nothing is interpreted as markup)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("raiox_cli.server", "templates"),
        autoescape=jinja2.select_autoescape(["html"]) if autoescape else False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
