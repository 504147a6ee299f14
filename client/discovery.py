"""Replica discovery: an address (``dns:///name:port``, a name that resolves to several hosts, or a
list) becomes the list of replicas a job's ranks spread over; a rank whose replica fails moves on."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:"
#: Targets gRPC resolves itself (unix sockets, explicit ipv4:/ipv6: lists): passed through as given.
_OTHER_SCHEMES = ("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


class Replica(NamedTuple):
    """One server to connect to: ``target`` for gRPC; ``host`` the name it was found under (the
    name TLS checks the certificate against when ``target`` is an IP), or None."""

    target: str
    host: str | None = None


def split_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``[v6]:port``; None when there is no numeric port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # a bare IPv6 address without a port
        return None
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def lookup(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, deduplicated and sorted (every rank computes the same
    list). One family only, IPv4 where there is any: a dual-stack host has an A and an AAAA record,
    and counting both would give it two shares of the ranks (``localhost`` is one server, not two)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    v4 = [ip for ip in ips if ip.version == 4]
    return [_join(str(ip), port) for ip in sorted(v4 or ips)]


def expand(address: str) -> list[Replica]:
    """The replicas one address entry stands for.

    ``dns:///name:port`` is always resolved (to one replica per address); a plain ``name:port`` is
    expanded when the name resolves to several addresses, else kept as given (gRPC resolves it,
    and again on every reconnect). IP addresses and other gRPC schemes are kept as given. A name
    that does not resolve (yet: a Service with no ready pod) is kept too, and resolved again when
    the stream fails over; a ``dns:`` address without a port is a ``ValueError``."""
    if address.startswith(DNS_SCHEME):
        return _expand_dns(address)
    parts = None if address.startswith(_OTHER_SCHEMES) else split_host_port(address)
    if parts is None or _is_ip(parts[0]):
        return [Replica(address)]
    found = _lookup_or_none(*parts)
    if found is None or len(found) < 2:
        return [Replica(address)]
    return [Replica(target, parts[0]) for target in found]


def _expand_dns(address: str) -> list[Replica]:
    rest = address[len(DNS_SCHEME):]
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        if authority:
            raise ValueError(f"address {address!r}: a DNS server in the address (dns://{authority}/...) is not "
                             "supported; use dns:///name:port (the host's resolver)")
    parts = split_host_port(rest)
    if parts is None:
        raise ValueError(f"address {address!r} needs a port: dns:///name:port")
    found = _lookup_or_none(*parts)
    if not found:  # not resolvable now: gRPC's own resolver keeps trying the name until it is
        return [Replica(address, parts[0])]
    return [Replica(target, parts[0]) for target in found]


def _lookup_or_none(host: str, port: int) -> list[str] | None:
    try:
        return lookup(host, port)
    except (OSError, UnicodeError) as err:
        log.warning("cannot resolve %s (%s); trying the name as given, resolving again on failover", host, err)
        return None


def resolve(address: str | Sequence[str]) -> list[Replica]:
    """The replica list of an address or a list of them: each entry expanded in place (an explicit
    list keeps its order, so rank ``r`` still uses entry ``r % len``), duplicates dropped."""
    entries = [address] if isinstance(address, str) else list(address)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"address must name at least one server (host:port, dns:///name:port or a list), "
                         f"got {address!r}")
    replicas: dict[str, Replica] = {}
    for entry in entries:
        for replica in expand(entry):
            replicas.setdefault(replica.target, replica)
    return list(replicas.values())


class Replicas:
    """The replicas of a job and the one a rank streams from: ``rank % len`` at first; on
    ``fail_over()`` the address is resolved again (replicas come and go) and the rank moves to the
    replica after its current one."""

    def __init__(self, address: str | Sequence[str], rank: int) -> None:
        self.spec = address if isinstance(address, str) else list(address)
        self.replicas = resolve(self.spec)
        self.current = self.replicas[rank % len(self.replicas)]
        self._rank = rank

    def fail_over(self) -> Replica | None:
        """Resolve again and move to the next replica; None when there is no other one to try."""
        self.replicas = replicas = resolve(self.spec)  # a name that fails to resolve now is kept as given
        targets = [r.target for r in replicas]
        if self.current.target in targets:
            nxt = replicas[(targets.index(self.current.target) + 1) % len(replicas)]
        else:  # ours is gone (a replaced pod has a new address): start again from the rank's share
            nxt = replicas[self._rank % len(replicas)]
        if nxt.target == self.current.target:
            return None
        log.warning("replica %s failing; moving the stream to %s (%d replica(s) known)", self.current.target,
                    nxt.target, len(replicas))
        self.current = nxt
        return nxt
