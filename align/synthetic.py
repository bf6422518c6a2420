"""A synthetic preference task with a gold judge.

No human labels can be downloaded here, so align ships a task whose ground truth is known:
prompts in plain English ask about one of a few dozen topics, and responses vary along
four attributes a person would care about:

* relevance  - answers the question (facts about the asked topic) or drifts off topic;
* tone       - polite, neutral or rude;
* length     - concise, or rambling with filler and repetition;
* ending     - ends properly ("Hope this helps.") or trails off mid-sentence.

`gold_score(prompt, response)` judges any text (including a model's samples) by those
attributes. A `SimulatedAnnotator` ranks K responses by gold score plus Gaussian noise,
with the noise set so that two annotators agree on a chosen fraction of pairs (InstructGPT
measured 72.6 +- 1.5% agreement between its labelers; Ouyang et al. 2022, sec. 5.1).

The gold judge is never used for training: it is the ground truth that tells whether the
pipeline (reward model, PPO) actually improved what people would prefer.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal

from align.formats import Ranking


@dataclass(frozen=True)
class Topic:
    name: str  # as it appears in prompts
    keywords: tuple[str, ...]  # words that mark a sentence as being about this topic
    facts: tuple[str, ...]  # on-topic sentences


TOPICS: tuple[Topic, ...] = (
    Topic("tea", ("tea", "leaves", "steep"), (
        "Boil fresh water and let the tea leaves steep for three minutes.",
        "Green tea tastes best with water that is a little below boiling.",
        "Loose tea leaves need room to open up in the pot.")),
    Topic("bread", ("bread", "dough", "yeast", "flour"), (
        "Mix flour, water, salt and yeast, then let the dough rise.",
        "Knead the bread dough until it feels smooth and springy.",
        "Bake the bread until the crust is brown and sounds hollow.")),
    Topic("running", ("running", "pace", "runners"), (
        "Start running slowly and build your pace over a few weeks.",
        "Good shoes make running easier on your knees.",
        "Most runners rest one or two days every week.")),
    Topic("sleep", ("sleep", "bed", "bedtime"), (
        "Going to bed at the same time every night helps you sleep.",
        "A dark, cool room makes sleep deeper.",
        "Screens before bedtime can keep your mind awake.")),
    Topic("gardening", ("garden", "gardening", "plants", "soil", "seeds"), (
        "Most plants in a garden need six hours of bright light each day.",
        "Water the soil early in the morning so the plants stay cool.",
        "Plant seeds at a depth of about twice their size.")),
    Topic("saving money", ("money", "budget", "savings", "save"), (
        "Write a simple budget and save a fixed part of every paycheck.",
        "Keep your savings in a separate account so you do not spend them.",
        "Small daily costs add up, so track where your money goes.")),
    Topic("the moon", ("moon", "lunar", "orbit"), (
        "The moon takes about twenty seven days to orbit the earth.",
        "We always see the same side of the moon.",
        "The lunar phases come from how sunlight falls on the moon.")),
    Topic("volcanoes", ("volcano", "volcanoes", "lava", "magma"), (
        "Volcanoes form where magma rises through cracks in the crust.",
        "Lava is magma that has reached the surface.",
        "Some volcanoes stay quiet for centuries before they erupt again.")),
    Topic("bicycles", ("bicycle", "bike", "bicycles", "tires", "chain"), (
        "Check the tires and brakes before every bike ride.",
        "A clean, oiled chain makes a bicycle quiet and smooth.",
        "Set the bike seat so your leg is almost straight at the bottom.")),
    Topic("photosynthesis", ("photosynthesis", "leaf", "chlorophyll"), (
        "Photosynthesis turns sunlight, water and air into sugar.",
        "Chlorophyll makes a leaf green and catches the sunlight.",
        "Each leaf gives off oxygen as a result of photosynthesis.")),
    Topic("coffee", ("coffee", "beans", "espresso", "brew"), (
        "Grind the coffee beans just before you brew them.",
        "Use about two spoons of coffee for each cup of water.",
        "Espresso is coffee made by pushing hot water through fine grounds.")),
    Topic("dogs", ("dog", "dogs", "puppy", "walk"), (
        "Dogs need a walk and some play every day.",
        "Reward a puppy right away when it does the right thing.",
        "Fresh water should always be in the dog bowl.")),
    Topic("cats", ("cat", "cats", "kitten", "litter"), (
        "Cats rest for most of the day and hunt at dusk.",
        "Keep the litter box clean or the cat will avoid it.",
        "A kitten learns to play by chasing small moving things.")),
    Topic("rain", ("rain", "clouds", "droplets", "storm"), (
        "Rain falls when droplets in the clouds grow too heavy.",
        "Warm air carries water up until it cools into clouds.",
        "A storm brings heavy rain when warm and cold air meet.")),
    Topic("the ocean", ("ocean", "waves", "tides", "sea"), (
        "The ocean covers most of the surface of the earth.",
        "Tides rise and fall along the shore twice a day.",
        "Waves are made by wind blowing across the sea.")),
    Topic("chess", ("chess", "pawn", "king", "board"), (
        "In chess you win by trapping the king of the other player.",
        "Control the center of the board early in a chess game.",
        "A pawn that reaches the last row can become a queen.")),
    Topic("guitar", ("guitar", "chords", "strings", "frets"), (
        "Learn a few simple guitar chords and switch between them slowly.",
        "Press the strings just behind the frets for a clean sound.",
        "Tune the guitar before every practice.")),
    Topic("swimming", ("swimming", "swim", "pool", "stroke"), (
        "Breathe out slowly under water when you swim.",
        "Practice one stroke at a time in the shallow end of the pool.",
        "Swimming works almost every muscle in the body.")),
    Topic("recycling", ("recycling", "recycle", "recycled", "plastic", "bins"), (
        "Rinse plastic and glass before you put them in the recycling bins.",
        "Paper and cardboard can often be recycled many times.",
        "Check the local rules, because recycling differs from town to town.")),
    Topic("the sun", ("sun", "solar", "star"), (
        "The sun is a star made mostly of hydrogen and helium.",
        "Light from the sun takes about eight minutes to reach us.",
        "Solar energy drives the weather and the seasons.")),
    Topic("honey bees", ("bees", "bee", "honey", "hive", "pollen"), (
        "Honey bees collect nectar and pollen from flowers.",
        "A bee hive has one queen and thousands of workers.",
        "Bees turn nectar into honey and store it in wax cells.")),
    Topic("writing essays", ("essay", "essays", "paragraph", "thesis"), (
        "Start an essay with a clear thesis in the first paragraph.",
        "Give each paragraph one main idea and support it.",
        "Read the essay aloud to catch awkward sentences.")),
    Topic("learning a language", ("language", "vocabulary", "grammar", "words"), (
        "Practice a new language a little every day rather than a lot once a week.",
        "Learn common words first, since they cover most of what people say.",
        "Speaking with others helps grammar stick better than drills.")),
    Topic("stretching", ("stretching", "stretch", "muscles"), (
        "Stretch gently after a warm up, not when the muscles are cold.",
        "Hold each stretch for about thirty seconds without bouncing.",
        "Regular stretching keeps the muscles and joints flexible.")),
    Topic("rainbows", ("rainbow", "rainbows", "colors"), (
        "A rainbow appears when sunlight shines through falling drops.",
        "Each drop bends the light and splits it into colors.",
        "You see a rainbow when the sunlight is behind you.")),
    Topic("trains", ("train", "trains", "rails", "tracks"), (
        "Trains run on steel rails that keep them on the tracks.",
        "A long train can carry as much as hundreds of trucks.",
        "Electric trains take power from wires above the tracks.")),
    Topic("soup", ("soup", "broth", "vegetables", "simmer"), (
        "Simmer the broth slowly so the soup gets more flavor.",
        "Cut the vegetables to the same size so they cook evenly.",
        "Add salt to the soup at the end, after it has reduced.")),
    Topic("passwords", ("password", "passwords", "login"), (
        "Use a long password that is different for every account.",
        "A password manager can remember passwords for you.",
        "Turn on a second login step for important accounts.")),
    Topic("birds", ("birds", "bird", "feathers", "nest"), (
        "Birds build a nest to keep their eggs warm and safe.",
        "Feathers help birds stay warm and fly.",
        "Many birds fly south when the weather turns cold.")),
    Topic("drinking water", ("drink", "thirsty", "hydrated"), (
        "Drink water through the day, not only when you feel thirsty.",
        "You need to drink more when it is hot or when you exercise.",
        "Keep a bottle nearby so it is easy to stay hydrated.")),
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "Tell me about {t}.",
    "What should I know about {t}?",
    "Can you explain {t} to me?",
    "Give me a quick tip about {t}.",
    "I want to learn about {t}. Where do I start?",
    "What is the most important thing about {t}?",
    "Could you help me understand {t}?",
    "Share one useful fact about {t}.",
    "Explain {t} in simple words.",
    "Teach me something about {t}.",
    "What is interesting about {t}?",
    "I have a question about {t}. Can you help?",
    "Please give me some advice on {t}.",
    "What do beginners get wrong about {t}?",
    "How does {t} work?",
    "My friend asked me about {t}. What should I say?",
    "Give me a short answer: what matters most with {t}?",
    "I am curious about {t}. Tell me more.",
    "What is a good first step with {t}?",
    "Summarize {t} for a child.",
)

POLITE_OPENERS = ("Sure, happy to help.", "Great question!", "Of course.", "Thanks for asking.", "Good question.")
RUDE_OPENERS = ("Ugh, fine.", "That is a silly question.", "Obviously, everyone knows this.", "Whatever.",
                "Do I have to explain this?")
RUDE_INSERTS = ("Try to keep up.", "This is not hard.", "Honestly, look it up yourself next time.")
POLITE_CLOSERS = ("Hope this helps!", "Good luck!", "Let me know if you have more questions.", "Have a nice day!")
NEUTRAL_CLOSERS = ("That is the main idea.", "That is all.")
FILLER = (
    "Anyway, there are many things to think about and I could go on.",
    "By the way, my cousin has a blue car.",
    "Also, I was thinking about lunch earlier.",
    "There is a lot more to say about many things in general.",
    "It is what it is, as people say.",
)
TRAIL_OFFS = ("and then the", "but the other thing is that", "so you might want to", "which is why the")

POLITE_MARKERS = ("happy to help", "great question", "good question", "of course", "thanks for asking",
                  "hope this helps", "good luck", "let me know", "have a nice day", "please")
RUDE_MARKERS = ("ugh", "silly question", "obviously", "whatever", "do i have to", "keep up", "not hard",
                "look it up yourself")
CLOSER_MARKERS = tuple(c.lower().rstrip("!.") for c in POLITE_CLOSERS + NEUTRAL_CLOSERS)


# --------------------------------------------------------------------------- prompts


def _is_heldout(template_idx: int, topic_idx: int) -> bool:
    """Held-out prompts are unseen (template, topic) combinations: one in five."""
    digest = hashlib.sha256(f"{template_idx}:{topic_idx}".encode()).digest()
    return digest[0] % 5 == 0


@cache
def prompt_pool(split: Literal["train", "heldout", "all"]) -> tuple[str, ...]:
    pool = []
    for ti, template in enumerate(PROMPT_TEMPLATES):
        for pi, topic in enumerate(TOPICS):
            if split == "all" or _is_heldout(ti, pi) == (split == "heldout"):
                pool.append(template.format(t=topic.name))
    return tuple(pool)


def make_prompts(n: int, seed: int = 0, split: Literal["train", "heldout"] = "train") -> list[str]:
    """`n` prompts drawn without replacement (cycling through the pool if n exceeds it)."""
    pool = list(prompt_pool(split))
    rng = random.Random(f"prompts:{seed}:{split}")
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(pool)
        out.extend(pool[: n - len(out)])
    return out


@lru_cache(maxsize=4096)
def topic_of(prompt: str) -> Topic | None:
    """The topic a prompt asks about (the longest topic name it contains as whole words)."""
    text = prompt.lower()
    found = [t for t in TOPICS if _count(t.name, text)]
    return max(found, key=lambda t: len(t.name)) if found else None


def _count(phrase: str, text: str) -> int:
    """Occurrences of `phrase` in `text` as whole words ("ugh" is not in "dough")."""
    return len(_whole_words(phrase).findall(text))


@cache
def _whole_words(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(phrase)}\b")


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Attributes:
    relevance: Literal["on", "mixed", "off"]
    tone: Literal["polite", "neutral", "rude"]
    length: Literal["concise", "rambling"]
    ending: Literal["proper", "trails"]


def sample_attributes(rng: random.Random) -> Attributes:
    """The SFT data mixes good and bad responses so SFT samples span the whole range."""
    return Attributes(
        relevance=rng.choices(["on", "mixed", "off"], [0.5, 0.25, 0.25])[0],
        tone=rng.choices(["polite", "neutral", "rude"], [0.35, 0.35, 0.3])[0],
        length=rng.choices(["concise", "rambling"], [0.55, 0.45])[0],
        ending=rng.choices(["proper", "trails"], [0.6, 0.4])[0],
    )


def sample_response(prompt: str, rng: random.Random, attributes: Attributes | None = None) -> str:
    """A response to `prompt` with the given (or random) attributes."""
    a = attributes or sample_attributes(rng)
    topic = topic_of(prompt) or rng.choice(TOPICS)
    other = rng.choice([t for t in TOPICS if t is not topic])
    on_facts = rng.sample(topic.facts, k=len(topic.facts))
    off_facts = rng.sample(other.facts, k=len(other.facts))
    if a.relevance == "on":
        body = on_facts[: rng.choice([1, 2])]
    elif a.relevance == "mixed":
        body = [on_facts[0], off_facts[0]]
    else:
        body = off_facts[: rng.choice([1, 2])]

    parts: list[str] = []
    if a.tone == "polite":
        parts.append(rng.choice(POLITE_OPENERS))
    elif a.tone == "rude":
        parts.append(rng.choice(RUDE_OPENERS))
    parts.extend(body)
    if a.length == "rambling":
        parts.extend(rng.sample(FILLER, k=2))
        parts.append(body[0])  # rambling repeats itself
        if a.tone == "rude":
            parts.append(rng.choice(RUDE_INSERTS))
    if a.ending == "proper":
        parts.append(rng.choice(POLITE_CLOSERS if a.tone == "polite" else NEUTRAL_CLOSERS))
        return " ".join(parts)
    last = parts.pop()
    cut = last.rstrip(".!?").split()
    return " ".join([*parts, " ".join(cut[: max(2, len(cut) // 2)]), rng.choice(TRAIL_OFFS)])


def sft_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs for supervised fine-tuning of the demo model (train prompts only)."""
    rng = random.Random(f"sft:{seed}")
    prompts = make_prompts(n, seed=seed, split="train")
    return [(p, sample_response(p, rng)) for p in prompts]


