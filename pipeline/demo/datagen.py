"""Deterministic generators of training data for the demo models (sentiment, topic, NER).

The demo models are fine-tuned from a real pretrained encoder on these rows, so the generators compose
texts from many small fragments (see ``vocab``) rather than a few fixed templates: the model should learn
words, negation and contrast, not sentence shapes. Every generator owns a ``random.Random`` seeded from
its name and the seed, and Faker instances are seeded per instance, so output depends only on the
arguments (no global random state).

The demo models train on these rows together with hand-written text kept as data
(``data/handwritten_*.jsonl``): natural reviews, neutral factual and news sentences, and annotated news
sentences. Generators teach breadth (many names, domains and shapes); the hand-written text teaches how
people actually write, which no template reaches (``sentiment_training``, ``ner_training``).

CLI: ``python -m bertpipe.demo.datagen --out DIR [--seed 0]`` writes sentiment/topic/ner JSONL files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from faker import Faker

from bertpipe.demo import vocab as V

SENTIMENT_LABELS = ("positive", "negative")  # the generated reviews; hand-written text adds neutral
DEMO_SENTIMENT_LABELS = ("positive", "negative", "neutral")
TOPIC_LABELS = ("business", "sports", "science_tech", "world")
NER_LABELS = ("PER", "ORG", "LOC")
CORPUS_SOURCES = ("reviews", "news", "forum")

_SLOT = re.compile(r"\{(\w+)\}")
_NAME_LOCALES = (
    "en_US",
    "en_GB",
    "de_DE",
    "fr_FR",
    "es_ES",
    "it_IT",
    "nl_NL",
    "sv_SE",
    "pl_PL",
    "pt_BR",
    "en_IN",
)
# fr_FR and pt_BR companies are often a bare surname, which would teach PER/ORG confusion.
_COMPANY_LOCALES = ("en_US", "en_GB", "de_DE", "es_ES", "it_IT", "nl_NL", "sv_SE", "pl_PL")
# it_IT is left out: Faker builds its city list from a set, so the order follows PYTHONHASHSEED.
_CITY_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "nl_NL", "sv_SE", "pl_PL", "en_IN")
_POOL_SIZE = 120
# Each hand-written row is seen twice per epoch, which gives natural text weight next to the generated
# rows (four fifths of the sentiment rows, about an eighth of the NER rows) at little training time.
HANDWRITTEN_COPIES = 2


def _rng(kind: str, seed: int) -> random.Random:
    """A private stream per generator, so adding rows to one never shifts another."""
    return random.Random(f"bertpipe-demo:{kind}:{seed}")


class _Pools(NamedTuple):
    names: tuple[tuple[str, str], ...]  # (first name, surname)
    companies: tuple[str, ...]
    cities: tuple[str, ...]


@cache
def _faker(locale: str) -> Faker:
    """Building a Faker costs more than drawing from it; callers re-seed it with ``seed_instance``."""
    return Faker(locale)


@lru_cache(maxsize=8)
def _faker_pools(seed: int) -> _Pools:
    """Names, companies and cities from several locales, drawn once per seed (Faker is slow per call)."""
    names: list[tuple[str, str]] = []
    companies: list[str] = []
    cities: list[str] = []
    for locale in sorted(set(_NAME_LOCALES + _COMPANY_LOCALES + _CITY_LOCALES)):
        fake = _faker(locale)
        fake.seed_instance(f"{seed}:{locale}")
        if locale in _NAME_LOCALES:
            names += [(fake.first_name(), fake.last_name()) for _ in range(_POOL_SIZE)]
        if locale in _COMPANY_LOCALES:
            companies += [c for c in (fake.company().strip() for _ in range(_POOL_SIZE // 2)) if "," not in c]
        if locale in _CITY_LOCALES:
            cities += [fake.city().strip() for _ in range(_POOL_SIZE // 2)]
    return _Pools(tuple(dict.fromkeys(names)), tuple(dict.fromkeys(companies)), tuple(dict.fromkeys(cities)))


def _fill(rng: random.Random, template: str, slots: Mapping[str, str | Sequence[str]]) -> str:
    """Replace each known ``{slot}`` (a string as is, a sequence by one draw per occurrence).

    Unknown slots are left for a later pass: clauses are built first and the review's ``{item}`` and
    context slots are filled once the whole review is assembled.
    """

    def draw(match: re.Match[str]) -> str:
        value = slots.get(match.group(1), match.group(0))
        return value if isinstance(value, str) else rng.choice(value)

    text = _SLOT.sub(draw, template)
    return re.sub(r" +([,.])", r"\1", re.sub(r" {2,}", " ", text)).strip()


def _sentence_case(text: str) -> str:
    """Capitalise the first letter and every letter that follows an end of sentence."""
    text = text[:1].upper() + text[1:]
    return re.sub(r"(?<=[.!?] )([a-z])", lambda m: m.group(1).upper(), text)


def _distinct(make: Callable[[], dict], count: int, seen: set[str]) -> list[dict]:
    """``count`` rows from ``make`` whose texts are not in ``seen``; fails loudly when variety runs out."""
    rows: list[dict] = []
    for _ in range(20 * count + 1000):
        if len(rows) == count:
            return rows
        row = make()
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    raise ValueError(f"the vocabularies cannot produce {count} distinct texts; ask for fewer rows")


def _balanced(rng: random.Random, labels: Sequence[str], n: int, make: Callable[[str], dict]) -> list[dict]:
    """``n`` rows with distinct texts, label counts differing by at most one, in shuffled order."""
    seen: set[str] = set()
    rows: list[dict] = []
    for i, label in enumerate(labels):
        quota = n // len(labels) + (i < n % len(labels))
        rows += _distinct(lambda label=label: make(label), quota, seen)
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------------------------- sentiment

_SENTENCE_KINDS = ("aspect", "verdict", "adjective", "negation", "contrast", "idiom")
_SENTENCE_WEIGHTS = (26, 13, 10, 17, 20, 20)
_REVIEW_SIZES = (1, 2, 3, 4, 5, 6, 7, 8)
_REVIEW_SIZE_WEIGHTS = (17, 19, 19, 14, 12, 9, 6, 4)
_MAX_REVIEW_WORDS = 120
_INTENSIFIERS_OR_NONE = V.INTENSIFIERS + ("",) * 10
# "a" before a vowel sound; "a useful", "a unique" keep "a".
_A_AN = re.compile(r"\b([Aa]) (?=[aeioAEIO]|u(?!s|ni))")


class _ReviewWriter:
    """Builds the sentences of one review about one item, avoiding fragments it has already used."""

    def __init__(self, rng: random.Random, label: str):
        self.rng, self.label = rng, label
        self.positive = label == "positive"
        self.domain = rng.choice(V.DOMAINS)
        self.item = rng.choice(self.domain.items)
        self.used: set[str] = set()

    def pick(self, options: Sequence[str]) -> str:
        fresh = [option for option in options if option not in self.used]
        choice = self.rng.choice(fresh or options)
        self.used.add(choice)
        return choice

    def aspect(self, positive: bool) -> str:
        return self.pick(self.domain.pos if positive else self.domain.neg)

    def polar_clause(self) -> str:
        """A clause that on its own carries the review's polarity (aspect, verdict, negation, idiom)."""
        pick = self.rng.random()
        if pick < 0.6:
            return self.aspect(self.positive)
        if pick < 0.75:
            return self.pick(V.POS_VERDICTS if self.positive else V.NEG_VERDICTS)
        if pick < 0.9:
            return self.pick(V.POS_NEGATION if self.positive else V.NEG_NEGATION)
        return self.pick(V.POS_IDIOMS if self.positive else V.NEG_IDIOMS)

    def contrast(self) -> str:
        """Mixed sentence whose final clause (after "but", "however", ...) decides the label."""
        rng, positive = self.rng, self.positive
        decisive, opposite = self.polar_clause(), self.aspect(not positive)
        pick = rng.random()
        if pick < 0.2:
            np_adj = rng.choice(V.NEG_NP_ADJ if positive else V.POS_NP_ADJ)
            # The aspect must differ from the decisive clause's ("weak characters but the characters...").
            aspect = next((a for a in rng.sample(self.domain.aspects, 3) if a not in decisive), "price")
            noun_phrase = f"{np_adj} {aspect}"
            return _fill(rng, rng.choice(V.SHORT_CONTRAST_FRAMES), {"np": noun_phrase, "y": decisive})
        frames = V.POS_ONLY_CONTRAST if positive else V.NEG_ONLY_CONTRAST
        frame = rng.choice(frames if pick < 0.4 else V.CONTRAST_FRAMES)
        return _fill(rng, frame, {"x": opposite, "y": decisive, "pos_adj": V.POS_ADJ})

    def sentence(self, kind: str) -> str:
        rng, positive = self.rng, self.positive
        if kind == "aspect":
            return self.aspect(positive)
        if kind == "verdict":
            return self.pick(V.POS_VERDICTS if positive else V.NEG_VERDICTS)
        if kind == "idiom":
            return self.pick(V.POS_IDIOMS if positive else V.NEG_IDIOMS)
        if kind == "adjective":
            adjectives = V.POS_ADJ if positive else V.NEG_ADJ
            return _fill(rng, self.pick(V.ADJ_FRAMES), {"adj": adjectives, "intens": _INTENSIFIERS_OR_NONE})
        if kind == "negation":
            if rng.random() < 0.65:
                return self.pick(V.POS_NEGATION if positive else V.NEG_NEGATION)
            if positive:
                return _fill(rng, self.pick(V.POS_NEGATED_FRAMES), {"adj": V.NEGATABLE_NEG_ADJ})
            return _fill(rng, self.pick(V.NEGATED_ADJ_FRAMES), {"neg": V.NEGATORS, "adj": V.POS_ADJ})
        return self.contrast()


