"""`ztctl x ca issue`: one CreateCertificate call, as a workload or node agent would make it."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ztcore.config import Duration, option
from ztcore.fsutil import ensure_private_dir, write_atomic
from ztctl.errors import CliError


@dataclasses.dataclass(frozen=True)
class CaIssueOptions:
    ENV_PREFIX = "ZTCTL"

    token: str = option("", "bearer token (see `ztctl token create`); or --token-file")
    token_file: Path | None = option(None, "file holding the bearer token")
    address: str = option("127.0.0.1:15012", "CA address (TLS)", env="CA_ADDR")
    server_name: str = option("istiod.istio-system.svc", "name the CA's serving certificate is checked against")
    state_dir: Path = option(Path(".ztd"), "ztd's state folder, for the root bundle", env="ZTD_STATE_DIR")
    root_cert: Path | None = option(None, "root bundle to trust [default: <state-dir>/root-cert.pem]")
    impersonate: str = option("", "ImpersonatedIdentity to request (node agents only)")
    ttl: Duration = option(Duration(0), "requested lifetime; 0 = the CA's default")
    key_type: str = option("ecdsa-p256", "workload key type", choices=("ecdsa-p256", "ecdsa-p384", "rsa-2048"))
    out_dir: Path | None = option(None, "write key.pem (0600), cert-chain.pem and root-cert.pem here")
    timeout: Duration = option(Duration(10), "how long to wait for the CA")


def _key(kind: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "ecdsa-p384" else ec.SECP256R1())


def _token(opts: CaIssueOptions) -> str:
    if opts.token:
        return opts.token
    if opts.token_file is not None:
        try:
            return opts.token_file.read_text().strip()
        except OSError as err:
            raise CliError(f"cannot read {opts.token_file}: {err.strerror}") from None
    raise CliError("give --token or --token-file")


async def _call(opts: CaIssueOptions, root: bytes, req: ca_pb2.IstioCertificateRequest, token: str) -> list[str]:
    creds = grpc.ssl_channel_credentials(root)
    options = [("grpc.ssl_target_name_override", opts.server_name)]
    async with grpc.aio.secure_channel(opts.address, creds, options=options) as channel:
        try:
            resp = await ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                req, metadata=[("authorization", f"Bearer {token}")], timeout=float(opts.timeout)
            )
        except grpc.aio.AioRpcError as err:
            raise CliError(f"{err.code().name}: {err.details()}") from None
    return list(resp.cert_chain)


def issue(opts: CaIssueOptions) -> int:
    token = _token(opts)
    root_path = opts.root_cert or opts.state_dir / "root-cert.pem"
    try:
        root = root_path.read_bytes()
    except OSError as err:
        raise CliError(f"cannot read root bundle {root_path}: {err.strerror}") from None
    key = _key(opts.key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztdpu")]))
        .sign(key, hashes.SHA256())
    )
    meta = struct_pb2.Struct()
    if opts.impersonate:
        meta.update({"ImpersonatedIdentity": opts.impersonate})
    req = ca_pb2.IstioCertificateRequest(
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(), validity_duration=int(opts.ttl), metadata=meta
    )
    chain = asyncio.run(_call(opts, root, req, token))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    identity = ",".join(sans.get_values_for_type(x509.UniformResourceIdentifier))
    print(f"identity:    {identity}")
    print(f"serial:      {leaf.serial_number:x}")
    print(f"not before:  {leaf.not_valid_before_utc.isoformat()}")
    print(f"not after:   {leaf.not_valid_after_utc.isoformat()}")
    print(f"chain:       {len(chain) - 1} certificate(s) + root bundle")
    if opts.out_dir is not None:
        ensure_private_dir(opts.out_dir)
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(opts.out_dir / "key.pem", pem_key, mode=0o600)
        write_atomic(opts.out_dir / "cert-chain.pem", "".join(chain[:-1]).encode())
        write_atomic(opts.out_dir / "root-cert.pem", chain[-1].encode())
        print(f"written:     {opts.out_dir}/{{key.pem,cert-chain.pem,root-cert.pem}}")
    return 0