# --------------------------------------------------------------------------- gold judge

_SENTENCE = re.compile(r"[^.!?]+[.!?]?")
_WORD = re.compile(r"[a-z']+")


def _topics_named(sentence: str, words: set[str]) -> set[str]:
    """Names of the topics whose keywords `sentence` (with its set of `words`) contains; a
    keyword of several words counts as a substring."""
    by_word, phrases = _keyword_index()
    names = {name for w in words & by_word.keys() for name in by_word[w]}
    return names | {name for phrase, name in phrases if phrase in sentence}


@cache
def _keyword_index() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """single-word keyword -> names of the topics it marks; (phrase, topic name) for the others."""
    by_word: dict[str, set[str]] = {}
    phrases: list[tuple[str, str]] = []
    for t in TOPICS:
        for k in t.keywords:
            if " " in k:
                phrases.append((k, t.name))
            else:
                by_word.setdefault(k, set()).add(t.name)
    return by_word, phrases


# The judge is linear in these features; `gold_features` and `GOLD_WEIGHTS` let a diagnosis
# fit the same form to annotators' labels (bench/reward_diagnosis.py: the learnable ceiling).
GOLD_WEIGHTS: dict[str, float] = {
    "on_topic": 3.0,  # +2.0 if it states a fact about the asked topic, -1.0 if not (a 3-point swing)
    "off_topic_sentences": -1.0,  # each sentence about another topic, at most 3
    "polite": 1.0,  # any polite marker
    "rude_phrases": -1.0,  # each rude phrase, at most 3
    "excess_words": -0.04,  # each word beyond 30, at most 50 of them (-2.0)
    "repeated_sentences": -0.75,  # each sentence said twice
    "trails_off": -1.5,  # ends without punctuation
    "closing": 1.0,  # a closing sentence that ends in punctuation
}
GOLD_BIAS = -1.0  # the -1.0 of a response with no on-topic fact


