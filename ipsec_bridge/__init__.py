"""The IPsec bridge: identity-bound ESP tunnels between pods, programmed into the kernel through XFRM netlink."""
