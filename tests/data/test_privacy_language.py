"""PII scrubbing and language identification."""

import pytest

from rayllm.data.blocks.language import LanguageConfig, LanguageId
from rayllm.data.blocks.pii import PIIConfig, PIIScrubber, iban_valid, luhn_valid


def scrub(text: str, **config) -> dict:
    doc = {"text": text}
    PIIScrubber(PIIConfig(**config)).apply(doc)
    return doc


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+news@example.co.uk today", "email"),
        ("call +1 415-555-0132 now", "phone"),
        ("call (415) 555-0133 now", "phone"),
        ("host 192.168.10.254 is down", "ip"),
        ("host 2001:db8::ff00:42:8329 is down", "ip"),
        ("card 4111 1111 1111 1111 on file", "credit_card"),
        ("IBAN GB82 WEST 1234 5698 7654 32 please", "iban"),
        ("SSN 123-45-6789 on the form", "national_id"),
        ("NINO AB 12 34 56 C on the form", "national_id"),
    ],
)
def test_each_type_is_replaced_and_counted(text, kind):
    doc = scrub(text)
    assert f"<{kind}>" in doc["text"]
    assert doc[f"pii_{kind}"] == 1
    assert sum(v for k, v in doc.items() if k.startswith("pii_")) == 1


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "version 1.2.3.4567 is not an address",
        "999.1.1.1 is not an address",
        "Act 3, scene 2, line 1599.",
        "IBAN GB00 WEST 1234 5698 7654 32 fails its check",
    ],
)
def test_lookalikes_are_left_alone(text):
    assert scrub(text)["text"] == text


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid(
        "DE89 3704 0044 0532 0130 01"
    )


def test_only_the_asked_types():
    doc = scrub("mail a@b.org from 10.0.0.1", types=["ip"])
    assert doc["text"] == "mail a@b.org from <ip>"


def test_language_is_recorded_and_filtered():
    block = LanguageId(LanguageConfig(keep=["en"]))
    english = {"text": "The quick brown fox jumps over the lazy dog near the river bank."}
    german = {"text": "Der schnelle braune Fuchs springt über den faulen Hund am Flussufer."}
    assert block.apply(english) is None and english["language"] == "en"
    assert block.apply(german) == "not_en" and german["language"] == "de"
    assert 0 < german["language_score"] <= 1
