"""Generate the reference pages from the code, so they cannot drift from it.

    python docs/gen.py           write every generated page (and the README's exit codes)
    python docs/gen.py --check   exit 1 naming each page that is stale (tests/test_docs.py)

The CLI reference is each command's own `--help` (the Typer app), the configuration
reference is `Settings`' field metadata (raiox_cli/config.py), the HTTP API reference
is the server's OpenAPI document, and the exit codes are errors.py's table. Guides are
written by hand; a generated region inside a hand-written file sits between
`<!-- generated: NAME -->` and `<!-- end generated -->` markers (the pattern of cog).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python docs/gen.py"
WIDTH = 100  # the terminal width the --help texts are rendered at


# --- the CLI -------------------------------------------------------------------------


def _click_root() -> Any:
    import typer

    from raiox_cli.cli import app

    return typer.main.get_command(app)


def commands() -> Iterator[tuple[list[str], Any]]:
    """(path, click command) for every visible command, groups before their members,
    in the order `raiox --help` lists them."""

    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        if hasattr(command, "list_commands"):  # a group (typer vendors its own click)
            ctx = command.context_class(command, info_name=" ".join(["raiox", *path]))
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    yield from walk([*path, name], sub)

    yield from walk([], _click_root())


def help_text(path: list[str]) -> str:
    """What `raiox PATH --help` prints, at a fixed width."""
    from typer.testing import CliRunner

    from raiox_cli.cli import app

    env = {"COLUMNS": str(WIDTH), "TERM": "dumb", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, [*path, "--help"], env=env, terminal_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"raiox {' '.join(path)} --help exited {result.exit_code}")
    return "\n".join(line.rstrip() for line in result.output.strip().splitlines())


def _anchor(path: list[str]) -> str:
    return "-".join(["raiox", *path])


def cli_reference() -> str:
    entries = list(commands())
    lines = [
        "# Command-line reference",
        "",
        "Every command's `--help`, as `raiox COMMAND --help` prints it. Settings that an",
        "option names as `[env ...]` are described in the "
        "[configuration reference](configuration.md); exit codes are in",
        "[exit codes](exit-codes.md).",
        "",
    ]
    for path, command in entries[1:]:
        name = " ".join(["raiox", *path])
        first = command.get_short_help_str(limit=300)  # the help's first sentence
        indent = "  " * (len(path) - 1)
        lines.append(f"{indent}- [`{name}`](#{_anchor(path)}): {first}")
    lines.append("")
    for path, _command in entries:
        name = " ".join(["raiox", *path])
        level = "#" * (len(path) + 1) if path else "##"
        lines += [f"{level} {name} {{#{_anchor(path)}}}", "", "```text", help_text(path), "```", ""]
    return "\n".join(lines)


def undocumented_cli() -> list[str]:
    """Every visible command and option without a help text: what the reference
    would show empty."""
    missing = []
    for path, command in commands():
        name = " ".join(["raiox", *path])
        if not (command.help or command.short_help):
            missing.append(f"{name}: no help text (the command's docstring)")
        for param in command.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            if not getattr(param, "help", None):
                kind = param.param_type_name  # "option" or "argument"
                label = "/".join(param.opts) if kind == "option" else param.name
                missing.append(f"{name}: {kind} {label} has no help text")
    return missing


# --- configuration -------------------------------------------------------------------


def _default_doc(f: dataclasses.Field) -> str:
    if "default_doc" in f.metadata:
        return f.metadata["default_doc"]
    if f.default is dataclasses.MISSING or f.default is None:
        return "unset"
    value = f.default
    if isinstance(value, bool):
        return "`1` (on)" if value else "`0` (off)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_fields() -> list[dataclasses.Field]:
    from raiox_cli import config

    return list(dataclasses.fields(config.Settings))


def configuration_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every setting resolves as: command-line option > environment variable > default.",
        "An empty variable counts as unset. Booleans are on for `1`, `true`, `yes` or `on`.",
        "Secrets (marked so) have no default and never appear in logs or `repr`. No",
        "credentials live in code or defaults: S3 keys come from the usual `AWS_*`",
        "variables (boto3's chain), the database password from `~/.pgpass` or `PGPASSWORD`.",
        "",
    ]
    group = None
    for f in settings_fields():
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines += ["", f"## {group}", "", "| variable | default | meaning |", "|---|---|---|"]
        meaning = f.metadata.get("help", "").replace("|", "\\|")
        if not f.repr:
            meaning += " (secret)"
        lines.append(f"| `{f.metadata['env']}` | {_default_doc(f)} | {meaning} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def undocumented_settings() -> list[str]:
    missing = []
    for f in settings_fields():
        for key in ("env", "help", "group"):
            if not f.metadata.get(key):
                missing.append(
                    f"Settings.{f.name}: no {key!r} in its field metadata (raiox_cli/config.py)"
                )
    return missing


def unknown_variables() -> list[str]:
    """RAIOX_* names the package mentions that no setting declares: a variable read
    behind the resolver's back, or a message naming a variable that does not exist."""
    known = {f.metadata.get("env") for f in settings_fields()}
    found = []
    for path in sorted((ROOT / "raiox_cli").rglob("*.py")):
        for name in sorted(set(re.findall(r"\bRAIOX_[A-Z0-9_]*[A-Z0-9]", path.read_text()))):
            if name not in known:
                found.append(f"{path.relative_to(ROOT)}: {name} is no setting in config.Settings")
    return found


