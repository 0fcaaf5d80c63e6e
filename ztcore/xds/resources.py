"""One xDS resource at one version, packed once and shared by every stream that sends it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message


def _varint(value: int) -> bytes:
    if value < 0x80:  # tags and short strings: every nonce and most names
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): tag, length, bytes."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def content_version(type_url: str, payload: bytes) -> str:
    """A version that changes exactly when the serialised content changes."""
    digest = hashlib.sha256(type_url.encode() + b"\0" + payload).hexdigest()
    return digest[:16]


@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    """`any` is serialised when the resource is built; streams copy its bytes, never re-encode the message.

    The protobuf fields are treated as immutable after construction: nobody may modify them.
    """

    name: str
    version: str
    any: any_pb2.Any = field(repr=False)
    aliases: tuple[str, ...] = ()
    # The Delta form (envoy.service.discovery.v3.Resource), built once beside the SotW form.
    delta: discovery_pb2.Resource = field(init=False, repr=False)
    # …and its wire bytes as one `resources` entry of a DeltaDiscoveryResponse (field 2, length-delimited):
    # an encoded Delta response is these bytes joined, with no per-stream copy or re-encoding.
    delta_wire: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a resource needs a name")
        wrapped = discovery_pb2.Resource(name=self.name, version=self.version, aliases=list(self.aliases))
        wrapped.resource.CopyFrom(self.any)
        object.__setattr__(self, "delta", wrapped)
        object.__setattr__(self, "delta_wire", length_delimited(2, wrapped.SerializeToString(deterministic=True)))

    @property
    def type_url(self) -> str:
        return str(self.any.type_url)

    @classmethod
    def pack(
        cls, name: str, msg: message.Message, *, version: str | None = None, aliases: Iterable[str] = ()
    ) -> Resource:
        """Pack `msg` into an Any (serialised here, once); the version defaults to a content hash."""
        packed = any_pb2.Any()
        packed.Pack(msg, deterministic=True)  # map order must not change the content version
        return cls(
            name=name,
            version=version if version is not None else content_version(packed.type_url, packed.value),
            any=packed,
            aliases=tuple(aliases),
        )

    def same_as(self, other: Resource | None) -> bool:
        return other is not None and other.version == self.version and other.type_url == self.type_url
