"""The installed console scripts, as a user runs them: `ztd` as a process, `ztctl` against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLES = REPO / "examples" / "mesh"


def script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed next to {sys.executable}"
    return str(path)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )


def one_clean_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err


class Ztd:
    def __init__(self, state: Path, config_dir: Path = EXAMPLES, *extra: str) -> None:
        self.ports = {"xds": free_port(), "secure": free_port(), "monitoring": free_port()}
        self.state = state
        self.proc = subprocess.Popen(
            [
                script("ztd"),
                "--state-dir",
                str(state),
                "--config-dir",
                str(config_dir),
                "--xds-port",
                str(self.ports["xds"]),
                "--monitoring-port",
                str(self.ports["monitoring"]),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "ZTD_SECURE_PORT": str(self.ports["secure"])},
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['monitoring']}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("ztd did not become ready")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        return self.proc.returncode, out


@pytest.fixture
def ztd_proc(tmp_path: Path) -> Iterator[Ztd]:
    z = Ztd(tmp_path / "state")
    try:
        z.wait_ready()
        yield z
    finally:
        if z.proc.poll() is None:
            z.stop()


def test_token_issue_root_and_graceful_stop(ztd_proc: Ztd, tmp_path: Path) -> None:
    state = str(ztd_proc.state)
    token = run(script("ztctl"), "token", "create", "shop/frontend", "--state-dir", state, "--duration", "10m")
    assert token.returncode == 0, token.stderr
    out_dir = tmp_path / "wl"
    issued = run(
        script("ztctl"),
        "x",
        "ca",
        "issue",
        "--token",
        token.stdout.strip(),
        "--address",
        f"127.0.0.1:{ztd_proc.ports['secure']}",
        "--state-dir",
        state,
        "--out-dir",
        str(out_dir),
    )
    assert issued.returncode == 0, issued.stderr
    assert "identity:    spiffe://cluster.local/ns/shop/sa/frontend" in issued.stdout
    assert (out_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    verify = run("openssl", "verify", "-CAfile", str(out_dir / "root-cert.pem"), str(out_dir / "cert-chain.pem"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    root = run(script("ztctl"), "ca", "root", "--state-dir", state)
    assert root.returncode == 0 and root.stdout == (ztd_proc.state / "root-cert.pem").read_text()
    assert root.stdout == (out_dir / "root-cert.pem").read_text()
    code, log = ztd_proc.stop()
    assert code == 0, log
    assert "ztd stopped" in log
    assert token.stdout.strip() not in log  # tokens are never logged


def test_node_agent_impersonation_from_the_examples(ztd_proc: Ztd) -> None:
    state = str(ztd_proc.state)
    token = run(
        script("ztctl"),
        "token",
        "create",
        "istio-system/ztunnel",
        "--pod",
        "ztunnel-node-a",
        "--config-dir",
        str(EXAMPLES),
        "--state-dir",
        state,
    ).stdout.strip()
    address = f"127.0.0.1:{ztd_proc.ports['secure']}"
    ok = run(
        script("ztctl"),
        "x",
        "ca",
        "issue",
        "--token",
        token,
        "--address",
        address,
        "--state-dir",
        state,
        "--impersonate",
        "spiffe://cluster.local/ns/shop/sa/cart",
    )
    assert ok.returncode == 0, ok.stderr
    assert "spiffe://cluster.local/ns/shop/sa/cart" in ok.stdout
    # ledger-1 runs on node-a too, but the debug pod (shop/default) runs on node-b only.
    refused = run(
        script("ztctl"),
        "x",
        "ca",
        "issue",
        "--token",
        token,
        "--address",
        address,
        "--state-dir",
        state,
        "--impersonate",
        "spiffe://cluster.local/ns/shop/sa/default",
    )
    assert refused.returncode == 1
    one_clean_line(refused.stderr)
    assert "UNAUTHENTICATED: request impersonation authentication failure" in refused.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["token", "create", "frontend"], 1, "is not NAMESPACE/SERVICEACCOUNT"),
        (["token", "create", "shop/frontend", "--state-dir", "/nonexistent"], 1, "no token issuer key"),
        (["token", "create", "shop/frontend", "--duration", "soon"], 2, "invalid duration"),
        (["ca", "root", "--state-dir", "/nonexistent"], 1, "no root bundle"),
        (["x", "ca", "issue", "--state-dir", "/nonexistent", "--token", "t"], 1, "cannot read root bundle"),
        (["x", "ca", "issue"], 1, "give --token or --token-file"),
        (["nope"], 2, "invalid choice"),
    ],
)
def test_ztctl_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    result = run(script("ztctl"), *args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    one_clean_line(result.stderr)


def test_ztctl_env_vars(tmp_path: Path) -> None:
    result = run(script("ztctl"), "ca", "root", env={"ZTD_STATE_DIR": str(tmp_path / "missing")})
    assert result.returncode == 1 and str(tmp_path / "missing") in result.stderr


def test_ztd_refuses_bad_start_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pods.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nstatus:\n  podIP: nope\n")
    cases = [
        ([script("ztd"), "--xds-port", "x"], 2, "argument --xds-port"),
        (
            [script("ztd"), "--state-dir", str(tmp_path / "s1"), "--cacerts-dir", str(tmp_path / "none")],
            1,
            "has neither ca-cert.pem nor tls.crt",
        ),
        ([script("ztd"), "--state-dir", str(tmp_path / "s2"), "--config-dir", str(broken)], 1, "pods.yaml:6"),
        ([script("ztd"), "--max-workload-cert-ttl", "1h"], 2, "smaller than --default-workload-cert-ttl"),
        ([script("ztd"), "--ca-trusted-node-accounts", "ztunnel"], 2, "is not <namespace>/<serviceaccount>"),
    ]
    ports = {
        "ZTD_SECURE_PORT": str(free_port()),
        "ZTD_XDS_PORT": str(free_port()),
        "ZTD_MONITORING_PORT": str(free_port()),
    }
    for args, code, message in cases:
        result = run(*args, env=ports)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_ztd_port_in_use(ztd_proc: Ztd, tmp_path: Path) -> None:
    result = run(
        script("ztd"),
        "--state-dir",
        str(tmp_path / "s"),
        "--monitoring-port",
        str(ztd_proc.ports["monitoring"]),
        "--xds-port",
        str(free_port()),
        env={"ZTD_SECURE_PORT": str(free_port())},
    )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr
