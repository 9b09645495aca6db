"""Signed, expiring links to scored media (what Label Studio loads): a link names one image,
cannot be stretched to another hash or a later expiry, and dies on time."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from review.media_links import MAX_TTL_S, LinkError, sign, signature, verify

KEY = "a shared secret of enough bytes"
H1, H2 = "ab" * 32, "cd" * 32
NOW = 1_800_000_000.0


def _parts(link: str) -> tuple[str, str, str]:
    url = urlsplit(link)
    query = parse_qs(url.query)
    return url.path.rsplit("/", 1)[-1], query["expires"][0], query["sig"][0]


def test_a_link_verifies_until_it_expires() -> None:
    link = sign(KEY, "https://console.example/", H1, 3600, now=NOW)
    assert link.startswith("https://console.example/ls-media/" + H1 + "?")
    digest, expires, sig = _parts(link)
    verify(KEY, digest, expires, sig, now=NOW + 3599)
    with pytest.raises(LinkError, match="expired"):
        verify(KEY, digest, expires, sig, now=NOW + 3601)


def test_a_link_cannot_be_moved_to_another_image_key_or_expiry() -> None:
    digest, expires, sig = _parts(sign(KEY, "http://c", H1, 3600, now=NOW))
    hostile = [
        (KEY, H2, expires, sig, "bad signature"),  # another image
        (KEY, digest, str(int(expires) + 60), sig, "bad signature"),  # a later expiry
        ("another deployment's key!", digest, expires, sig, "bad signature"),
        (KEY, "../../etc/passwd", expires, sig, "not a media hash"),
        (KEY, digest.upper(), expires, sig, "not a media hash"),
        (KEY, digest, None, sig, "malformed"),
        (KEY, digest, "-5", sig, "malformed"),
        (KEY, digest, "9" * 40, sig, "malformed"),
        (KEY, digest, expires, None, "malformed"),
        (KEY, digest, expires, sig[:-1], "malformed"),
    ]
    for key, d, e, s, why in hostile:
        with pytest.raises(LinkError, match=why):
            verify(key, d, e, s, now=NOW)


def test_a_forged_far_future_link_is_refused_even_when_signed() -> None:
    far = int(NOW + MAX_TTL_S + 86400)
    with pytest.raises(LinkError, match="longest"):
        verify(KEY, H1, str(far), signature(KEY, H1, far), now=NOW)
    with pytest.raises(ValueError):
        sign(KEY, "http://c", H1, MAX_TTL_S + 1)
    with pytest.raises(ValueError, match="at least"):
        sign("short", "http://c", H1, 60)


def test_odd_characters_are_malformed_not_a_crash() -> None:
    digest, _, sig = _parts(sign(KEY, "http://c", H1, 3600, now=NOW))
    for e, s in (("²" * 3, sig), ("1800000100", "é" * 64), ("1800000100", sig.upper()), (" 1800000100", sig)):
        with pytest.raises(LinkError, match="malformed"):
            verify(KEY, digest, e, s, now=NOW)
