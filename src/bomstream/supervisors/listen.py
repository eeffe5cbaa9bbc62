"""The supervisor's hold on the shared port.

Every worker binds the port itself with SO_REUSEPORT. The supervisor binds it
first, with SO_REUSEPORT and without listen(): that fixes the port once (so
``server.port = 0`` gives every worker the same one), keeps it ours while
workers restart, and takes no connections, because a socket that does not
listen is no member of the kernel's group of listeners.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(slots=True)
class Reservation:
    sockets: list[socket.socket]
    port: int

    @property
    def host(self) -> str:
        """The first bound address, as a worker's ``runner.addresses[0]`` would be."""
        return str(self.sockets[0].getsockname()[0])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def reserve_port(host: str, port: int) -> Reservation:
    """Bind every address of ``host`` on one port (0: a free one). Raises OSError
    when the port is taken, by another reuse-port group too."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    sockets: list[socket.socket] = []
    try:
        for family, addr in addresses:
            # With port 0 the first address picks the port and the rest follow it.
            port = _free_or_raise(family, (addr[0], port, *addr[2:]))
            sockets.append(_bind_reuse_port(family, (addr[0], port, *addr[2:])))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Reservation(sockets, port)


def _free_or_raise(family: int, addr: tuple[object, ...]) -> int:
    """The port of ``addr`` if nothing listens on it (0: a free port).

    A plain bind, as aiohttp's own (SO_REUSEADDR: connections of an earlier run
    in TIME_WAIT do not count). Binding with SO_REUSEPORT straight away would
    succeed beside another reuse-port listener of the same user, and a second
    supervisor started on the same port would silently share it.
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        _like_asyncio(probe, family)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
        return int(probe.getsockname()[1])


def _bind_reuse_port(family: int, addr: tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _like_asyncio(sock, family)
        # No SO_REUSEADDR: with it, anyone's plain bind could take the port
        # while every worker is down.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _like_asyncio(sock: socket.socket, family: int) -> None:
    # The workers' listeners are made by the event loop, which binds IPv6
    # addresses IPv6-only; a dual-stack socket here would clash with them.
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