def gold_features(prompt: str, response: str) -> dict[str, float]:
    """The attributes the gold judge scores, as numbers (keys of `GOLD_WEIGHTS`)."""
    topic = topic_of(prompt)
    text = response.strip().lower()
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    words = [set(_WORD.findall(s)) for s in sentences]  # once per sentence: the judge runs millions of times
    about = [_topics_named(s, w) for s, w in zip(sentences, words)]
    on = sum(1 for names in about if topic and topic.name in names)
    off = sum(1 for names in about if names and not (topic and topic.name in names))
    trails = not text or text[-1] not in ".!?"
    return {
        "on_topic": float(on > 0),
        "off_topic_sentences": float(min(off, 3)),
        "polite": float(any(_count(m, text) for m in POLITE_MARKERS)),
        "rude_phrases": float(min(sum(_count(m, text) for m in RUDE_MARKERS), 3)),
        "excess_words": float(min(max(0, len(_WORD.findall(text)) - 30), 50)),
        "repeated_sentences": float(len(sentences) - len(set(sentences))),
        "trails_off": float(trails),
        "closing": float(not trails and any(sentences[-1].startswith(c) for c in CLOSER_MARKERS)),
    }


def gold_score(prompt: str, response: str) -> float:
    """The ground-truth quality of `response` to `prompt`; higher is better (about -7..+4.5).

    relevance  +2.0 if it states a fact about the asked topic, -1.0 if it does not;
               -1.0 for each sentence about another topic (at most 3)
    tone       +1.0 if polite, -1.0 for each rude phrase (at most 3)
    length     -0.04 per word beyond 30 (at most -2.0); -0.75 for each repeated sentence
    ending     +1.0 for a closing sentence ending in punctuation; -1.5 if it trails off
    """
    features = gold_features(prompt, response)
    return round(GOLD_BIAS + sum(GOLD_WEIGHTS[k] * v for k, v in features.items()), 4)


