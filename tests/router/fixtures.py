"""Small synthetic router data: templated prompts per domain, plus hand-written held-out prompts."""

from __future__ import annotations

import random

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Chile", "Santiago"), ("India", "New Delhi")]
WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "pencil", "mirror", "ladder"]
FUNCS = ["parse", "merge", "load_file", "count_items", "reverse", "flatten", "to_json", "split_lines"]
CHAT = ["hey, how are you doing today?", "i just got back from the beach, it was so nice",
        "do you like pizza? i could eat it every day", "lol that movie was hilarious",
        "good morning! did you sleep well?", "what are you up to this weekend?",
        "my dog keeps stealing my socks haha", "ugh, mondays are the worst",
        "thanks so much, you're the best!", "i'm feeling kind of tired tonight",
        "have you ever been to a concert?", "that sounds fun, tell me more about it"]


def _math(r: random.Random) -> str:
    a, b, c = r.randint(2, 999), r.randint(2, 99), r.randint(1, 500)
    return r.choice([f"What is {a} + {b}?", f"Calculate {a} * {b}.", f"Compute {a} - {b} + {c}.",
                     f"Solve for x: {b}*x + {c} = {a}", f"What is the greatest common divisor of {a} and {b}?",
                     f"Simplify the fraction {b}/{a}.", f"What is {b} to the power of 3?",
                     f"Find the least common multiple of {b} and {c}."])


def _reasoning(r: random.Random) -> str:
    x, y = r.sample(NAMES, 2)
    w = r.sample(WORDS, 4)
    return r.choice([
        f"A very special island is inhabited only by knights and knaves. {x} says: '{y} is a knave.' Who is a knight?",
        f"Sort these words in alphabetical order: {', '.join(w)}",
        f"How many times does the letter 'e' appear in the text: '{' '.join(w)}'?",
        f"If {x} is taller than {y} and {y} is taller than Zed, who is the shortest?",
        f"Spell the word '{w[0]}' backward.",
        f"Given the premises P implies Q and Q implies R, and P is true, what can we conclude about R? {x} asks."])


def _conversation(r: random.Random) -> str:
    a, b = r.sample(CHAT, 2)
    return r.choice([a, f"{a} {b}", f"{r.choice(['hi', 'hello', 'hey there'])}! {a}"])


def _knowledge(r: random.Random) -> str:
    country, capital = r.choice(COUNTRIES)
    return r.choice([f"The capital of {country} is {capital}.",
                     f"{country}: population, climate, and economy overview.",
                     f"What is the official language of {country}?",
                     f"{capital} is the largest city of {country} and its administrative center.",
                     f"Definition of '{r.choice(WORDS)}': a noun referring to a common object.",
                     f"Geography of {country}: location, area, terrain and natural resources."])


def _code(r: random.Random) -> str:
    f, g = r.sample(FUNCS, 2)
    return r.choice([f"def {f}(items):\n    return [x for x in items if x]",
                     f"Write a Python function {f}(path) that returns the lines of a file.",
                     f"import os\n\ndef {f}(root):\n    for name in os.listdir(root):\n        yield name",
                     f"class {f.title().replace('_', '')}:\n    def __init__(self):\n        self.{g} = None",
                     f"def {f}(data: dict) -> str:\n    \"\"\"Call {g} on data.\"\"\"\n    return {g}(data)"])


GENERATORS = {"math": _math, "reasoning": _reasoning, "conversation": _conversation,
              "knowledge": _knowledge, "code": _code}

# Realistic prompts that are NOT produced by the templates above.
HELD_OUT = {
    "math": "What is 17 times 23, minus 45?",
    "reasoning": "On an island of knights and knaves, Grace says 'Bob and I are both knaves.' "
                 "Which of them is a knight?",
    "conversation": "hello! how was your weekend? mine was so nice",
    "knowledge": "Norway: the capital is Oslo; the climate is temperate along the coast.",
    "code": "def add(a, b):\n    return a + b",
}


def make_examples(n_per_domain: int, seed: int) -> list[tuple[str, str]]:
    """``n_per_domain`` (prompt, domain) pairs per domain, interleaved."""
    r = random.Random(seed)
    return [(GENERATORS[d](r), d) for _ in range(n_per_domain) for d in GENERATORS]
