"""XFRM netlink: pure message encoding/decoding (`messages`) and the async socket that carries it (`netlink`)."""
