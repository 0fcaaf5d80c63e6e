"""The mesh as ztd, zt-bridge and ztctl all see it: registry objects and the pure translation to WDS.

`registry/` holds the Kubernetes/Istio objects (parsed from YAML or received from the API server) in
immutable snapshots; `translate/` turns a snapshot into workloads, services and authorizations. Neither
knows about xDS streams, so the bridge and the CLI use them without importing the server.
"""
