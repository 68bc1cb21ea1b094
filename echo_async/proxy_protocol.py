"""PROXY protocol (HAProxy's spec) v1 and v2 header parsing, one received chunk at a time.

Not built on the ``proxy-protocol`` package (0.11.3, Apr 2024, "Alpha"): it is typed, but its
``unpack()`` re-parses a whole buffer and never says where the header ends, so a v1 header and
payload in one read waits forever; v1 has no 107-byte bound, "+80" passes as a port, and bad v2
input escapes as ``struct.error`` (length shorter than the address block). This is a small parser.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TRUSTED_NETWORKS",
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "ParseResult",
    "ParseStatus",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "is_trusted",
    "parse_networks",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107
V2_FIXED_LENGTH = 16
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF
DEFAULT_TRUSTED_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)

_PORT = re.compile(r"[0-9]{1,5}")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
# Address block length by v2 family: UNSPEC, INET, INET6, UNIX.
_V2_ADDRESS_LENGTHS = (0, _V2_INET.size, _V2_INET6.size, 216)


class ProxyHeaderError(ValueError):
    """A header that started like PROXY protocol but is malformed; ``str()`` is one short line.

    ``data`` holds every byte fed to the parser so far, so "optional" mode can echo them.
    """

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: who really connected, and how many bytes the header took."""

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


class ParseStatus(enum.Enum):
    """NEED_MORE: keep feeding. HEADER: a header was read. NOT_PROXY: the bytes are payload."""

    NEED_MORE = "need_more"
    HEADER = "header"
    NOT_PROXY = "not_proxy"


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What ``feed()`` found; ``header`` is set exactly when ``status`` is HEADER.

    ``rest`` is what the caller now owns as payload: the bytes after the header (HEADER), or
    every byte fed so far (NOT_PROXY); it is empty for NEED_MORE.
    """

    status: ParseStatus
    header: ProxyHeader | None = None
    rest: bytes = b""


_NEED_MORE = ParseResult(ParseStatus.NEED_MORE)


class ProxyHeaderParser:
    """Feed bytes as they arrive; at most 16 + 65535 bytes are ever buffered (v2), 107 for v1.

    ``feed()`` returns NEED_MORE until it can decide, then HEADER or NOT_PROXY (the first bytes
    match neither signature, decided as soon as they differ, so b"hi" is NOT_PROXY at once), or
    raises ProxyHeaderError once a signature matched but the rest is invalid. A decision is final:
    feeding again raises RuntimeError. The header timeout is the caller's; on expiry it calls
    ``abandon()`` to get back the bytes held so far.
    """

    __slots__ = ("_buffer", "_finished")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._finished = False

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a header."""
        return len(self._buffer)

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, data: bytes) -> ParseResult:
        if self._finished:
            raise RuntimeError("PROXY header parser already decided")
        self._buffer += data
        try:
            result = _parse(self._buffer)
        except ProxyHeaderError as error:
            error.data = self.abandon()
            raise
        if result is not _NEED_MORE:
            self.abandon()
        return result

    def abandon(self) -> bytes:
        """Stop parsing and hand back the bytes held so far (for a header timeout)."""
        data = bytes(self._buffer)
        self._buffer = bytearray()
        self._finished = True
        return data


def _parse(buffer: bytearray) -> ParseResult:
    if buffer.startswith(V1_PREFIX):
        return _parse_v1(buffer)
    if buffer.startswith(V2_SIGNATURE):
        return _parse_v2(buffer)
    if V1_PREFIX.startswith(buffer) or V2_SIGNATURE.startswith(buffer):
        return _NEED_MORE
    return ParseResult(ParseStatus.NOT_PROXY, rest=bytes(buffer))


def _parse_v1(buffer: bytearray) -> ParseResult:
    # Only the first LF and the first CR before it matter, so any split of the same bytes
    # reaches the same verdict.
    newline = buffer.find(b"\n", 0, V1_MAX_LENGTH)
    carriage = buffer.find(b"\r", 0, newline if newline >= 0 else V1_MAX_LENGTH - 1)
    if carriage >= 0 and carriage != newline - 1 and carriage < len(buffer) - 1:
        raise ProxyHeaderError("v1 header has CR without LF")
    if newline >= 0 and carriage < 0:
        raise ProxyHeaderError("v1 header has LF without CR")
    if newline < 0:
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
        return _NEED_MORE
    header = _parse_v1_line(bytes(buffer[len(V1_PREFIX) : carriage]), newline + 1)
    return ParseResult(ParseStatus.HEADER, header, bytes(buffer[newline + 1 :]))


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader:
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    if fields[0] == "UNKNOWN":
        # The spec says to ignore whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(1, True, None, None, length)
    if fields[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyHeaderError("v1 header needs 4 fields after the protocol, single-spaced")
    ip_version = 4 if fields[0] == "TCP4" else 6
    source = (_v1_address(fields[1], ip_version), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], ip_version), _v1_port(fields[4]))
    return ProxyHeader(1, False, source, destination, length)


