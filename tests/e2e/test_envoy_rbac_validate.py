"""Real Envoy 1.40 (`--mode validate`) accepts the RBAC filters built for every envoy_rbac golden case.

Each case becomes a static bootstrap with two listeners: HTTP (an HCM carrying the case's HTTP RBAC filters,
then the router) and TCP (the case's network RBAC filters, then tcp_proxy). A tampered filter (an empty suffix,
which Envoy's validation refuses) must fail, so that a pass means something.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from google.protobuf import json_format

from tests.support.envoy import validate as envoy_validate
from tests.support.rbac_cases import GOLDEN, ROOT_NAMESPACE, cases, load
from ztcore.envoy import rbac
from ztcore.envoy.common import pack

pytestmark = pytest.mark.slow

PARALLEL = 2
CLUSTER = "inbound|8080||"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def as_json(msg: Any) -> Any:
    return json.loads(json_format.MessageToJson(msg))


def bootstrap(built: rbac.RbacFilters) -> dict[str, Any]:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "inbound_http",
        "route_config": {
            "name": "inbound",
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": CLUSTER}}]}
            ],
        },
        "http_filters": [*(as_json(f) for f in built.http), router],
    }
    tcp_proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": CLUSTER,
            "cluster": CLUSTER,
        },
    }

    def listener(name: str, port: int, filters: list[Any]) -> dict[str, Any]:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        return {"name": name, "address": address, "filter_chains": [{"filters": filters}]}

    return {
        "static_resources": {
            "listeners": [
                listener(
                    "http", 15006, [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
                ),
                listener("tcp", 15007, [*(as_json(f) for f in built.tcp), tcp_proxy]),
            ],
            "clusters": [
                {
                    "name": CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


async def validate(config: dict[str, Any], path: Path, limit: asyncio.Semaphore) -> tuple[int, str]:
    return await envoy_validate(json.dumps(config), path, limit)


def build_case(case: str) -> rbac.RbacFilters:
    pod, policies = load((GOLDEN / f"{case}-in.yaml").read_text(), case)
    assert pod is not None
    applied = rbac.policies_for(policies, pod.namespace, pod.labels, ROOT_NAMESPACE)
    return rbac.build(applied, trust_domain="cluster.local")


async def test_envoy_accepts_the_rbac_filters_of_every_case(tmp_path: Path) -> None:
    limit = asyncio.Semaphore(PARALLEL)
    jobs = {}
    for case in cases():
        built = build_case(case)
        assert built.http and built.tcp, case
        jobs[case] = asyncio.ensure_future(validate(bootstrap(built), tmp_path / f"{case}.json", limit))
    results = {case: await job for case, job in jobs.items()}
    failed = {case: out[-600:] for case, (rc, out) in results.items() if rc != 0 or " OK" not in out}
    assert not failed, failed
    assert len(results) >= 15


async def test_envoy_refuses_a_tampered_rbac_filter(tmp_path: Path) -> None:
    built = build_case("allow-principal")
    config = http_rbac_pb2.RBAC()
    assert built.http[0].typed_config.Unpack(config)
    bad = rbac_pb2.Principal()
    bad.authenticated.principal_name.suffix = ""  # Envoy requires a non-empty suffix
    config.rules.policies["ns[foo]-policy[allow-principals]-rule[0]"].principals.append(bad)
    built.http[0].typed_config.CopyFrom(pack(config))
    rc, out = await validate(bootstrap(built), tmp_path / "bad.json", asyncio.Semaphore(1))
    assert rc != 0 and "StringMatcherValidationError" in out, out[-600:]
