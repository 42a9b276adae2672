"""Privacy scrubbing: personal data replaced by typed placeholders, counted per type.

Patterns are conservative (precision over recall): credit-card numbers must pass the Luhn
check and IBANs their mod-97 check; phone numbers need a country code or a separator pattern.
National ids covered: US social security numbers and UK national insurance numbers.
"""

from __future__ import annotations

import ipaddress
import re

from rayllm.config import StageConfig
from rayllm.data.blocks.base import Block, Column, Document

PII_TYPES = ("email", "phone", "ip", "credit_card", "iban", "national_id")


class PIIConfig(StageConfig):
    enabled: bool = True
    types: list[str] = list(PII_TYPES)
    placeholder: str = "<{type}>"


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _ip_valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_PATTERNS: dict[str, tuple[re.Pattern, object]] = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"), None),
    "iban": (
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        iban_valid,
    ),
    "credit_card": (
        re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
        lambda m: luhn_valid(re.sub(r"\D", "", m)),
    ),
    "national_id": (
        re.compile(
            r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b|\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
        ),
        None,
    ),
    "phone": (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}"
            r"|\(\d{3}\) ?\d{3}[-.]\d{4}|\d{3}[-.]\d{3}[-.]\d{4})(?![ .-]?\d)"
        ),
        None,
    ),
    "ip": (
        re.compile(
            r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
            r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
        ),
        _ip_valid,
    ),
}


class PIIScrubber(Block):
    """Replaces each detected item by ``<type>`` and adds ``pii_<type>`` counts to the document."""

    name = "pii"
    columns = {f"pii_{kind}": Column(0, "sum") for kind in PII_TYPES}

    def __init__(self, config: PIIConfig):
        unknown = set(config.types) - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {PII_TYPES}")
        self.types = [t for t in _PATTERNS if t in config.types]  # order matters: IBAN before cards
        self.placeholder = config.placeholder

    def apply(self, doc: Document) -> str | None:
        text = doc["text"]
        for kind in self.types:
            pattern, check = _PATTERNS[kind]
            count = 0

            def replace(match: re.Match, kind: str = kind, check=check) -> str:
                nonlocal count
                if check is not None and not check(match.group(0)):
                    return match.group(0)
                count += 1
                return self.placeholder.format(type=kind)

            text = pattern.sub(replace, text)
            doc[f"pii_{kind}"] = count
        doc["text"] = text
        return None
