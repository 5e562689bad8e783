"""Nothing leaves the machine that the operator did not configure, checked the way an
operator would: in a network namespace of its own (loopback only), a resolver on
loopback records every name it is asked while the real CLI runs search, ingest,
ingest --engine ray, adapt, and the server takes a Jotform delivery whose result
goes to a notify URL and by e-mail. Every name asked must be one the test configured.

The part inside the namespace is this file run as a script (`python test_egress.py
SPEC.json`): it brings loopback up, points /etc/resolv.conf and nsswitch.conf (bind
mounts, private to the namespace) at the recorder, starts the configured services
(image host and notify receiver, SMTP, S3) under their test names, runs the commands
and writes what it saw to a report."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

DOMAIN = "raiox.test"
CONFIGURED = {f"{name}.{DOMAIN}" for name in ("images", "notify", "smtp", "objects")}
FORM_ID = "241234567890123"
TOKEN = "egress-token"
# No exception, Ray's included: a local Ray's dashboard asks the cloud metadata servers
# which cloud it runs on whatever its usage-statistics setting, unless it finds a
# ~/ray_bootstrap_config.yaml; raiox starts that one process with a home of its own
# holding an empty one (catalogue/engines/ray.py).


# --- inside the namespace ---------------------------------------------------------------


def _loopback_up() -> None:
    """`ip link set lo up` without needing iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))


def _bind_file(text: str, target: str, folder: Path) -> None:
    source = folder / Path(target).name
    source.write_text(text)
    subprocess.run(["mount", "--bind", str(source), target], check=True)


class Recorder(socketserver.BaseRequestHandler):
    """A DNS server (UDP) that writes down each question: configured names resolve to
    127.0.0.1 (A) or to nothing (AAAA), every other name is NXDOMAIN."""

    asked: ClassVar[list[tuple[str, int, str]]] = []
    step = "services"  # which command was running when a name was asked

    def handle(self) -> None:
        data, sock = self.request
        labels, at = [], 12
        while at < len(data) and data[at]:
            labels.append(data[at + 1 : at + 1 + data[at]].decode("ascii", "replace"))
            at += 1 + data[at]
        qtype = struct.unpack("!H", data[at + 1 : at + 3])[0]
        name = ".".join(labels).lower()
        self.asked.append((name, qtype, self.step))
        question = data[12 : at + 5]
        known = name in CONFIGURED
        answers = b""
        if known and qtype == 1:
            answers = (
                b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
            )
        flags = 0x8180 if known else 0x8183
        header = data[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, self.client_address)


class Site(BaseHTTPRequestHandler):
    """The image host (GET /xray.png) and the notify receiver (POST /notify)."""

    image = b""
    notified: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/xray.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.notified.append({"path": self.path, "body": json.loads(body or b"{}")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _services(spec: dict[str, Any]) -> tuple[dict[str, str], list[Any], Any]:
    """Starts the configured services; returns the environment naming them."""
    # moto reads a named S3 endpoint's first label as a bucket (virtual-host style);
    # raiox addresses buckets by path, as S3-compatible services expect.
    os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"
    from aiosmtpd.controller import Controller
    from moto.server import ThreadedMotoServer

    Site.image = Path(spec["query"]).read_bytes()
    site = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()

    class Mail:
        messages: ClassVar[list[str]] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append(envelope.content.decode("utf-8", "replace"))
            return "250 OK"

    mail = Mail()
    smtp_port = _free_port()
    smtp = Controller(mail, hostname="127.0.0.1", port=smtp_port, server_hostname="smtp")
    smtp.start()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    s3_port = moto.get_host_and_port()[1]
    endpoint = f"http://objects.{DOMAIN}:{s3_port}"
    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1"
    ).create_bucket(Bucket="raiox-egress")
    web = f"http://images.{DOMAIN}:{site.server_address[1]}"
    env = {
        "RAIOX_S3_BUCKET": "raiox-egress",
        "RAIOX_S3_ENDPOINT": endpoint,
        "RAIOX_S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "RAIOX_NOTIFY_URL": f"http://notify.{DOMAIN}:{site.server_address[1]}/notify",
        "RAIOX_SMTP_URL": f"smtp://smtp.{DOMAIN}:{smtp_port}?tls=none",
        "RAIOX_SMTP_FROM": "raiox@clinic.example",
        "RAIOX_WEBHOOK_TOKEN": TOKEN,
        "RAIOX_NOTIFY_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "RAIOX_JOTFORM_FORM_IDS": FORM_ID,
        "RAIOX_DOWNLOAD_ALLOW_LOOPBACK": "1",
        "RAIOX_PUBLIC_URL": "https://raiox.example.com",
    }
    return env, [site.shutdown, smtp.stop, moto.stop], (web, mail)


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> dict[str, Any]:
    Recorder.step = " ".join(a for a in args if not a.startswith("/"))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "raiox_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return {
        "args": list(args),
        "rc": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "out": done.stdout[-2000:],
        "err": done.stderr[-3000:],
    }


