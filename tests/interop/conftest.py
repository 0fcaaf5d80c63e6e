"""Interop tests: real Istio programs against our servers. The tools are built on first use (no skips)."""

from __future__ import annotations

from tests.support.istio_tools import istio_tools_fixture as istio_tools

__all__ = ["istio_tools"]
