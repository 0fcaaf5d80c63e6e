"""What the CA needs to know about pods, without depending on where the registry comes from.

The embedded YAML registry and the Kubernetes registry both satisfy `PodDirectory`; the node authorizer
(sds/ca/nodeauthz.py) reads only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str
    phase: str = "Running"


class PodDirectory(Protocol):
    def get_pod(self, namespace: str, name: str) -> PodRef | None:
        """The pod with this name, or None. Pods in phase Failed are not returned (as istiod's informer)."""
        ...

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        """How many non-failed pods run as namespace/service_account on node_name."""
        ...

    def has_node(self, name: str) -> bool:
        """Whether a Node of this name is known (for tokens bound to a Node rather than a pod)."""
        ...
