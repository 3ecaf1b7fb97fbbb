"""Starting or joining Ray safely.

A local cluster (no ``--address``) listens on loopback only. Ray 2.60 picks the node's address in
``ray._private.services.get_node_ip_address``: loopback where multi-node clusters are off (its
default on macOS and Windows, ``ENABLE_RAY_CLUSTER``), otherwise the machine's interface address;
an explicit ``_node_ip_address="127.0.0.1"`` is rewritten to that interface address too. Every Ray
server of the node (GCS, raylet, object manager, workers' gRPC, runtime-env agent) binds the node
address, so a local run turns multi-node clusters off while ``ray.init`` starts its node, and the
node comes up on 127.0.0.1. Ray's own token authentication stays on as well (its default for a new
local cluster): loopback is still reachable by the machine's other users.

Joining a cluster (``--address``) uses Ray's token authentication: the token comes from Ray's
standard places (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), never from the
job file, and it is never printed. A missing or wrong token is reported within seconds, naming
what to set, instead of Ray's generic connection error after its retries.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from pathlib import Path

from recap.pipeline.errors import UserError

log = logging.getLogger("recap")

AUTH_PROBE_SECONDS = 10.0  # a GCS answers in well under a second; Ray's own client waits 40 s


class ClusterAuthError(UserError):
    """The cluster at ``--address`` refused the token, or wants one and none was found."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (how dual-stack sockets show it)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@contextlib.contextmanager
def _single_node_addressing():
    """While a local node starts, Ray takes loopback as the node address (as on macOS/Windows)."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray: start_local's check tells
        yield
        return
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def start_local(**init_kwargs) -> None:
    """``ray.init`` of a new single-node cluster whose servers listen on 127.0.0.1 only."""
    import ray

    with _single_node_addressing():
        ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):  # a Ray that no longer honours the setting: say so, do not hide it
        log.warning("Ray put this local cluster on %s, not on loopback: its ports are reachable from the "
                    "network, protected by Ray's token authentication only", node_ip)


def token_source() -> str | None:
    """Where Ray will read the token from, in its own order of precedence (never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file() or not p.read_text().strip():
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH={path}: no token there (missing or empty file); "
                                   f"write the cluster's token (`ray get-auth-token` on its head node) to it")
        return f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return str(default)
    return None


def _use_token_auth() -> None:
    """Token mode for this process and the workers it starts, when a token is at hand and the user
    has not chosen a mode (Ray enables it by itself only for a cluster it finds on its own)."""
    if os.environ.get("RAY_AUTH_MODE") or token_source() is None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _fix_hint(address: str) -> str:
    where = token_source()
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if where is None:
        told = "no token was found"
    elif mode and mode.lower() != "token":
        told = f"RAY_AUTH_MODE={mode} sends no token"
    else:
        told = f"the token from {where} is not this cluster's"
    return (f"--address {address}: the cluster refused the connection: it requires Ray's token authentication "
            f"and {told}. Set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding the token, or put it in "
            f"~/.ray/auth_token (`ray get-auth-token` on the head node prints it)"
            + ("; and unset RAY_AUTH_MODE or set it to token" if mode and mode.lower() != "token" else ""))


def check_cluster_auth(address: str, timeout: float = AUTH_PROBE_SECONDS) -> None:
    """Ask the cluster's GCS one question with the token recap will use: a refusal becomes a
    ``ClusterAuthError`` naming what to set; silence past ``timeout`` a ``UserError``. Ray Client
    addresses (``ray://``) and ``auto`` are left to ``ray.init``."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    _use_token_auth()
    from ray._raylet import GcsClient

    outcome: dict = {}

    def ask() -> None:
        try:
            GcsClient(address=address).internal_kv_get(b"recap-auth-probe", None, timeout=timeout)
            outcome["ok"] = True
        except Exception as e:  # noqa: BLE001 - sorted below
            outcome["error"] = e

    t = threading.Thread(target=ask, name="recap-auth-probe", daemon=True)
    t.start()
    t.join(timeout)
    err = outcome.get("error")
    if outcome.get("ok"):
        return
    if err is not None and type(err).__name__ == "AuthenticationError":
        raise ClusterAuthError(_fix_hint(address)) from None
    why = f"{type(err).__name__}: {err}" if err is not None else f"no answer within {timeout:.0f} s"
    raise UserError(f"--address {address}: something listens there but no Ray cluster answered ({why}); "
                    f"give the head node's GCS address (HOST:6379 by default)") from None


def join(address: str, **init_kwargs) -> None:
    """``ray.init`` on an existing cluster, after checking it accepts our token (check the address
    answers first: ``preflight.check_address``)."""
    import ray

    check_cluster_auth(address)
    ray.init(address=address, **init_kwargs)


def current_node() -> str | None:
    """The Ray node id of the calling worker (None outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - where a shard ran is a record, never a failure
        pass
    return None


__all__ = ["ClusterAuthError", "check_cluster_auth", "current_node", "is_loopback", "join", "start_local",
           "token_source"]