def _punctuate(rng: random.Random, sentence: str, neutral: bool = False) -> str:
    if sentence[-1] in ".!?":
        return sentence
    pick = rng.random()
    if neutral:
        return sentence + (":" if pick < 0.15 else "..." if pick < 0.2 else ".")
    return sentence + ("!" if pick < 0.13 else "!!" if pick < 0.16 else "..." if pick < 0.19 else ".")


def _review(rng: random.Random, writer: _ReviewWriter, size: int | None = None) -> str:
    """One review of 1 to 8 sentences (at most ~120 words) with the writer's label.

    Reusing one writer for several paragraphs of a long review avoids repeating fragments.
    """
    positive, domain = writer.positive, writer.domain
    size = size or rng.choices(_REVIEW_SIZES, weights=_REVIEW_SIZE_WEIGHTS)[0]
    sentences = [
        writer.sentence(rng.choices(_SENTENCE_KINDS, weights=_SENTENCE_WEIGHTS)[0]) for _ in range(size)
    ]
    if size > 1 and rng.random() < 0.3:
        sentences.append(writer.pick(V.POS_CLOSERS if positive else V.NEG_CLOSERS))
    if rng.random() < 0.12:
        stars = rng.choice(V.POS_STARS if positive else V.NEG_STARS)
        sentences.insert(rng.choice((0, len(sentences))), stars)
    slots = {**V.SENTIMENT_SLOTS, "item": writer.item}
    parts = [_punctuate(rng, _sentence_case(_fill(rng, s, slots))) for s in sentences]
    if size > 2 and rng.random() < 0.6:
        opener = writer.pick(domain.openers + V.GENERIC_OPENERS)
        parts.insert(0, _punctuate(rng, _sentence_case(_fill(rng, opener, slots)), neutral=True))
    while len(parts) > 1 and len(" ".join(parts).split()) > _MAX_REVIEW_WORDS:
        parts.pop(-2)
    text = _A_AN.sub(r"\1n ", " ".join(parts))
    style = rng.random()
    if style < 0.07:
        text = text.lower()
    elif style < 0.09 and len(parts) == 1:
        text = text.upper()
    if rng.random() < 0.05:
        text += " " + rng.choice(V.POS_EMOJI if positive else V.NEG_EMOJI)
    return text


