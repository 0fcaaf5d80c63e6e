"""ztctl command line: argument parsing and dispatch only; each command lives in ztctl/commands/."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from ztcore import config
from ztctl.commands import authz, ca, ca_issue, proxy_config, proxy_status, token, tunnels, ztunnel_config
from ztctl.errors import CliError

# (words, options dataclass, handler, help)
Command = tuple[tuple[str, ...], type[Any], Callable[[Any], int], str]

COMMANDS: list[Command] = [
    (("token", "create"), token.TokenCreateOptions, token.create, "mint a service-account JWT that ztd accepts"),
    (("ca", "root"), ca.CaRootOptions, ca.root, "print the CA's root bundle"),
    (
        ("x", "ca", "issue"),
        ca_issue.CaIssueOptions,
        ca_issue.issue,
        "request a workload certificate from the CA (CreateCertificate) and write key, chain and root",
    ),
    (
        ("x", "authz", "check"),
        authz.AuthzCheckOptions,
        authz.check,
        "decide, as ztunnel would, whether a caller may connect to a pod's port, and by which policy",
    ),
    (
        ("proxy-config", "secret"),
        proxy_config.ProxyConfigSecretOptions,
        proxy_config.secret,
        "print the secrets an Envoy holds (from its admin /config_dump), as istioctl does",
    ),
    (
        ("proxy-status",),
        proxy_status.ProxyStatusOptions,
        proxy_status.run,
        "sync state of every proxy connected to a ztd (its istio.io/debug/syncz), as istioctl prints it",
    ),
    (
        ("ztunnel-config", "workloads"),
        ztunnel_config.ZtunnelConfigOptions,
        ztunnel_config.workloads,
        "workloads a ztunnel receives from ztd (or --config-dir), as istioctl ztunnel-config prints them",
    ),
    (
        ("ztunnel-config", "services"),
        ztunnel_config.ZtunnelConfigOptions,
        ztunnel_config.services,
        "services a ztunnel receives from ztd (or --config-dir), as istioctl ztunnel-config prints them",
    ),
    (
        ("ztunnel-config", "policies"),
        ztunnel_config.ZtunnelConfigOptions,
        ztunnel_config.policies,
        "authorization policies a ztunnel receives from ztd (or --config-dir), as istioctl prints them",
    ),
    (
        ("tunnels",),
        tunnels.TunnelsOptions,
        tunnels.run,
        "the IPsec tunnels of zt-bridges (from their admin port); `tunnels rekey` rekeys them",
    ),
    (
        ("tunnels", "rekey"),
        tunnels.TunnelsRekeyOptions,
        tunnels.rekey,
        "rekey zt-bridges' tunnels now (all, or those of --peer/--local): initiators rekey, responders ask",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = config.ArgumentParser(prog="ztctl", description="Operate a ztdpu mesh (istioctl-style).")
    subparsers: dict[tuple[str, ...], argparse._SubParsersAction[config.ArgumentParser]] = {}
    root = parser.add_subparsers(metavar="COMMAND")
    root.required = True
    subparsers[()] = root
    leaves: dict[tuple[str, ...], config.ArgumentParser] = {}
    for entry in COMMANDS:
        words, options, _, help_text = entry
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in subparsers and prefix in leaves:
                # a command that also has subcommands (`tunnels` lists, `tunnels rekey` acts): they are optional
                subparsers[prefix] = leaves[prefix].add_subparsers(metavar="SUBCOMMAND")
            elif prefix not in subparsers:
                group = subparsers[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                subparsers[prefix] = group.add_subparsers(metavar="SUBCOMMAND")
                subparsers[prefix].required = True
        sub = subparsers[words[:-1]].add_parser(words[-1], help=help_text, description=help_text)
        config.add_arguments(options, sub)
        sub.set_defaults(_command=entry, _parser=sub)
        leaves[words] = sub
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parsed = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    words, options_cls, handler, _ = parsed._command
    sub: argparse.ArgumentParser = parsed._parser

    def fail(message: str) -> NoReturn:
        sub.error(message)

    opts = config.resolve(options_cls, parsed, os.environ if environ is None else environ, fail)
    try:
        return int(handler(opts))
    except CliError as err:
        print(f"ztctl {' '.join(words)}: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
