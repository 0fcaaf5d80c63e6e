"""The registry: Kubernetes/Istio objects in immutable snapshots, from a folder of YAML or the API server.

objects.py is the model, parse.py the pure YAML parser, store.py the snapshots and their change log,
files.py the folder loader and watcher (`ztd --config-dir DIR`, zt-bridge's standalone mode, ztctl). The
Kubernetes source lives with the server (xds_server/registry/kube.py).
"""
