"""Message catalogues: the same keys in every language, every key a template uses
exists, and the language is chosen as a browser asks."""

from __future__ import annotations

import re
import string
from importlib import resources

import pytest

from raiox_cli.server import i18n

TEMPLATES = resources.files("raiox_cli.server").joinpath("templates")
LITERAL_KEY = re.compile(r"""\bt\(\s*["']([a-z0-9_.-]+)["']\s*[,)]""")
BUILT_KEY = re.compile(r"""\bt\(\s*["']([a-z0-9_.-]+)["']\s*~""")


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_catalogues_have_the_same_keys_and_placeholders() -> None:
    english, portuguese = i18n.catalogue("en"), i18n.catalogue("pt-BR")
    assert set(english) == set(portuguese)
    for key, text in english.items():
        assert text.strip() and portuguese[key].strip(), key
        assert _placeholders(text) == _placeholders(portuguese[key]), key


def test_every_key_a_template_uses_exists() -> None:
    keys = set(i18n.catalogue("en"))
    used, prefixes = set(), set()
    for template in TEMPLATES.iterdir():
        text = template.read_text("utf-8")
        used |= set(LITERAL_KEY.findall(text))
        prefixes |= set(BUILT_KEY.findall(text))
    assert used and used <= keys, used - keys
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("pt-BR,pt;q=0.9,en-US;q=0.8,en;q=0.7", "pt-BR"),
        ("en-US,en;q=0.9", "en"),
        ("pt-PT", "pt-BR"),
        ("fr-FR,fr;q=0.9,en;q=0.5", "en"),
        ("fr-FR", "pt-BR"),  # nothing we have: the server's default
        ("", "pt-BR"),
        ("en;q=0.2,pt;q=0.8", "pt-BR"),
        ("pt;q=0,en", "en"),
    ],
)
def test_language_from_accept_language(header: str, expected: str) -> None:
    assert i18n.negotiate(header, "pt-BR") == expected


def test_numbers_and_dates_read_as_each_language_writes_them() -> None:
    pt, en = i18n.Translator("pt-BR"), i18n.Translator("en")
    assert (pt.number(0.93456), en.number(0.93456)) == ("0,935", "0.935")
    assert pt.size(4.1, 10) == "4,1 \u00d7 10,0 mm" and en.size(None, None) == ""
