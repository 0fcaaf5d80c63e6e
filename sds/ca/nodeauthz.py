"""May this caller get a certificate for someone else? (istiod security/pkg/server/ca/node_auth.go)

A node agent (ztunnel, our IPsec bridge) asks for certificates of the pods on its node. It is allowed only
when all hold:
  1. its own service account is one of CA_TRUSTED_NODE_ACCOUNTS (`ns/sa`);
  2. the requested identity is spiffe://<td>/ns/<ns>/sa/<sa>;
  3. the pod its token is bound to still exists with the token's UID and runs as the caller's account
     (a deleted-and-recreated pod's old token stops working);
  4. some pod running as the requested account is scheduled on that pod's node.
A token bound to a Node object instead of a pod (kubectl create token --bound-object-kind Node) names the
node directly; step 3 then becomes "that node exists in the registry".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ztcore.authn import Caller
from ztcore.identity import Identity, IdentityError
from ztcore.registry import PodDirectory


class ImpersonationDenied(Exception):
    """Reason for the server log only; the caller sees an opaque Unauthenticated."""


def parse_trusted_accounts(values: Iterable[str]) -> frozenset[tuple[str, str]]:
    accounts = set()
    for value in values:
        ns, sep, sa = value.strip().partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ValueError(f"trusted node account {value!r} is not <namespace>/<serviceaccount>")
        accounts.add((ns, sa))
    return frozenset(accounts)


@dataclass(frozen=True)
class NodeAuthorizer:
    trusted: frozenset[tuple[str, str]]
    pods: PodDirectory

    def authorize(self, caller: Caller, requested: str) -> Identity:
        if (caller.namespace, caller.service_account) not in self.trusted:
            raise ImpersonationDenied(
                f"caller {caller.namespace}/{caller.service_account} is not allowed to impersonate"
            )
        try:
            wanted = Identity.parse(requested)
        except IdentityError as err:
            raise ImpersonationDenied(f"requested identity is invalid: {err}") from None
        node = self._caller_node(caller)
        count = self.pods.count_pods_on_node(wanted.namespace, wanted.service_account, node)
        if count == 0:
            raise ImpersonationDenied(f"no pod runs as {wanted.namespace}/{wanted.service_account} on node {node!r}")
        return wanted

    def _caller_node(self, caller: Caller) -> str:
        if caller.pod_name:
            pod = self.pods.get_pod(caller.namespace, caller.pod_name)
            if pod is None:
                raise ImpersonationDenied(f"caller pod {caller.namespace}/{caller.pod_name} not found")
            if caller.pod_uid and pod.uid != caller.pod_uid:
                raise ImpersonationDenied(
                    f"caller pod {caller.namespace}/{caller.pod_name} has UID {pod.uid}, token was for {caller.pod_uid}"
                )
            if not caller.pod_uid:
                raise ImpersonationDenied("caller token carries no pod UID")
            if pod.service_account != caller.service_account:
                raise ImpersonationDenied(
                    f"caller pod runs as {pod.service_account}, token is for {caller.service_account}"
                )
            if not pod.node_name:
                raise ImpersonationDenied(f"caller pod {caller.namespace}/{caller.pod_name} is not on a node")
            if caller.node_name and caller.node_name != pod.node_name:
                raise ImpersonationDenied(f"token is bound to node {caller.node_name}, its pod runs on {pod.node_name}")
            return pod.node_name
        if caller.node_name:
            if not self.pods.has_node(caller.node_name):
                raise ImpersonationDenied(f"caller node {caller.node_name!r} is not in the registry")
            return caller.node_name
        raise ImpersonationDenied("caller credential is bound to neither a pod nor a node")