def make_sentiment(n: int = 3000, seed: int = 0) -> list[dict]:
    """Balanced positive/negative reviews from many domains, with negation, contrast and stars."""
    rng = _rng("sentiment", seed)
    return _balanced(
        rng,
        SENTIMENT_LABELS,
        n,
        lambda label: {"text": _review(rng, _ReviewWriter(rng, label)), "label": label},
    )


# ------------------------------------------------------------------------------------------------ topic

_TEAMS = tuple(f"{city} {suffix}" for city in V.CITIES for suffix in V.TEAM_SUFFIXES) + V.SPORTS_TEAMS
_SMALL_WORDS = frozenset(
    ("a", "an", "and", "as", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with")
)


def _title_case(template: str) -> str:
    """Headline Title Case; applied to the template so filled names keep their own casing."""
    words = template.split(" ")
    return " ".join(
        w if (i and w in _SMALL_WORDS) or w.startswith("{") else w[:1].upper() + w[1:]
        for i, w in enumerate(words)
    )


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_TOPIC_COUNTRIES = tuple(f"the {c}" if c in V.WITH_ARTICLE else c for c in V.COUNTRIES)


def _topic_slots(rng: random.Random, pools: _Pools) -> dict[str, Sequence[str]]:
    """Fresh values for one topic text (numbers are drawn here so each text gets its own)."""
    currency = rng.choice("$€£")
    amount = rng.choice(
        (
            f"{rng.randint(1, 99)}.{rng.randint(1, 9)} billion",
            f"{rng.randint(20, 950)} million",
            f"{rng.randint(2, 90)}m",
        )
    )
    pct = rng.choice(
        (
            f"{rng.randint(1, 45)}%",
            f"{rng.randint(0, 9)}.{rng.randint(1, 9)}%",
            f"{rng.randint(2, 30)} per cent",
        )
    )
    home, away = rng.randint(1, 5), rng.randint(0, 4)
    return {
        "person": tuple(" ".join(rng.choice(pools.names)) for _ in range(3)),
        "company": pools.companies + V.COMPANIES,
        "city": V.CITIES + pools.cities[:40],
        "country": _TOPIC_COUNTRIES,
        "team": _TEAMS,
        "num": (f"{rng.randint(120, 60000):,}", str(rng.randint(20, 900))),
        "pct": (pct,),
        "money": (f"{currency}{amount}",),
        "month": V.MONTHS,
        "day": V.DAYS,
        "small": (str(rng.randint(2, 12)),),
        "nth": (_ordinal(rng.randint(3, 12)),),
        "score": (f"{max(home, away + 1)}-{min(home, away)}",),
        "minute": (_ordinal(rng.randint(4, 90)),),
        "yards": (str(rng.randint(150, 420)),),
        "mag": (f"{rng.randint(5, 7)}.{rng.randint(0, 9)}",),
        "event": V.SPORT_EVENTS,
    }


def _headline(rng: random.Random, label: str, slots: Mapping[str, Sequence[str]]) -> str:
    headline = rng.choice(V.TOPIC_HEADLINES[label])
    headline = _fill(rng, _title_case(headline) if rng.random() < 0.3 else headline, slots)
    return headline[:1].upper() + headline[1:]


def _dateline(rng: random.Random) -> str:
    return f"{rng.choice(V.CITIES).upper()} ({rng.choice(V.AGENCIES)}) - "


def _topic_text(rng: random.Random, label: str, pools: _Pools) -> str:
    """A headline, a headline with one or two body sentences, a dateline snippet, or body text alone."""
    slots = _topic_slots(rng, pools)
    headline = _headline(rng, label, slots)
    bodies = [_fill(rng, b, slots) for b in rng.sample(V.TOPIC_BODIES[label], rng.randint(1, 3))]
    form = rng.random()
    if form < 0.3:
        return headline
    if form < 0.65:
        return headline + rng.choice((". ", ": ", "\n", " - ")) + " ".join(bodies[:2])
    if form < 0.85:
        return _dateline(rng) + " ".join(bodies)
    return " ".join(bodies)


def make_topic(n: int = 2000, seed: int = 0) -> list[dict]:
    """Balanced news headlines and short paragraphs: business, sports, science_tech, world."""
    rng = _rng("topic", seed)
    pools = _faker_pools(seed)
    return _balanced(
        rng, TOPIC_LABELS, n, lambda label: {"text": _topic_text(rng, label, pools), "label": label}
    )


def make_neutral(n: int = 500, seed: int = 0) -> list[dict]:
    """News headlines and paragraphs labelled ``neutral`` for sentiment: they report, they do not judge."""
    rng = _rng("neutral", seed)
    pools = _faker_pools(seed)
    return _distinct(
        lambda: {"text": _topic_text(rng, rng.choice(TOPIC_LABELS), pools), "label": "neutral"}, n, set()
    )


def handwritten(task: str) -> list[dict]:
    """The hand-written training rows of ``sentiment`` (text, label) or ``ner`` (text, entities)."""
    path = resources.files("bertpipe.demo") / "data" / f"handwritten_{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sentiment_training(n: int = 600, seed: int = 0) -> list[dict]:
    """The demo sentiment model's rows: ``n`` generated reviews, ``n // 4`` generated news items as
    neutral, and the hand-written text, shuffled."""
    rows = (
        make_sentiment(n, seed) + make_neutral(n // 4, seed) + handwritten("sentiment") * HANDWRITTEN_COPIES
    )
    _rng("sentiment-mix", seed).shuffle(rows)
    return rows


def ner_training(n: int = 2500, seed: int = 0) -> list[dict]:
    """The demo NER model's rows: generated sentences and the hand-written news sentences, shuffled."""
    rows = make_ner(n, seed) + handwritten("ner") * HANDWRITTEN_COPIES
    _rng("ner-mix", seed).shuffle(rows)
    return rows


# -------------------------------------------------------------------------------------------------- NER

_ENTITY_SLOTS = {
    "PER": "PER",
    "SURNAME": "PER",
    "ORG": "ORG",
    "COMPANY": "ORG",
    "LOC": "LOC",
    "CITY": "LOC",
    "COUNTRY": "LOC",
}


def _entity_value(rng: random.Random, slot: str, pools: _Pools) -> str:
    """Surface string of one entity slot."""
    if slot == "PER":
        if rng.random() < 0.12:
            return rng.choice(V.PEOPLE)
        first, last = rng.choice(pools.names)
        if rng.random() < 0.08:
            return f"{first} {rng.choice(pools.names)[0][0]}. {last}"
        return f"{first} {last}"
    if slot == "SURNAME":
        return rng.choice(pools.names)[1]
    if slot == "COMPANY":
        return rng.choice(pools.companies) if rng.random() < 0.6 else rng.choice(V.COMPANIES)
    if slot == "ORG":
        return rng.choice(pools.companies) if rng.random() < 0.45 else rng.choice(V.ORGS)
    if slot == "CITY":
        return rng.choice(V.CITIES) if rng.random() < 0.6 else rng.choice(pools.cities)
    if slot == "COUNTRY":
        return rng.choice(V.COUNTRIES)
    places = rng.choices((V.CITIES, V.COUNTRIES, V.REGIONS, pools.cities), weights=(35, 20, 15, 30))[0]
    return rng.choice(places)


def _other_value(rng: random.Random, slot: str) -> str:
    if slot == "NUM":
        return str(rng.randint(2, 40))
    if slot == "YEAR":
        return str(rng.randint(1985, 2025))
    table = {"DAY": V.DAYS, "MONTH": V.MONTHS, "DEMONYM": V.DEMONYMS, "CATEGORY": V.CATEGORIES}
    return rng.choice(table[slot])


def _render_ner(rng: random.Random, template: str, pools: _Pools) -> tuple[str, list[dict]]:
    """Fill a template, recording the character span of every entity as it is written."""
    text = ""
    entities: list[dict] = []
    last = 0
    for match in _SLOT.finditer(template):
        text += template[last : match.start()]
        slot = match.group(1)
        if slot in _ENTITY_SLOTS:
            surface = _entity_value(rng, slot, pools)
            # "the Netherlands", "the BBC": the article stays outside the span.
            if surface in V.WITH_ARTICLE and not text.lower().endswith("the "):
                text += "the "
            start = len(text)
            entities.append({"start": start, "end": start + len(surface), "label": _ENTITY_SLOTS[slot]})
            text += surface
        else:
            text += _other_value(rng, slot)
        last = match.end()
    tail = template[last:]
    # "Foo S.A." at the end of a sentence must not get a second full stop.
    text += tail[1:] if tail.startswith(".") and text.endswith(".") else tail
    if text.startswith("the "):
        text = "T" + text[1:]
    return text, entities


def _ner_sentence(rng: random.Random, pools: _Pools) -> tuple[str, list[dict]]:
    if rng.random() < 0.1:
        return _render_ner(rng, rng.choice(V.NER_EMPTY_TEMPLATES), pools)
    template = rng.choice(V.NER_TEMPLATES)
    if template[0].isupper() and ":" not in template and rng.random() < 0.12:
        prefix = _fill(
            rng,
            rng.choice(V.NER_PREFIXES),
            {
                "NUM": (str(rng.randint(1, 30)),),
                "DAY": V.DAYS,
                "MONTH": V.MONTHS,
                "YEAR": (str(rng.randint(1990, 2025)),),
            },
        )
        template = f"{prefix} {template}"
    return _render_ner(rng, template, pools)


def _shifted(entities: list[dict], shift: int) -> list[dict]:
    return [{**e, "start": e["start"] + shift, "end": e["end"] + shift} for e in entities]


def _ner_dateline(rng: random.Random, pools: _Pools) -> tuple[str, list[dict]]:
    """``CITY (Agency) - `` with its spans, sometimes after a headline line, as news stories start.

    The encoder is uncased and sees no line breaks, so only these examples teach that the dateline's
    city starts a new entity after a headline that ends in a name."""
    text, entities = "", []
    if rng.random() < 0.6:
        headline, entities = _ner_sentence(rng, pools)
        # Headlines have no full stop, unless it belongs to a name at the end ("Foo S.A.").
        ends_in_name = entities and entities[-1]["end"] == len(headline)
        text = (headline if ends_in_name else headline.rstrip(".")) + "\n"
    city, agency = rng.choice(V.CITIES).upper(), rng.choice(V.AGENCIES)
    entities = [*entities, {"start": len(text), "end": len(text) + len(city), "label": "LOC"}]
    text += f"{city} ("
    entities.append({"start": len(text), "end": len(text) + len(agency), "label": "ORG"})
    return f"{text}{agency}) - ", entities


def _ner_text(rng: random.Random, pools: _Pools) -> dict:
    """One or (sometimes) two sentences with their entity spans, sometimes after a dateline."""
    text, entities = _ner_sentence(rng, pools)
    if rng.random() < 0.2:
        more, more_entities = _ner_sentence(rng, pools)
        entities += _shifted(more_entities, len(text) + 1)
        text = f"{text} {more}"
    if rng.random() < 0.1:
        prefix, prefix_entities = _ner_dateline(rng, pools)
        entities = prefix_entities + _shifted(entities, len(prefix))
        text = prefix + text
    return {"text": text, "entities": entities}


def make_ner(n: int = 3500, seed: int = 0) -> list[dict]:
    """Sentences with PER/ORG/LOC character spans, multilingual names and capitalised distractors."""
    rng = _rng("ner", seed)
    pools = _faker_pools(seed)
    return _distinct(lambda: _ner_text(rng, pools), n, set())


# ---------------------------------------------------------------------------------------- sample corpus

_FORUM_OPENERS = (
    "Quick question: ",
    "PSA: ",
    "Just my two cents: ",
    "Honest opinion: ",
    "tbh ",
    "FWIW, ",
    "Lurker here. ",
    "Following up on my last post: ",
    "Long time reader, first post. ",
    "Not sure this is the right thread, but ",
)
_FORUM_CLOSERS = (
    " Thoughts?",
    " Anyone else?",
    " Cheers.",
    " Just saying.",
    " Edit: typo.",
    " Thanks in advance!",
    " Mods, feel free to move this.",
    " /rant",
)
_FORUM_NEWS_INTROS = (
    "Did anyone else see this? ",
    "Saw this on the news: ",
    "Can't believe this: ",
    "Posting this here for discussion. ",
    "So this just happened: ",
)
_FORUM_REACTIONS = (
    "Wild.",
    "Not surprised, honestly.",
    "Big if true.",
    "About time.",
    "What a week.",
    "Curious what you all think.",
    "Makes you wonder what comes next.",
)


def _news_story(rng: random.Random, pools: _Pools, label: str) -> str:
    """A headline on its own line, then a body of the same topic, sometimes with an extra entity sentence."""
    slots = _topic_slots(rng, pools)
    bodies = [_fill(rng, b, slots) for b in rng.sample(V.TOPIC_BODIES[label], rng.randint(2, 4))]
    if rng.random() < 0.5:
        bodies.insert(rng.randint(1, len(bodies)), _ner_sentence(rng, pools)[0])
    dateline = _dateline(rng) if rng.random() < 0.4 else ""
    return f"{_headline(rng, label, slots)}\n{dateline}{' '.join(bodies)}"


def _forum_post(rng: random.Random, pools: _Pools) -> str:
    """An informal post: an opinion about something bought or used, or a reaction to the news."""
    if rng.random() < 0.6:
        body = _review(rng, _ReviewWriter(rng, rng.choice(SENTIMENT_LABELS)), size=rng.randint(2, 4))
        opener = rng.choice(_FORUM_OPENERS)
        if not opener.endswith(". ") and not re.match(r"I\b", body):
            body = body[:1].lower() + body[1:]
        return opener + body + rng.choice(_FORUM_CLOSERS)
    headline = _headline(rng, rng.choice(TOPIC_LABELS), _topic_slots(rng, pools))
    chat = " ".join(_ner_sentence(rng, pools)[0] for _ in range(rng.randint(1, 2)))
    return f"{rng.choice(_FORUM_NEWS_INTROS)}{headline}. {chat} {rng.choice(_FORUM_REACTIONS)}"


def _long_text(rng: random.Random, source: str, pools: _Pools) -> str:
    """300-600 words in paragraphs: a news digest, one long review, or a forum thread."""
    target = rng.randint(300, 420) if source == "reviews" else rng.randint(300, 560)
    writer = _ReviewWriter(rng, rng.choice(SENTIMENT_LABELS))
    paragraphs: list[str] = []
    while sum(len(p.split()) for p in paragraphs) < target:
        if source == "news":
            paragraphs.append(_news_story(rng, pools, rng.choice(TOPIC_LABELS)))
        elif source == "reviews":
            paragraphs.append(_review(rng, writer, size=rng.randint(4, 6)))
        else:
            paragraphs.append(_forum_post(rng, pools))
    return "\n\n".join(paragraphs)


def _corpus_text(rng: random.Random, source: str, length: str, pools: _Pools) -> str:
    if length == "long":
        return _long_text(rng, source, pools)
    if source == "reviews":
        writer = _ReviewWriter(rng, rng.choice(SENTIMENT_LABELS))
        if length == "short":
            return f"{writer.item.capitalize()}: {_review(rng, writer, size=1)}"
        return _review(rng, writer, size=rng.randint(3, 7))
    if source == "news":
        label = rng.choice(TOPIC_LABELS)
        if length == "short":
            return f"{_headline(rng, label, _topic_slots(rng, pools))} ({rng.choice(V.AGENCIES)})"
        return _news_story(rng, pools, label)
    if length == "short":
        return rng.choice(_FORUM_OPENERS) + _ner_sentence(rng, pools)[0] + rng.choice(_FORUM_CLOSERS)
    return _forum_post(rng, pools)


def make_sample_corpus(n: int = 600, seed: int = 0) -> list[dict]:
    """Unlabelled demo documents (reviews, news, forum posts), mostly medium with a few short and long."""
    rng = _rng("corpus", seed)
    pools = _faker_pools(seed + 1_000_003)
    rows = []
    for i in range(n):
        source = rng.choice(CORPUS_SOURCES)
        length = rng.choices(("short", "medium", "long"), weights=(12, 78, 10))[0]
        text = _corpus_text(rng, source, length, pools)
        rows.append({"id": f"doc-{i:05d}", "text": text, "source": source})
    return rows


# -------------------------------------------------------------------------------------------------- CLI


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bertpipe.demo.datagen", description="Write the demo training sets as JSONL files."
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="same seed gives byte-identical files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    datasets = {
        "sentiment": make_sentiment(seed=args.seed),
        "topic": make_topic(seed=args.seed),
        "ner": make_ner(seed=args.seed),
    }
    for name, rows in datasets.items():
        _write_jsonl(args.out / f"{name}.jsonl", rows)
        if name == "ner":
            counts = Counter(e["label"] for row in rows for e in row["entities"])
            detail = ", ".join(f"{label}={counts[label]}" for label in NER_LABELS) + " entities"
        else:
            counts = Counter(row["label"] for row in rows)
            detail = ", ".join(f"{label}={count}" for label, count in sorted(counts.items()))
        print(f"{name}.jsonl: {len(rows)} rows ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
