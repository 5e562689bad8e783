from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raiox_cli.cli import app

runner = CliRunner()


def _png(path: Path, shade: int = 128) -> Path:
    data = np.full((60, 80), shade, dtype=np.uint8)
    data[20:40, 30:50] = 255 - shade
    Image.fromarray(data).save(path)
    return path


def test_help_lists_commands_and_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("init-db", "embed", "search"):
        assert name in result.output
    assert "Exit codes" in result.output


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['raiox', '--help']\n"
        "from raiox_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().endswith("NO_TORCH")


def test_init_db_then_again(raiox_env) -> None:
    first = runner.invoke(app, ["init-db"])
    assert first.exit_code == 0, first.output
    assert "applied 001_init" in first.output
    second = runner.invoke(app, ["init-db"])
    assert second.exit_code == 0
    assert "nothing to do" in second.output


def test_init_db_unreachable_database_exits_3(raiox_env) -> None:
    result = runner.invoke(app, ["init-db", "--database-url", "postgresql://x:pw@127.0.0.1:1/db"])
    assert result.exit_code == 3
    assert "cannot connect" in result.output
    assert "pw" not in result.output


def test_embed_prints_json_lines_and_reports_bad_files(raiox_env, tmp_path: Path) -> None:
    good = [_png(tmp_path / "a.png", 60), _png(tmp_path / "b.png", 200)]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = runner.invoke(app, ["embed", str(good[0]), str(bad), str(good[1])])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in good]
    assert all(line["model_id"] == "raiox-tiny:none" for line in lines)
    assert all(len(line["embedding"]) == 32 for line in lines)
    assert f"{bad}: " in result.stderr
    assert str(bad) not in result.stdout


def test_embed_out_npy(raiox_env, tmp_path: Path) -> None:
    images = [_png(tmp_path / f"{i}.png", 40 * i) for i in range(3)]
    target = tmp_path / "v.npy"
    result = runner.invoke(app, ["embed", *map(str, images), "--out", str(target)])
    assert result.exit_code == 0, result.output
    vectors = np.load(target)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)


def test_usage_error_exits_2() -> None:
    assert runner.invoke(app, ["embed"]).exit_code == 2
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


@pytest.mark.parametrize("debug", ["", "1"])
def test_tracebacks_only_with_debug(raiox_env, monkeypatch, debug: str) -> None:
    monkeypatch.setenv("RAIOX_DEBUG", debug)
    monkeypatch.setenv("RAIOX_DATABASE_URL", "postgresql://x@127.0.0.1:1/db")
    result = runner.invoke(app, ["init-db"])
    if debug:
        assert result.exception is not None and not isinstance(result.exception, SystemExit)
    else:
        assert result.exit_code == 3
        assert "Traceback" not in result.output


def test_exit_codes_come_from_one_table() -> None:
    """`raiox --help` lists every row of errors.EXIT_CODES, and every error class's code
    is one of them (the README's list is generated from the same rows)."""
    import inspect

    from raiox_cli import errors

    rows = errors.exit_code_rows()
    codes = [code for code, _ in rows]
    assert codes == sorted(codes) and len(set(codes)) == len(codes)
    assert (0, "ok") in rows and (2, "usage error") in rows and 75 in codes
    help_text = " ".join(runner.invoke(app, ["--help"], terminal_width=100).output.split())
    assert " ".join(errors.help_text().split()) in help_text
    for code, meaning in rows:
        if not meaning.startswith("stopped by"):
            assert f"{code} {meaning}" in help_text
    assert "129/130/143 stopped by SIGHUP/SIGINT/SIGTERM" in help_text
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    raised = {c.exit_code for c in classes if issubclass(c, errors.RaioxError)}
    assert raised <= set(codes) and {1, 2, 3, 4, 5, 6, 7, 75} <= raised


def test_clinics_group_and_its_old_name(migrated) -> None:
    """The tenant is a clinic: `raiox clinics`, and `raiox clients` keeps working
    (hidden from --help) for the scripts written before."""
    listed = runner.invoke(app, ["--help"]).output
    assert "clinics" in listed and "clients " not in listed
    added = runner.invoke(app, ["clinics", "add", "sorriso-sp"])
    assert added.exit_code == 0, added.output
    for group in ("clinics", "clients"):
        result = runner.invoke(app, [group, "list", "--json"])
        assert result.exit_code == 0, result.output
        assert [row["name"] for row in json.loads(result.stdout)] == ["sorriso-sp"]
    empty = runner.invoke(app, ["clinics", "revoke", "nobody"])
    assert empty.exit_code == 1 and empty.stderr.startswith("raiox clinics revoke: ")