# --- the HTTP API --------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The server's /openapi.json, built without starting it (a throwaway home; the
    document depends on the routes and models only)."""
    from raiox_cli import config
    from raiox_cli.server.app import ServerConfig, create_app

    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
        settings = config.resolve({**env, "RAIOX_HOME": home})
        app = create_app(ServerConfig(settings, None, None))  # type: ignore[arg-type]
        return app.openapi()


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:  # a link to its entry under "Schemas"
        from markdown.extensions.toc import slugify

        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{slugify(name, '-')})"
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    return schema.get("type", "object")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def http_reference() -> str:
    document = openapi_document()
    info = document["info"]
    lines = [
        "# HTTP API reference",
        "",
        f"Generated from the server's OpenAPI document ({info['title']} {info['version']}). "
        "A running server serves the same document at `/openapi.json` and browses it at "
        "`/docs`.",
        "",
        info.get("description", "").strip(),
        "",
        "## Authentication",
        "",
        "| scheme | how | meaning |",
        "|---|---|---|",
    ]
    schemes = document.get("components", {}).get("securitySchemes", {})
    for name, scheme in schemes.items():
        how = (
            "`Authorization: Bearer ...`"
            if scheme["type"] == "http"
            else f"{scheme['in']} `{scheme['name']}`"
        )
        lines.append(f"| `{name}` | {how} | {_cell(scheme.get('description', ''))} |")
    lines += ["", "## Operations", ""]
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            lines += [f"### {method.upper()} `{path}`", ""]
            if op.get("summary"):
                lines += [f"**{op['summary']}**", ""]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            if op.get("security") == []:
                lines += ["No authentication.", ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required | meaning |", "|---|---|---|---|---|"]
                for p in params:
                    schema = p.get("schema", {})
                    bounds = ", ".join(
                        f"{k} {schema[k]}"
                        for k in ("minimum", "maximum", "maxLength")
                        if k in schema
                    )
                    kind = _schema_name(schema) + (f" ({bounds})" if bounds else "")
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {kind} | "
                        f"{'yes' if p.get('required') else 'no'} | "
                        f"{_cell(p.get('description', ''))} |"
                    )
                lines.append("")
            body = op.get("requestBody")
            if body:
                kinds = ", ".join(
                    f"`{media}` ({_schema_name(c.get('schema', {}))})"
                    for media, c in body.get("content", {}).items()
                )
                lines += [f"Request body: {kinds}.", ""]
            lines += ["| status | meaning | body |", "|---|---|---|"]
            for status, response in op.get("responses", {}).items():
                content = response.get("content") or {}
                bodies = ", ".join(
                    f"`{media}` {_schema_name(c.get('schema', {}))}" for media, c in content.items()
                )
                lines.append(f"| {status} | {_cell(response.get('description', ''))} | {bodies} |")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += [f"### {name}", ""]
        if schema.get("description"):
            lines += [_cell(schema["description"]), ""]
        properties = schema.get("properties", {})
        if properties:
            required = set(schema.get("required", []))
            lines += ["| field | type | required | meaning |", "|---|---|---|---|"]
            for field_name, prop in properties.items():
                lines.append(
                    f"| `{field_name}` | {_schema_name(prop)} | "
                    f"{'yes' if field_name in required else 'no'} | "
                    f"{_cell(prop.get('description', ''))} |"
                )
            lines.append("")
    return "\n".join(lines)


# --- exit codes ----------------------------------------------------------------------


def exit_code_rows() -> list[tuple[int, str]]:
    from raiox_cli import errors

    return errors.exit_code_rows()


def exit_codes_table() -> str:
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code} | {meaning} |" for code, meaning in exit_code_rows()]
    return "\n".join(rows)


def exit_codes_reference() -> str:
    return "\n".join(
        [
            "# Exit codes",
            "",
            "Every command exits with one of these (the table in `raiox_cli/errors.py`,",
            "which `raiox --help` prints too). A problem the user can fix comes with one",
            "line on stderr saying what to do; `RAIOX_DEBUG=1` shows the traceback.",
            "",
            exit_codes_table(),
            "",
            "A command stopped by signal N exits 128 + N, as a shell reports it. The",
            "server's normal end is a signal: after a graceful shutdown it exits 0.",
            "",
        ]
    )


# --- the pages -----------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/cli.md": cli_reference,
    "docs/reference/configuration.md": configuration_reference,
    "docs/reference/http-api.md": http_reference,
    "docs/reference/exit-codes.md": exit_codes_reference,
}
# Generated regions inside hand-written files: file -> {region name: generator}.
REGIONS: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"exit-codes": exit_codes_table},
}
HEADER = "<!-- Generated by {cmd} from the code: edit the code, then run it again. -->\n\n"


def _page(text: str) -> str:
    return HEADER.format(cmd=REGENERATE) + text.rstrip() + "\n"


def _with_regions(text: str, regions: dict[str, Callable[[], str]], where: str) -> str:
    for name, make in regions.items():
        pattern = re.compile(
            rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- end generated -->)", re.S
        )
        if not pattern.search(text):
            raise RuntimeError(f"{where}: no '<!-- generated: {name} -->' region")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def expected() -> dict[Path, str]:
    """Every generated file's content as the code says it should be."""
    files = {ROOT / name: _page(make()) for name, make in PAGES.items()}
    for name, regions in REGIONS.items():
        path = ROOT / name
        files[path] = _with_regions(path.read_text(encoding="utf-8"), regions, name)
    return files


def stale() -> list[str]:
    """The generated files whose content differs from what the code gives."""
    return [
        str(path.relative_to(ROOT))
        for path, text in expected().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str]) -> int:
    problems = undocumented_cli() + undocumented_settings() + unknown_variables()
    for line in problems:
        print(f"undocumented: {line}", file=sys.stderr)
    if "--check" in argv:
        old = stale()
        for name in old:
            print(f"stale: {name}; run {REGENERATE}", file=sys.stderr)
        return 1 if old or problems else 0
    for path, text in expected().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's raiox_cli, not another install's
    sys.exit(main(sys.argv[1:]))
