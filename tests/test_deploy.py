"""deploy/: the units and the nginx site pass their own tools' checks, and
install-release.sh switches releases and rolls back, run against a temporary
tree with a fake python/pip, systemctl and curl."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SCRIPT = DEPLOY / "install-release.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# python3 -m venv DIR: a release whose pip and raiox only log what they were asked
[ "$1" = -m ] && [ "$2" = venv ] || exit 3
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "pip $*" >> "$FAKE_LOG"\\nexit ${FAKE_PIP_FAIL:-0}\\n' \\
    > "$3/bin/pip"
printf '#!/usr/bin/env bash\\necho "raiox 0"\\n' > "$3/bin/raiox"
chmod +x "$3/bin/pip" "$3/bin/raiox"
"""
FAKE_SYSTEMCTL = """#!/usr/bin/env bash
echo "systemctl $* current=$(basename "$(readlink "$RAIOX_PREFIX/current")")" >> "$FAKE_LOG"
if [ "$1" = start ] && [ -n "${FAKE_MIGRATE_FAIL:-}" ]; then exit 1; fi
"""
FAKE_CURL = """#!/usr/bin/env bash
# healthy unless `current` is the release named in FAKE_UNHEALTHY
case "$(readlink "$RAIOX_PREFIX/current")" in
  *"${FAKE_UNHEALTHY:-never}"*) exit 22 ;;
  *) exit 0 ;;
esac
"""


class Tree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = root / "opt-raiox"
        self.log = root / "calls.log"
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, text in (
            ("python3", FAKE_PYTHON),
            ("systemctl", FAKE_SYSTEMCTL),
            ("curl", FAKE_CURL),
        ):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "RAIOX_PREFIX": str(self.prefix),
            "RAIOX_PYTHON": str(bin_dir / "python3"),
            "RAIOX_SYSTEMCTL": str(bin_dir / "systemctl"),
            "RAIOX_HEALTH_TRIES": "2",
            "RAIOX_HEALTH_DELAY": "0",
            "FAKE_LOG": str(self.log),
        }

    def deploy(self, version: str, **fake: str) -> subprocess.CompletedProcess:
        wheel = self.root / f"raiox-{version}-py3-none-any.whl"
        wheel.write_bytes(b"wheel")
        return subprocess.run(
            ["bash", str(SCRIPT), str(wheel)],
            env={**self.env, **fake},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def current(self) -> str:
        return os.readlink(self.prefix / "current")

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def test_deploy_installs_migrates_switches_and_restarts(tree: Tree) -> None:
    done = tree.deploy("0.2.0")
    assert done.returncode == 0, done.stderr
    release = tree.current()
    assert release.startswith("releases/0.2.0-")
    name = release.split("/", 1)[1]
    assert (tree.prefix / release / "bin" / "raiox").exists()
    calls = tree.calls()
    assert calls[0].startswith("pip install") and calls[0].endswith("raiox-0.2.0-py3-none-any.whl")
    # migrations run for the new release before `current` points at it
    assert calls[1] == f"systemctl start raiox-migrate@{name}.service current="
    assert calls[2] == f"systemctl restart raiox-server.service current={name}"
    assert "is live" in done.stderr


def test_unhealthy_release_rolls_back_to_the_previous_one(tree: Tree) -> None:
    assert tree.deploy("0.2.0").returncode == 0
    good = tree.current()
    bad = tree.deploy("0.3.0", FAKE_UNHEALTHY="0.3.0")
    assert bad.returncode == 1
    assert tree.current() == good
    assert "rolled back to " + good.split("/", 1)[1] in bad.stderr
    restarts = [c for c in tree.calls() if c.startswith("systemctl restart")]
    assert [r.split("current=")[1][:5] for r in restarts] == ["0.2.0", "0.3.0", "0.2.0"]
    assert len(list((tree.prefix / "releases").iterdir())) == 2  # the bad one kept to inspect


def test_failed_migration_switches_nothing(tree: Tree) -> None:
    assert tree.deploy("0.2.0").returncode == 0
    good = tree.current()
    failed = tree.deploy("0.3.0", FAKE_MIGRATE_FAIL="1")
    assert failed.returncode != 0
    assert tree.current() == good
    assert sum(c.startswith("systemctl restart") for c in tree.calls()) == 1


def test_failed_pip_install_switches_nothing(tree: Tree) -> None:
    failed = tree.deploy("0.2.0", FAKE_PIP_FAIL="1")
    assert failed.returncode != 0
    assert not (tree.prefix / "current").exists()
    assert not any(c.startswith("systemctl") for c in tree.calls())


def test_first_release_unhealthy_has_nothing_to_roll_back_to(tree: Tree) -> None:
    failed = tree.deploy("0.2.0", FAKE_UNHEALTHY="0.2.0")
    assert failed.returncode == 1 and "no previous release" in failed.stderr


def test_old_releases_are_pruned_but_never_current_or_previous(tree: Tree) -> None:
    tree.env["RAIOX_KEEP_RELEASES"] = "2"
    for version in ("0.1.0", "0.2.0", "0.3.0", "0.4.0"):
        assert tree.deploy(version).returncode == 0
    kept = sorted(p.name[:5] for p in (tree.prefix / "releases").iterdir())
    assert kept == ["0.3.0", "0.4.0"]


# --- the deploy files, checked by their own tools -------------------------------------


def _fake_raiox(tmp_path: Path) -> Path:
    raiox = tmp_path / "raiox"
    raiox.write_text("#!/bin/sh\nexit 0\n")
    raiox.chmod(0o755)
    return raiox


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize(
    "unit",
    [
        "raiox-server.service",
        "raiox-reindex.service",
        "raiox-reindex.timer",
        "raiox-migrate@.service",
    ],
)
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    raiox = _fake_raiox(tmp_path)
    for path in [*DEPLOY.glob("*.service"), *DEPLOY.glob("*.timer")]:
        text = path.read_text().replace("/opt/raiox/current/bin/raiox", str(raiox))
        text = text.replace("/opt/raiox/releases/%i/bin/raiox", str(raiox))
        (tmp_path / path.name).write_text(text)
    name = unit.replace("@.", "@test.")  # a template is verified as an instance
    if name != unit:
        shutil.copy(tmp_path / unit, tmp_path / name)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warnings


@pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("openssl") is None, reason="no nginx/openssl"
)
def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=raiox.example.com", "-keyout", str(tmp_path / "key.pem")),
            *("-out", str(tmp_path / "cert.pem")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    site = (DEPLOY / "nginx-raiox.conf").read_text()
    live = "/etc/letsencrypt/live/raiox.example.com/"
    site = site.replace(live + "fullchain.pem", str(tmp_path / "cert.pem"))
    site = site.replace(live + "privkey.pem", str(tmp_path / "key.pem"))
    site = site.replace("/var/log/nginx/", f"{tmp_path}/")
    (tmp_path / "site.conf").write_text(site)
    # The site is included at http level, as from /etc/nginx/sites-enabled/.
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    include {tmp_path}/site.conf;\n}}\n"
    )
    done = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
