"""`ztctl x authz check` offline: the example mesh's decisions, output formats, and one-line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from ztctl.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"
CART = "spiffe://cluster.local/ns/shop/sa/cart"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
SHOP_DEFAULT = "spiffe://cluster.local/ns/shop/sa/default"
STRICT = "istio-system/istio_converted_static_strict"


def run(capsys: pytest.CaptureFixture[str], *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    rc = main(["x", "authz", "check", *args], environ=env or {})
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    ("src", "dst", "port", "verdict", "policy"),
    [
        (CART, "payments/ledger-1", 9000, "ALLOW", "payments/ledger-allow-cart"),
        (CART, "payments/ledger-2", 9001, "DENY", "(default)"),  # ALLOW covers port 9000 only
        (FRONTEND, "payments/ledger-1", 9000, "DENY", "(default)"),
        (SHOP_DEFAULT, "payments/ledger-1", 9000, "DENY", "payments/deny-debug"),
        ("", "payments/ledger-1", 9000, "DENY", STRICT),  # plaintext into a STRICT namespace
        ("", "shop/frontend-1", 8080, "ALLOW", "shop/frontend-allow-all"),  # shop stays PERMISSIVE
        (FRONTEND, "shop/cart-1", 8080, "ALLOW", "shop/cart-allow-frontend"),
        (SHOP_DEFAULT, "shop/cart-1", 8080, "DENY", "(default)"),  # the L7-only rule was dropped
        (SHOP_DEFAULT, "shop/debug", 22, "ALLOW", "(default)"),  # no ALLOW policy applies
    ],
)
def test_example_mesh_decisions(
    capsys: pytest.CaptureFixture[str], src: str, dst: str, port: int, verdict: str, policy: str
) -> None:
    args = ["--config-dir", str(EXAMPLES), "--dst", dst, "--port", str(port)]
    if src:
        args += ["--src", src]
    rc, out, err = run(capsys, *args)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[:2] == [verdict, policy]
    assert lines[2].startswith("reason: ")


def test_json_and_yaml_output(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config-dir", str(EXAMPLES), "--dst", "payments/ledger-1", "--port", "9000", "--src", SHOP_DEFAULT]
    rc, out, _ = run(capsys, *args, "-o", "json")
    assert rc == 0
    doc = json.loads(out)
    assert (doc["decision"], doc["policy"]) == ("DENY", "payments/deny-debug")
    assert doc["destination"] == {"workload": "Kubernetes//Pod/payments/ledger-1", "ip": "10.244.1.20", "port": 9000}
    assert doc["source"] == {"identity": SHOP_DEFAULT, "ip": None}
    rc, out, _ = run(capsys, "--config-dir", str(EXAMPLES), "--dst", "shop/debug", "--port", "80", "-o", "yaml")
    doc = yaml.safe_load(out)
    assert (rc, doc["decision"], doc["policy"]) == (0, "ALLOW", None)
    assert doc["reason"] == "no ALLOW policy applies to shop/debug"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(text).lstrip())
    return tmp_path


NS_AND_POD = """
apiVersion: v1
kind: Namespace
metadata: {name: ns1, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: ns1, labels: {app: server}}
status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: gone, namespace: ns1}
status: {phase: Failed, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: waiting, namespace: ns1}
status: {phase: Pending}
"""


def test_src_ip_is_checked_against_ip_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write(
        tmp_path,
        NS_AND_POD
        + """
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: block-lab, namespace: ns1}
        spec:
          action: DENY
          rules:
          - from: [{source: {ipBlocks: ["192.0.2.0/24", "2001:db8::/32"]}}]
        """.replace("\n        ", "\n"),
    )
    base = ["--config-dir", str(root), "--dst", "ns1/server", "--port", "80"]
    assert run(capsys, *base, "--src-ip", "192.0.2.77")[1].splitlines()[:2] == ["DENY", "ns1/block-lab"]
    assert run(capsys, *base, "--src-ip", "198.51.100.1")[1].splitlines()[0] == "ALLOW"
    # An IPv6 caller reaches the pod's IPv6 address and is matched against the IPv6 block.
    rc, out, _ = run(capsys, *base, "--src-ip", "2001:db8::9", "-o", "json")
    doc = json.loads(out)
    assert rc == 0
    assert (doc["decision"], doc["destination"]["ip"], doc["source"]["ip"]) == ("DENY", "fd00::1", "2001:db8::9")
    # Without --src-ip the caller's address is unknown and never inside a block.
    assert run(capsys, *base)[1].splitlines()[0] == "ALLOW"


def test_dry_run_policy_is_reported_not_enforced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write(
        tmp_path,
        NS_AND_POD
        + """
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: try-lockdown, namespace: ns1, annotations: {istio.io/dry-run: "true"}}
        spec: {}
        """.replace("\n        ", "\n"),
    )
    args = ["--config-dir", str(root), "--dst", "ns1/server", "--port", "80", "--dry-run-policies"]
    rc, out, err = run(capsys, *args)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "ALLOW",
        "(default)",
        "reason: no ALLOW policy applies to ns1/server",
        "note: dry-run: no ALLOW policy matched; enforcing the dry-run policies would deny",
    ]


def test_config_dir_from_environment(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--dst", "shop/debug", "--port", "80", env={"ZTD_CONFIG_DIR": str(EXAMPLES)})
    assert (rc, out.splitlines()[0]) == (0, "ALLOW")


BAD_YAML = """
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: ns1}
status: {podIP: not-an-ip}
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dst", "shop", "--port", "80"], "--dst 'shop' is not NAMESPACE/POD"),
        (["--dst", "shop/a/b", "--port", "80"], "--dst 'shop/a/b' is not NAMESPACE/POD"),
        (["--port", "80"], "--dst NAMESPACE/POD is required"),
        (["--dst", "shop/ghost", "--port", "80"], "pod shop/ghost is not in {dir}"),
        (["--dst", "shop/debug"], "--port is required"),
        (["--dst", "shop/debug", "--port", "70000"], "--port must be between 1 and 65535"),
        (["--dst", "shop/debug", "--port", "80", "--src", "cluster.local/ns/a/sa/b"], "--src: identity is not a"),
        (["--dst", "shop/debug", "--port", "80", "--src", "spiffe://td/ns/a"], "--src: identity is not spiffe://"),
        (["--dst", "shop/debug", "--port", "80", "--src-ip", "10.0.0.300"], "--src-ip '10.0.0.300' is not an IP"),
    ],
)
def test_bad_arguments_exit_1_with_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    rc, out, err = run(capsys, "--config-dir", str(EXAMPLES), *args)
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ztctl x authz check: " + message.format(dir=EXAMPLES))


