"""ztctl: the operator CLI, shaped like istioctl."""