# --------------------------------------------------------------------------- simulated annotators


class SimulatedAnnotator:
    """Ranks responses by gold score plus Gaussian noise (a Thurstone model of a labeler)."""

    def __init__(self, noise: float, seed: int = 0, name: str | None = None):
        self.noise = noise
        self.rng = random.Random(f"annotator:{seed}")
        self.name = name or f"sim-{seed}"

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        """Rank of each response, 0 = best. Equal noisy scores (noise 0, equal gold) tie."""
        noisy = [gold_score(prompt, r) + self.rng.gauss(0.0, self.noise) for r in responses]
        order = sorted(set(noisy), reverse=True)
        return [order.index(s) for s in noisy]


def _pair_agreement(noise: float, diffs: list[float]) -> float:
    """P(two annotators with this noise order a pair the same way), averaged over gold diffs."""
    if noise == 0:
        return 1.0
    # Each annotator sees d + e1 - e2 with e ~ N(0, noise^2): P(correct) = Phi(|d| / (noise*sqrt 2)).
    agree = 0.0
    for d in diffs:
        p = 0.5 * (1 + math.erf(abs(d) / (noise * math.sqrt(2)) / math.sqrt(2)))
        agree += p * p + (1 - p) * (1 - p)
    return agree / len(diffs)


@cache
def _gold_diffs(samples: int = 2000, seed: int = 0) -> tuple[float, ...]:
    rng = random.Random(f"diffs:{seed}")
    diffs = []
    for p in make_prompts(samples, seed=seed):
        a, b = gold_score(p, sample_response(p, rng)), gold_score(p, sample_response(p, rng))
        if a != b:
            diffs.append(a - b)
    return tuple(diffs)