def _jotform(image_url: str) -> list[tuple[str, Any]]:
    raw = {
        "q3_clinicId": "clinic-egress",
        "q6_email": "dentista@clinic.example",
        "temp_upload": {"q5_xrayImage": ["xray.png#d41d8cd9"]},
        "xrayImage": [image_url],
    }
    return [
        ("formID", (None, FORM_ID)),
        ("submissionID", (None, "5712345678900000042")),
        ("formTitle", (None, "Implant X-ray")),
        ("rawRequest", (None, json.dumps(raw))),
    ]


def _server_step(env: dict[str, str], web: str, mail: Any, log: Path) -> dict[str, Any]:
    import httpx

    Recorder.step = "serve-webhook-minimal"
    port = _free_port()
    with log.open("ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "raiox_cli", "serve-webhook-minimal", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    step: dict[str, Any] = {"args": ["serve-webhook-minimal"], "rc": None}
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthcheck").status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                step["err"] = log.read_text(errors="replace")[-3000:]
                return step
            time.sleep(0.2)
        answer = httpx.post(f"{base}/webhook?token={TOKEN}", files=_jotform(f"{web}/xray.png"))
        step["accepted"] = answer.status_code
        analysis_id = answer.json().get("id")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = httpx.get(f"{base}/analyses/{analysis_id}", headers={"x-raiox-token": TOKEN})
            result = state.json()
            sent = result.get("notifications", {})
            if result.get("status") in ("done", "failed") and all(
                sent.get(channel, {}).get("status") in ("sent", "failed")
                for channel in ("webhook", "email")
            ):
                break
            time.sleep(0.3)
        step["analysis"] = result
        step["notified"] = len(Site.notified)
        step["emails"] = len(mail.messages)
    finally:
        server.send_signal(signal.SIGTERM)
        step["rc"] = server.wait(60)
        step["err"] = log.read_text(errors="replace")[-3000:]
    return step


def inside(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    _loopback_up()
    _bind_file("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n", "/etc/resolv.conf", work)
    _bind_file("hosts: files dns\n", "/etc/nsswitch.conf", work)
    dns = socketserver.ThreadingUDPServer(("127.0.0.1", 53), Recorder)
    threading.Thread(target=dns.serve_forever, daemon=True).start()
    report: dict[str, Any] = {"steps": [], "asked": Recorder.asked}
    try:
        services, stops, (web, mail) = _services(spec)
        home = Path(spec["home"])
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAIOX_", "HF_"))}
        base.pop("RAIOX_THIRD_PARTY_TELEMETRY", None)
        env = {
            **base,
            **spec["model_env"],
            **services,
            "HOME": str(home),
            "RAIOX_HOME": str(home / "raiox"),
            "RAIOX_DATABASE_URL": spec["database_url"],
            "RAIOX_BACKEND": "onnx",
        }
        ray_env = {**env, "RAIOX_DATABASE_URL": spec["ray_database_url"]}
        steps = report["steps"]
        steps.append(_run(env, "init-db"))
        steps.append(_run(env, "ingest", spec["catalogue"], "--json"))
        steps.append(_run(env, "search", spec["query"], "--json"))
        steps.append(_run(ray_env, "init-db"))
        steps.append(_run(ray_env, "ingest", spec["catalogue"], "--engine", "ray", "--json"))
        steps.append(
            _run(
                {**env, "RAIOX_BACKEND": "torch"},
                *("adapt", "--steps", "2", "--batch-size", "8", "--holdout-implants", "0"),
                *("--val-labels", spec["queries"]),
                *("--out", str(work / "adapted"), "--json"),
            )
        )
        steps.append(_server_step(env, web, mail, work / "server.log"))
        for stop in stops:
            with contextlib.suppress(Exception):
                stop()
    finally:
        dns.shutdown()
        Path(spec["report"]).write_text(json.dumps(report, indent=1))


# --- the test ---------------------------------------------------------------------------


def _unshare() -> list[str]:
    """The command that enters a new network and mount namespace, or skip (loudly)."""
    tool = shutil.which("unshare")
    command = [tool, "--net", "--mount"] if tool else []
    if tool and os.geteuid() != 0:
        command.append("--map-root-user")
    probe = subprocess.run([*command, "true"], capture_output=True, text=True) if tool else None
    if probe is None or probe.returncode != 0:
        why = probe.stderr.strip() if probe else "no unshare(1) on PATH"
        pytest.skip(f"EGRESS NOT CHECKED: cannot create a network namespace here ({why})")
    return command


ORT_SESSION = """
import numpy as np, onnx, onnxruntime
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = onnxruntime.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
session.run(None, {"x": np.ones(1, np.float32)})
"""


@pytest.mark.parametrize("opt_in", [None, "1"])
def test_onnx_runtime_writes_no_device_id_unless_the_operator_opts_in(
    tmp_path: Path, opt_in: str | None
) -> None:
    """ONNX Runtime's telemetry client writes its device id when the library loads;
    importing raiox first (as every raiox process does) keeps it off."""
    # ONNX Runtime writes no device id at all on a machine it takes for a CI runner (CI,
    # GITHUB_ACTIONS, ... are in its library), so the opt-in control would see nothing
    # there: the child runs as on an operator's server, without those markers.
    env = {k: v for k, v in os.environ.items() if k not in _OFF_KEYS and k not in _CI_MARKERS}
    # ONNX Runtime writes under $XDG_CACHE_HOME when it is set (a CI runner often sets
    # it), else under $HOME/.cache: point both into tmp_path so the write is seen.
    env.update(
        HOME=str(tmp_path),
        XDG_CACHE_HOME=str(tmp_path / ".cache"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    if opt_in:
        env["RAIOX_THIRD_PARTY_TELEMETRY"] = opt_in
    done = subprocess.run(
        [sys.executable, "-c", "import raiox_cli\n" + ORT_SESSION],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("deviceid"))
    assert bool(written) == bool(opt_in), written


def test_every_switch_is_set_at_import_and_the_opt_in_leaves_them_alone() -> None:
    from raiox_cli import lifecycle

    env = {"RAY_USAGE_STATS_ENABLED": "1", "HF_HUB_DISABLE_TELEMETRY": "0"}
    assert lifecycle.keep_telemetry_off(env) is True
    assert env == lifecycle.TELEMETRY_OFF  # overrides what a shell profile left behind
    chosen = {"RAIOX_THIRD_PARTY_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "1"}
    assert lifecycle.keep_telemetry_off(chosen) is False
    assert chosen == {"RAIOX_THIRD_PARTY_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "1"}
    probe = "import os, raiox_cli; print(os.environ['RAY_USAGE_STATS_ENABLED'])"
    env = {k: v for k, v in os.environ.items() if k not in _OFF_KEYS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "0", done.stderr


_OFF_KEYS = {"RAIOX_THIRD_PARTY_TELEMETRY", "ORT_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED"}
# The environment variables by which ONNX Runtime 1.32 recognises a CI runner (strings in
# its library next to each other; CI=1 alone was seen to stop the write).
_CI_MARKERS = {
    *("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL"),
    *("CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR"),
    *("BITBUCKET_BUILD_NUMBER", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI"),
}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_no_name_is_looked_up_beyond_the_configured_hosts(
    tmp_path: Path, database_url: str, pg_server_url: str
) -> None:
    from raiox_cli.training import synth
    from tests.helpers.env import TINY_ENV, fresh_database

    command = _unshare()
    info = synth.make_catalogue(tmp_path / "synth", systems=3, views=2, queries=1, size=(64, 80))
    query = next(p for p in sorted(info.queries_dir.rglob("*")) if p.is_file())
    # Outside pytest's temporary root: the namespace's root user must reach it.
    work = Path(tempfile.mkdtemp(prefix="raiox-egress-"))
    try:
        spec = {
            "work": str(work),
            "home": str(work / "home"),
            "report": str(work / "report.json"),
            "catalogue": str(info.catalogue),
            "query": str(query),
            "queries": str(info.queries_dir),
            "database_url": database_url,
            "ray_database_url": fresh_database(pg_server_url),
            "model_env": {k: v for k, v in TINY_ENV.items() if not k.startswith("HF_")},
        }
        (work / "home").mkdir()
        (work / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(
            [*command, sys.executable, __file__, str(work / "spec.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=1400,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads((work / "report.json").read_text())
        for step in report["steps"]:
            assert step["rc"] == 0, json.dumps(step, indent=1)
        server = report["steps"][-1]
        assert server["accepted"] == 202 and server["analysis"]["status"] == "done", server
        assert server["notified"] >= 1 and server["emails"] == 1, server
        asked = {name for name, _, _ in report["asked"]}
        foreign = {(name, step) for name, _, step in report["asked"] if name not in CONFIGURED}
        assert not foreign, f"looked up beyond the configured hosts: {foreign}"
        assert {f"images.{DOMAIN}", f"objects.{DOMAIN}", f"notify.{DOMAIN}"} <= asked
        # ONNX Runtime's device id: never written while its telemetry is off.
        assert not (work / "home" / ".cache" / "Microsoft").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    inside(sys.argv[1])
