"""The PROXY protocol header parser: v1 and v2, split reads, limits and rejections."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from typing import Literal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from echo_async.proxy_protocol import (
    DEFAULT_TRUSTED_NETWORKS,
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    ParseStatus,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    is_trusted,
    parse_networks,
)

V1_PREFIX = b"PROXY "
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x20, 0x21
UNSPEC, INET_STREAM, INET6_STREAM, UNIX_STREAM, INET_DGRAM = 0x00, 0x11, 0x21, 0x31, 0x12

fast = settings(deadline=None, max_examples=150)

Outcome = tuple[object, object, bytes]


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    declared = len(block) if length is None else length
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", declared) + block


def inet(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    packed = ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed
    return packed + struct.pack("!HH", source_port, destination_port)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def run(chunks: list[bytes]) -> Outcome:
    """Feed chunks as a connection would; after a verdict later chunks are plain payload."""
    parser = ProxyHeaderParser()
    for index, chunk in enumerate(chunks):
        try:
            result = parser.feed(chunk)
        except ProxyHeaderError as error:
            return rejected(error, b"".join(chunks[: index + 1]), parser)
        if result.status is ParseStatus.NEED_MORE:
            assert result.header is None
            assert result.rest == b""
            assert parser.buffered == len(b"".join(chunks[: index + 1]))
            assert parser.buffered < V2_MAX_LENGTH
            continue
        assert parser.finished
        assert parser.buffered == 0
        assert (result.header is not None) == (result.status is ParseStatus.HEADER)
        return (result.status, result.header, result.rest + b"".join(chunks[index + 1 :]))
    return (ParseStatus.NEED_MORE, None, b"")


def rejected(error: ProxyHeaderError, fed: bytes, parser: ProxyHeaderParser) -> Outcome:
    assert "\n" not in str(error)
    assert error.data == fed
    assert parser.finished
    return ("error", str(error), b"")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)] or [b""]


def bytewise(data: bytes) -> list[bytes]:
    return [data[index : index + 1] for index in range(len(data))]


def header_of(data: bytes) -> ProxyHeader:
    status, header, _ = run([data])
    assert status is ParseStatus.HEADER, header
    assert isinstance(header, ProxyHeader)
    return header


def error_of(data: bytes) -> str:
    status, message, _ = run([data])
    assert status == "error", (status, message)
    assert isinstance(message, str)
    return message


VALID = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 7\r\n",
    b"PROXY TCP6 2001:DB8:0:0::1 ::ffff:10.0.0.1 65535 0\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    v2(PROXY, INET_STREAM, inet("192.0.2.1", "198.51.100.2", 56324, 7)),
    v2(PROXY, INET6_STREAM, inet("2001:db8::1", "2001:db8::2", 1, 2) + tlv(1, b"h2") + tlv(4, b"")),
    v2(LOCAL, UNSPEC, b""),
    v2(LOCAL, INET_STREAM, b"anything, ignored"),
]


def test_v1_tcp4() -> None:
    data = VALID[0]
    assert run([data + b"hello"]) == (
        ParseStatus.HEADER,
        ProxyHeader(1, False, ("192.0.2.1", 56324), ("198.51.100.2", 7), len(data)),
        b"hello",
    )


def test_v1_tcp6_addresses_come_back_canonical() -> None:
    header = header_of(VALID[1])
    # IPv4-mapped in RFC 5952's recommended form on every Python version (3.11 would print
    # ::ffff:a00:1 by itself, 3.13 ::ffff:10.0.0.1).
    assert header == ProxyHeader(1, False, ("2001:db8::1", 65535), ("::ffff:10.0.0.1", 0), 52)


@pytest.mark.parametrize("data", [VALID[2], VALID[3]])
def test_v1_unknown_is_local(data: bytes) -> None:
    assert header_of(data) == ProxyHeader(1, True, None, None, len(data))


def test_v1_of_exactly_107_bytes_is_accepted_and_108_is_not() -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert header_of(longest).length == V1_MAX_LENGTH
    assert error_of(longest[:-2] + b"x\r\n") == "v1 header longer than 107 bytes"


def test_v1_without_crlf_is_rejected_at_107_bytes_having_held_at_most_106() -> None:
    parser = ProxyHeaderParser()
    for byte in bytewise(V1_PREFIX + b"a" * (V1_MAX_LENGTH - 1 - len(V1_PREFIX))):
        assert parser.feed(byte).status is ParseStatus.NEED_MORE
    assert parser.buffered == V1_MAX_LENGTH - 1
    with pytest.raises(ProxyHeaderError, match="longer than 107 bytes") as raised:
        parser.feed(b"a" * 70000)
    assert len(raised.value.data) == V1_MAX_LENGTH - 1 + 70000


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "v1 port is not a decimal number 0..65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1 port is not a decimal number 0..65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -0\r\n", "v1 port is not a decimal number 0..65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "v1 header is not ASCII"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1 header needs 4 fields after the protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1 header needs 4 fields after the protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1 header needs 4 fields after the protocol"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1 protocol must be TCP4, TCP6 or UNKNOWN"),
        (b"PROXY \r\n", "v1 protocol must be TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 protocol must be TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1 address is not a valid IP address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1 address is not a valid IP address"),
        (b"PROXY TCP4 1.2.3.4\t 5.6.7.8 1 2\r\n", "v1 address is not a valid IP address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1 address is not IPv4 as TCP4 says"),
        (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "v1 address is not IPv6 as TCP6 says"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1 address has a scope id"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1 header has LF without CR"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "v1 header has CR without LF"),
    ],
)
def test_v1_malformed_fields_are_rejected_in_one_line(line: bytes, message: str) -> None:
    assert error_of(line).startswith(message)


def test_v2_proxy_inet() -> None:
    data = VALID[4]
    assert run([data + b"payload"]) == (
        ParseStatus.HEADER,
        ProxyHeader(2, False, ("192.0.2.1", 56324), ("198.51.100.2", 7), 28),
        b"payload",
    )


def test_v2_proxy_inet6_skips_tlvs() -> None:
    header = header_of(VALID[5])
    assert header == ProxyHeader(2, False, ("2001:db8::1", 1), ("2001:db8::2", 2), 16 + 36 + 5 + 3)


@pytest.mark.parametrize("data", [VALID[6], VALID[7]])
def test_v2_local_uses_the_sockets_own_addresses(data: bytes) -> None:
    assert header_of(data) == ProxyHeader(2, True, None, None, len(data))


@pytest.mark.parametrize(
    "data",
    [
        v2(PROXY, UNSPEC, b""),
        v2(PROXY, UNIX_STREAM, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
    ],
)
def test_v2_proxy_without_ip_addresses_is_treated_as_local(data: bytes) -> None:
    assert header_of(data) == ProxyHeader(2, True, None, None, len(data))


def test_v2_dgram_transport_still_gives_addresses() -> None:
    header = header_of(v2(PROXY, INET_DGRAM, inet("10.0.0.1", "10.0.0.2", 3, 4)))
    assert header.source == ("10.0.0.1", 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (SIGNATURE + b"\x11", "v2 version nibble is not 2"),
        (SIGNATURE + b"\x22", "v2 command is neither LOCAL nor PROXY"),
        (SIGNATURE + b"\x21\x41", "v2 address family is not UNSPEC, INET, INET6 or UNIX"),
        (SIGNATURE + b"\x21\x13", "v2 transport is not UNSPEC, STREAM or DGRAM"),
        (v2(PROXY, INET_STREAM, b"", length=4), "v2 length 4 is shorter than its 12-byte address"),
        (v2(PROXY, INET6_STREAM, b"", length=35), "v2 length 35 is shorter than its 36-byte"),
        (v2(PROXY, UNIX_STREAM, b"", length=0), "v2 length 0 is shorter than its 216-byte"),
        (v2(PROXY, INET_STREAM, bytes(12) + b"\x01\x00"), "v2 TLV is truncated"),
        (v2(PROXY, INET_STREAM, bytes(12) + b"\x01\x00\x05abcd"), "v2 TLV overruns the header"),
    ],
)
def test_v2_malformed_is_rejected_as_soon_as_the_bad_byte_arrives(
    data: bytes, message: str
) -> None:
    """Only the bytes shown are sent: none of these waits for the rest of the header."""
    assert error_of(data).startswith(message)


def test_v2_largest_header_is_accepted_and_never_overbuffered() -> None:
    block = inet("192.0.2.1", "192.0.2.2", 1, 2) + tlv(4, bytes(0xFFFF - 12 - 3))
    data = v2(PROXY, INET_STREAM, block)
    assert len(data) == V2_MAX_LENGTH
    parser = ProxyHeaderParser()
    assert parser.feed(data[:-1]).status is ParseStatus.NEED_MORE
    assert parser.buffered == V2_MAX_LENGTH - 1
    result = parser.feed(data[-1:] + b"payload")
    assert result.header == ProxyHeader(2, False, ("192.0.2.1", 1), ("192.0.2.2", 2), V2_MAX_LENGTH)
    assert result.rest == b"payload"


@pytest.mark.parametrize("data", [b"hi", b"GET / HTTP/1.1\r\n", b"\x00", b"PROXY", b"\r\n\r\nQ"])
def test_plain_payload_is_handed_back_at_once(data: bytes) -> None:
    """b"PROXY" is a prefix of the v1 signature, so it waits; one more byte decides."""
    if V1_PREFIX.startswith(data) or SIGNATURE.startswith(data):
        assert run([data]) == (ParseStatus.NEED_MORE, None, b"")
        data += b"!"
    assert run([data]) == (ParseStatus.NOT_PROXY, None, data)


def test_empty_reads_decide_nothing() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"").status is ParseStatus.NEED_MORE
    assert parser.feed(b"\r\n").status is ParseStatus.NEED_MORE
    assert parser.feed(b"").status is ParseStatus.NEED_MORE
    assert parser.feed(b"x").rest == b"\r\nx"


def test_a_verdict_is_final_and_abandon_hands_back_held_bytes() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2").status is ParseStatus.NEED_MORE
    assert parser.abandon() == b"PROXY TCP4 1.2"
    assert parser.finished
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


@pytest.mark.parametrize("data", VALID)
def test_every_split_point_and_byte_at_a_time_give_the_same_result(data: bytes) -> None:
    whole = run([data + b"tail"])
    assert whole[0] is ParseStatus.HEADER
    assert whole[2] == b"tail"
    for cut in range(len(data) + 5):
        assert run([data[:cut], data[cut:] + b"tail"]) == whole
    assert run(bytewise(data + b"tail")) == whole


ports = st.integers(0, 0xFFFF)
ip_versions: st.SearchStrategy[Literal[4, 6]] = st.sampled_from((4, 6))


@st.composite
def v1_headers(draw: st.DrawFn) -> bytes:
    version = draw(ip_versions)
    source = str(draw(st.ip_addresses(v=version))).encode()
    destination = str(draw(st.ip_addresses(v=version))).encode()
    return b"PROXY TCP%d %s %s %d %d\r\n" % (version, source, destination, draw(ports), draw(ports))


@st.composite
def v2_headers(draw: st.DrawFn) -> bytes:
    version = draw(ip_versions)
    source = str(draw(st.ip_addresses(v=version)))
    destination = str(draw(st.ip_addresses(v=version)))
    block = inet(source, destination, draw(ports), draw(ports))
    for kind, value in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)))):
        block += tlv(kind, value)
    return v2(PROXY, INET_STREAM if version == 4 else INET6_STREAM, block)


headers = st.one_of(v1_headers(), v2_headers(), st.sampled_from(VALID))
cut_lists = st.lists(st.integers(0, 10_000), max_size=8)


@fast
@given(headers, st.binary(max_size=64), cut_lists)
def test_random_splits_give_the_same_header_and_payload(
    data: bytes, payload: bytes, cuts: list[int]
) -> None:
    whole = run([data + payload])
    assert whole[0] is ParseStatus.HEADER
    assert isinstance(whole[1], ProxyHeader)
    assert whole[1].length == len(data)
    assert whole[2] == payload
    assert run(split(data + payload, cuts)) == whole


@fast
@given(headers, st.data())
def test_a_truncated_header_is_never_a_result(data: bytes, draw: st.DataObject) -> None:
    truncated = data[: draw.draw(st.integers(0, len(data) - 1))]
    assert run(split(truncated, draw.draw(cut_lists))) == (ParseStatus.NEED_MORE, None, b"")


def could_start_a_header(data: bytes) -> bool:
    return any(data[: len(sig)] == sig[: len(data)] for sig in (V1_PREFIX, SIGNATURE))


@fast
@given(st.binary(min_size=1, max_size=200), cut_lists)
def test_anything_not_starting_like_a_signature_is_payload(data: bytes, cuts: list[int]) -> None:
    if could_start_a_header(data):
        data = b"x" + data
    assert run(split(data, cuts)) == (ParseStatus.NOT_PROXY, None, data)


@fast
@given(st.sampled_from([V1_PREFIX, SIGNATURE]), st.binary(max_size=300), cut_lists)
@example(V1_PREFIX, b"A\nB\rC", [8])  # the verdict on a bare LF must not depend on a later CR
@example(V1_PREFIX, b"A\rB\nC", [8])
def test_garbage_after_a_signature_is_rejected_or_awaited_never_a_crash(
    signature: bytes, garbage: bytes, cuts: list[int]
) -> None:
    data = signature + garbage
    outcome = run(split(data, cuts))
    assert outcome == run([data])
    if outcome[0] is ParseStatus.NEED_MORE:
        limit = V1_MAX_LENGTH if signature == V1_PREFIX else len(SIGNATURE) + 4
        if signature == SIGNATURE and len(data) >= 16:
            limit = 16 + int.from_bytes(data[14:16], "big")
        assert len(data) < limit


@fast
@given(st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 "]), st.text(max_size=60), cut_lists)
def test_v1_text_fields_are_rejected_cleanly(prefix: bytes, text: str, cuts: list[int]) -> None:
    data = prefix + text.encode() + b"\r\n"
    outcome = run(split(data, cuts))
    assert outcome[0] in ("error", ParseStatus.HEADER)


def test_parse_networks() -> None:
    assert parse_networks("10.0.0.0/8, ::1 ,192.0.2.7") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )


@pytest.mark.parametrize("text", ["", "10.0.0.0/8,", "10.0.0.1/8", "10.0.0.0/33", "example.com"])
def test_parse_networks_rejects_bad_cidrs_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid CIDR ") as raised:
        parse_networks(text)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::2", False),
        ("", False),
        ("/run/echo.sock", False),
    ],
)
def test_default_trust_is_loopback_only(host: str, trusted: bool) -> None:
    assert is_trusted(host, DEFAULT_TRUSTED_NETWORKS) is trusted


def test_trust_follows_the_given_networks() -> None:
    networks = parse_networks("10.1.0.0/16,2001:db8::/32")
    assert is_trusted("10.1.2.3", networks)
    assert is_trusted("::ffff:10.1.2.3", networks)
    assert is_trusted("2001:db8::5", networks)
    assert not is_trusted("127.0.0.1", networks)