def _v1_address(text: str, ip_version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError("v1 address is not a valid IP address") from None
    if address.version != ip_version:
        raise ProxyHeaderError(f"v1 address is not IPv{ip_version} as TCP{ip_version} says")
    if "%" in text:
        raise ProxyHeaderError("v1 address has a scope id")
    return canonical_ip(address)


def canonical_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """RFC 5952 text, the same on every Python: IPv4-mapped as `::ffff:10.0.0.1` (section 5).

    Python 3.13 writes that form itself; 3.11 and 3.12 write `::ffff:a00:1`.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyHeaderError("v1 port is not a decimal number 0..65535")
    return int(text)


def _parse_v2(buffer: bytearray) -> ParseResult:
    # Checking the fixed fields as soon as each byte arrives rejects garbage early.
    size = len(buffer)
    if size > 12:
        if buffer[12] >> 4 != 2:
            raise ProxyHeaderError("v2 version nibble is not 2")
        if buffer[12] & 0x0F > 1:
            raise ProxyHeaderError("v2 command is neither LOCAL nor PROXY")
    if size > 13:
        if buffer[13] >> 4 > 3:
            raise ProxyHeaderError("v2 address family is not UNSPEC, INET, INET6 or UNIX")
        if buffer[13] & 0x0F > 2:
            raise ProxyHeaderError("v2 transport is not UNSPEC, STREAM or DGRAM")
    if size < V2_FIXED_LENGTH:
        return _NEED_MORE
    block_length = int.from_bytes(buffer[14:16], "big")
    length = V2_FIXED_LENGTH + block_length
    proxy_command = buffer[12] & 0x0F == 1
    family = buffer[13] >> 4
    address_length = _V2_ADDRESS_LENGTHS[family]
    if proxy_command and block_length < address_length:
        raise ProxyHeaderError(
            f"v2 length {block_length} is shorter than its {address_length}-byte address block"
        )
    if size < length:
        return _NEED_MORE
    rest = bytes(buffer[length:])
    # LOCAL (health checks) carries no client: the spec says to ignore its address block.
    # PROXY over UNIX or UNSPEC has no IP client either, so it is treated as local too.
    if not proxy_command:
        return ParseResult(ParseStatus.HEADER, ProxyHeader(2, True, None, None, length), rest)
    block = bytes(buffer[V2_FIXED_LENGTH:length])
    _check_tlvs(block, address_length)
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family in (1, 2):
        layout = _V2_INET if family == 1 else _V2_INET6
        source_ip, destination_ip, source_port, destination_port = layout.unpack_from(block)
        source = (canonical_ip(ipaddress.ip_address(source_ip)), source_port)
        destination = (canonical_ip(ipaddress.ip_address(destination_ip)), destination_port)
    header = ProxyHeader(2, source is None, source, destination, length)
    return ParseResult(ParseStatus.HEADER, header, rest)


def _check_tlvs(block: bytes, offset: int) -> None:
    """Check that the TLVs after the addresses tile the block exactly; contents are ignored."""
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyHeaderError("v2 TLV is truncated")
        offset += 3 + int.from_bytes(block[offset + 1 : offset + 3], "big")
    if offset > len(block):
        raise ProxyHeaderError("v2 TLV overruns the header")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Parse "CIDR[,CIDR...]" (a bare address is a /32 or /128); ValueError with one line if bad."""
    networks: list[IPNetwork] = []
    for part in text.split(","):
        cidr = part.strip()
        try:
            networks.append(ipaddress.ip_network(cidr))
        except ValueError as error:
            raise ValueError(f"invalid CIDR {cidr!r}: {error}") from None
    return tuple(networks)


def is_trusted(host: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether a peer's host (as the socket reports it) lies in one of ``networks``.

    An IPv4-mapped IPv6 peer (::ffff:127.0.0.1 on a dual-stack socket) is checked as IPv4 too;
    anything that is not an IP address (a Unix socket's peer) is not trusted.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks)
