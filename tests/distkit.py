"""Helpers for tests that spawn real process groups."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on loopback for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
