"""The embedded registry: Kubernetes/Istio YAML from a folder, parsed into immutable snapshots.

`ztd --config-dir DIR` reads the same documents a user would `kubectl apply` (objects.py is the model,
parse.py the pure parser, store.py the snapshots, files.py the folder loader and watcher).
"""