def noise_for_agreement(agreement: float) -> float:
    """The annotator noise at which two annotators agree on `agreement` of untied pairs."""
    if not 0.5 < agreement <= 1.0:
        raise ValueError(f"agreement must be in (0.5, 1], got {agreement}")
    if agreement == 1.0:
        return 0.0
    diffs = list(_gold_diffs())
    lo, hi = 1e-3, 100.0
    for _ in range(60):  # agreement falls monotonically as noise grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _pair_agreement(mid, diffs) > agreement else (lo, mid)
    return math.sqrt(lo * hi)


def make_rankings(
    n: int,
    k: int = 4,
    agreement: float = 0.73,
    seed: int = 0,
    split: Literal["train", "heldout"] = "train",
    annotators: int = 1,
) -> list[Ranking]:
    """`n` rankings of `k` synthetic responses each, by simulated annotators.

    With `annotators` > 1 each prompt's responses are ranked by that many different
    annotators (n counts rankings, so n // annotators prompts).
    """
    noise = noise_for_agreement(agreement)
    team = [SimulatedAnnotator(noise, seed=seed * 1000 + i) for i in range(annotators)]
    rng = random.Random(f"rankings:{seed}:{split}")
    prompts = make_prompts(math.ceil(n / annotators), seed=seed, split=split)
    out: list[Ranking] = []
    for i, prompt in enumerate(prompts):
        responses = [sample_response(prompt, rng) for _ in range(k)]
        for annotator in team:
            if len(out) == n:
                break
            out.append(Ranking(prompt=prompt, responses=responses, ranks=annotator.rank(prompt, responses),
                               annotator=annotator.name, prompt_id=f"{split}-{seed}-{i}"))
    return out
