"""Vocabularies and sentence fragments for the demo data generators.

The data lives in JSON files under ``data/`` (package data), kept apart from the generator logic so the
fragments can grow without hiding the composition rules; this module loads them once, on import, as the
tuples and dicts ``datagen`` uses. Fragments are lower-case clauses without final punctuation; ``{slot}``
markers are filled by ``datagen`` (``{item}`` with the domain's item, other slots from ``SENTIMENT_SLOTS``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, NamedTuple


class Domain(NamedTuple):
    """One review domain: what is reviewed, its aspects and polar clauses about them."""

    name: str
    items: tuple[str, ...]
    aspects: tuple[str, ...]
    openers: tuple[str, ...]
    pos: tuple[str, ...]
    neg: tuple[str, ...]


def _frozen(value: Any) -> Any:
    """JSON lists as tuples (also inside objects), so the constants stay immutable and hashable."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {key: _frozen(v) for key, v in value.items()}
    return value


def _load(name: str) -> dict[str, Any]:
    """One data file: an object of named string lists, or of objects mapping names to string lists."""
    path = resources.files("bertpipe.demo") / "data" / f"{name}.json"
    return _frozen(json.loads(path.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------------- sentiment

_SENTIMENT = _load("sentiment")
DOMAINS: tuple[Domain, ...] = tuple(Domain(**domain) for domain in _SENTIMENT["DOMAINS"])
POS_ADJ: tuple[str, ...] = _SENTIMENT["POS_ADJ"]
NEG_ADJ: tuple[str, ...] = _SENTIMENT["NEG_ADJ"]
# Negative adjectives whose negation reads as praise ("not bad at all", "never boring").
NEGATABLE_NEG_ADJ: tuple[str, ...] = _SENTIMENT["NEGATABLE_NEG_ADJ"]
INTENSIFIERS: tuple[str, ...] = _SENTIMENT["INTENSIFIERS"]
# Words that flip a positive adjective: "not great", "far from impressive".
NEGATORS: tuple[str, ...] = _SENTIMENT["NEGATORS"]
ADJ_FRAMES: tuple[str, ...] = _SENTIMENT["ADJ_FRAMES"]
NEGATED_ADJ_FRAMES: tuple[str, ...] = _SENTIMENT["NEGATED_ADJ_FRAMES"]
POS_NEGATED_FRAMES: tuple[str, ...] = _SENTIMENT["POS_NEGATED_FRAMES"]
POS_VERDICTS: tuple[str, ...] = _SENTIMENT["POS_VERDICTS"]
NEG_VERDICTS: tuple[str, ...] = _SENTIMENT["NEG_VERDICTS"]
POS_NEGATION: tuple[str, ...] = _SENTIMENT["POS_NEGATION"]
NEG_NEGATION: tuple[str, ...] = _SENTIMENT["NEG_NEGATION"]
# Contrast frames: {x} is a clause of the opposite polarity, {y} the one that decides the label.
CONTRAST_FRAMES: tuple[str, ...] = _SENTIMENT["CONTRAST_FRAMES"]
POS_ONLY_CONTRAST: tuple[str, ...] = _SENTIMENT["POS_ONLY_CONTRAST"]
NEG_ONLY_CONTRAST: tuple[str, ...] = _SENTIMENT["NEG_ONLY_CONTRAST"]
# Short noun-phrase contrasts: "great screen but the battery dies by noon".
SHORT_CONTRAST_FRAMES: tuple[str, ...] = _SENTIMENT["SHORT_CONTRAST_FRAMES"]
POS_NP_ADJ: tuple[str, ...] = _SENTIMENT["POS_NP_ADJ"]
NEG_NP_ADJ: tuple[str, ...] = _SENTIMENT["NEG_NP_ADJ"]
# Idioms, comparisons, expectations, durability, change over time, faint praise and understatement:
# the label rests on what the phrase means, not on a polar adjective.
POS_IDIOMS: tuple[str, ...] = _SENTIMENT["POS_IDIOMS"]
NEG_IDIOMS: tuple[str, ...] = _SENTIMENT["NEG_IDIOMS"]
IDIOM_SLOTS: dict[str, tuple[str, ...]] = _SENTIMENT["IDIOM_SLOTS"]
POS_STARS: tuple[str, ...] = _SENTIMENT["POS_STARS"]
NEG_STARS: tuple[str, ...] = _SENTIMENT["NEG_STARS"]
POS_EMOJI: tuple[str, ...] = _SENTIMENT["POS_EMOJI"]
NEG_EMOJI: tuple[str, ...] = _SENTIMENT["NEG_EMOJI"]
POS_CLOSERS: tuple[str, ...] = _SENTIMENT["POS_CLOSERS"]
NEG_CLOSERS: tuple[str, ...] = _SENTIMENT["NEG_CLOSERS"]
GENERIC_OPENERS: tuple[str, ...] = _SENTIMENT["GENERIC_OPENERS"]
# The file holds the general slots; the idiom slots are shared with IDIOM_SLOTS, not repeated.
SENTIMENT_SLOTS: dict[str, tuple[str, ...]] = {**_SENTIMENT["SENTIMENT_SLOTS"], **IDIOM_SLOTS}

# ------------------------------------------------------------------------------------- shared entities

_ENTITIES = _load("entities")
COUNTRIES: tuple[str, ...] = _ENTITIES["COUNTRIES"]
CITIES: tuple[str, ...] = _ENTITIES["CITIES"]
REGIONS: tuple[str, ...] = _ENTITIES["REGIONS"]
COMPANIES: tuple[str, ...] = _ENTITIES["COMPANIES"]
SPORTS_TEAMS: tuple[str, ...] = _ENTITIES["SPORTS_TEAMS"]
INSTITUTIONS: tuple[str, ...] = _ENTITIES["INSTITUTIONS"]
ORGS = COMPANIES + SPORTS_TEAMS + INSTITUTIONS
# Names written with "the" in running text ("the Netherlands", "the BBC"); the article is added by the
# generator and stays outside the entity span.
WITH_ARTICLE: frozenset[str] = frozenset(_ENTITIES["WITH_ARTICLE"])
PEOPLE: tuple[str, ...] = _ENTITIES["PEOPLE"]
DEMONYMS: tuple[str, ...] = _ENTITIES["DEMONYMS"]
DAYS: tuple[str, ...] = _ENTITIES["DAYS"]
MONTHS: tuple[str, ...] = _ENTITIES["MONTHS"]

# --------------------------------------------------------------------------------------------- topics

_TOPICS = _load("topics")
TEAM_SUFFIXES: tuple[str, ...] = _TOPICS["TEAM_SUFFIXES"]
AGENCIES: tuple[str, ...] = _TOPICS["AGENCIES"]
SPORT_EVENTS: tuple[str, ...] = _TOPICS["SPORT_EVENTS"]
TOPIC_HEADLINES: dict[str, tuple[str, ...]] = _TOPICS["TOPIC_HEADLINES"]
TOPIC_BODIES: dict[str, tuple[str, ...]] = _TOPICS["TOPIC_BODIES"]

# ------------------------------------------------------------------------------------------------ NER

_NER = _load("ner")
# Entity slots: {PER} full name, {SURNAME} a person's surname alone (its title stays outside the span),
# {ORG} any organisation, {COMPANY} a business (ORG), {LOC} any place, {CITY} and {COUNTRY} (LOC).
# Other slots are capitalised non-entities that the model must learn to leave alone.
NER_TEMPLATES: tuple[str, ...] = _NER["NER_TEMPLATES"]
# Sentences with only capitalised non-entities.
NER_EMPTY_TEMPLATES: tuple[str, ...] = _NER["NER_EMPTY_TEMPLATES"]
# Headline-style prefixes that add capitalised non-entity words before an entity sentence.
NER_PREFIXES: tuple[str, ...] = _NER["NER_PREFIXES"]
CATEGORIES: tuple[str, ...] = _NER["CATEGORIES"]
