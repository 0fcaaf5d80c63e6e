"""ztd's control-plane side: the registry of workloads and policies, and the xDS server that serves it."""