def test_source_problems_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases: list[tuple[list[str], str]] = [
        ([], "--config-dir is required"),
        (["--config-dir", str(tmp_path / "missing")], f"cannot read {tmp_path / 'missing'}: No such file or directory"),
        (["--config-dir", str(EXAMPLES / "00-namespaces.yaml")], "cannot read"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pods.yaml").write_text(BAD_YAML.lstrip())
    cases.append(
        (
            ["--config-dir", str(broken)],
            f"{broken} has errors, first: {broken / 'pods.yaml'}:4: Pod ns1/broken: status.podIP",
        )
    )
    (tmp_path / "pods").mkdir()
    pods = write(tmp_path / "pods", NS_AND_POD)
    cases.append((["--config-dir", str(pods), "--dst", "ns1/gone"], "pod ns1/gone has no workload (phase Failed)"))
    cases.append((["--config-dir", str(pods), "--dst", "ns1/waiting"], "pod ns1/waiting has no workload (no pod IP)"))
    for args, message in cases:
        if "--dst" not in args:
            args = [*args, "--dst", "shop/debug"]
        rc, out, err = run(capsys, *args, "--port", "80")
        assert (rc, out) == (1, ""), args
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"ztctl x authz check: {message}"), err


def test_pod_outside_ambient_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config-dir", str(EXAMPLES), "--dst", "istio-system/ztunnel-node-a", "--port", "15020"]
    rc, out, _ = run(capsys, *args)
    assert rc == 0
    assert out.splitlines()[-1] == (
        "warning: istio-system/ztunnel-node-a is not enrolled in ambient, so no ztunnel enforces this decision"
    )
    rc, out, _ = run(capsys, *args, "-o", "json")
    assert json.loads(out)["warnings"] == [
        "istio-system/ztunnel-node-a is not enrolled in ambient, so no ztunnel enforces this decision"
    ]


# -- sidecar targets: what their Envoy does (tests/golden/envoy/capture.mesh.yaml) ------------------------------

CAPTURE = Path(__file__).resolve().parents[1] / "golden" / "envoy" / "capture.mesh.yaml"
SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"


@pytest.fixture
def capture_dir(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(CAPTURE.read_text())
    return tmp_path


@pytest.mark.parametrize(
    ("args", "verdict", "policy", "reason"),
    [
        (["--src", SLEEP, "--port", "8000", "--method", "GET", "--path", "/ip"], "ALLOW", "(default)", "allowed"),
        (["--src", SLEEP, "--port", "8000", "--method", "POST", "--path", "/ip"], "DENY", "(default)", "no ALLOW"),
        (
            ["--src", SLEEP, "--port", "8000", "--method", "GET", "--path", "/admin/users"],
            "DENY",
            "ns[foo]-policy[httpbin-deny-admin]-rule[0]",
            "DENY policy matched",
        ),
        # mesh-wide STRICT: a plaintext caller finds no filter chain at all
        (["--port", "8000", "--method", "GET", "--path", "/ip"], "DENY", "(default)", "no filter chain accepts"),
        # the DENY rule's only field (paths) is HTTP-only: on a TCP chain istiod keeps the rest, i.e. everything
        (["--src", SLEEP, "--port", "9000"], "DENY", "ns[foo]-policy[httpbin-deny-admin]-rule[0]", "DENY policy"),
    ],
)
def test_sidecar_targets_answer_as_their_envoy(
    capsys: pytest.CaptureFixture[str], capture_dir: Path, args: list[str], verdict: str, policy: str, reason: str
) -> None:
    rc, out, err = run(capsys, "--config-dir", str(capture_dir), "--dst", "foo/httpbin-1", "--proxy", "sidecar", *args)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[:2] == [verdict, policy]
    assert reason in lines[2] and "(sidecar, chain" in lines[2]


def test_auto_picks_the_sidecar_for_an_injected_pod(capsys: pytest.CaptureFixture[str], capture_dir: Path) -> None:
    args = ["--config-dir", str(capture_dir), "--dst", "foo/httpbin-1", "--port", "8000", "--src", SLEEP, "-o", "json"]
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and json.loads(out)["proxy"] == "ztunnel"  # no injector marks: ambient's answer
    text = (capture_dir / "mesh.yaml").read_text()
    (capture_dir / "mesh.yaml").write_text(
        text.replace("labels: {app: httpbin}}", "labels: {app: httpbin, security.istio.io/tlsMode: istio}}")
    )
    rc, out, _ = run(capsys, *args)
    doc = json.loads(out)
    assert (rc, doc["proxy"], doc["decision"], doc["filterChain"]) == (0, "sidecar", "DENY", "0.0.0.0_8000")
    assert "port 8000 is HTTP: evaluated as GET / (use --method/--path/--header)" in doc["notes"]
    # what the sidecar enforces differently from the policies as written is said, not hidden
    tcp_note = "rule[0] on TCP filter chains ignores HTTP-only paths, so it matches more traffic"
    assert f"policy foo/httpbin-deny-admin: {tcp_note}" in doc["notes"]


def test_sidecar_check_refuses_what_it_cannot_answer(capsys: pytest.CaptureFixture[str], capture_dir: Path) -> None:
    base = ["--dst", "foo/httpbin-1", "--port", "8000", "--proxy", "sidecar"]
    rc, out, err = run(capsys, *base, "--config-dir", str(capture_dir), "--header", "no-colon")
    assert (rc, out) == (1, "") and err.strip().endswith("--header 'no-colon' is not NAME:VALUE")
    rc, out, err = run(capsys, *base, "--xds-address", "127.0.0.1:1")
    assert (rc, out) == (1, "") and "--proxy sidecar needs --config-dir" in err
    assert len(err.strip().splitlines()) == 1


def test_ztunnel_answer_warns_where_istiods_status_overstates_a_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh.yaml").write_text((EXAMPLES / "00-namespaces.yaml").read_text() + "\n---\n" + textwrap.dedent(
        """\
        apiVersion: v1
        kind: Pod
        metadata: {name: web-1, namespace: shop, labels: {app: web}}
        spec: {serviceAccountName: web}
        status: {podIP: 10.244.9.9}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-mixed, namespace: shop}
        spec:
          action: DENY
          rules:
          - to: [{operation: {paths: [/admin*]}}]
          - from: [{source: {namespaces: [payments]}}]
        """
    ))  # fmt: skip
    args = ["--config-dir", str(tmp_path), "--dst", "shop/web-1", "--port", "80", "--proxy", "ztunnel"]
    rc, out, _ = run(capsys, *args, "--src", "spiffe://cluster.local/ns/shop/sa/x")
    assert rc == 0 and out.splitlines()[0] == "ALLOW"
    warning = next(line for line in out.splitlines() if "deny-mixed" in line)
    assert "rule(s) 0 had only HTTP fields and ztunnel skips them: at L4 they deny nothing" in warning


def test_a_custom_policy_fails_closed_on_the_sidecar_and_says_so(
    capsys: pytest.CaptureFixture[str], capture_dir: Path
) -> None:
    with (capture_dir / "custom.yaml").open("w") as f:
        f.write(
            textwrap.dedent(
                """\
                apiVersion: security.istio.io/v1
                kind: AuthorizationPolicy
                metadata: {name: ext-authz, namespace: foo}
                spec:
                  selector: {matchLabels: {app: httpbin}}
                  action: CUSTOM
                  provider: {name: my-ext-authz}
                  rules:
                  - to: [{operation: {paths: [/headers]}}]
                """
            )
        )
    base = ["--config-dir", str(capture_dir), "--dst", "foo/httpbin-1", "--proxy", "sidecar", "--src", SLEEP]
    rc, out, _ = run(capsys, *base, "--port", "8000", "--method", "GET", "--path", "/headers", "-o", "json")
    doc = json.loads(out)
    assert (rc, doc["decision"]) == (0, "DENY")
    assert doc["policy"].endswith("-deny-due-to-bad-CUSTOM-action")
    assert any(n.startswith("policy foo/ext-authz: ") and "my-ext-authz" in n for n in doc["notes"]), doc["notes"]
    rc, out, _ = run(capsys, *base, "--port", "8000", "--method", "GET", "--path", "/ip")
    assert out.splitlines()[0] == "ALLOW"  # only what the CUSTOM rules match is denied
