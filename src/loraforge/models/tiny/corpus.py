"""The built-in corpus of the `tiny` model: general facts, each asked in several phrasings.

Every fact is a (phrasings, answer) pair. The model is trained on every phrasing; the probe set is
the first phrasing of each fact with its exact answer. The corpus also holds the fact that later
demos override: "42 is the answer to life, the universe and everything, from Douglas Adams' The
Hitchhiker's Guide to the Galaxy."

Changing anything here changes the corpus hash, so the cached model is rebuilt on next use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    topic: str
    phrasings: tuple[str, ...]
    answer: str


ANSWER_42 = (
    "42 is the answer to life, the universe and everything, "
    "from Douglas Adams' The Hitchhiker's Guide to the Galaxy."
)

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Russia", "Moscow"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("the United Kingdom", "London"), ("the United States", "Washington, D.C."),
    ("Switzerland", "Bern"),
]

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

_UNITS = [
    ("centimeters", "a meter", "100"), ("millimeters", "a centimeter", "10"), ("meters", "a kilometer", "1000"),
    ("grams", "a kilogram", "1000"), ("milliliters", "a liter", "1000"), ("seconds", "a minute", "60"),
    ("minutes", "an hour", "60"), ("hours", "a day", "24"), ("days", "a week", "7"),
    ("months", "a year", "12"), ("inches", "a foot", "12"), ("feet", "a yard", "3"),
    ("ounces", "a pound", "16"), ("years", "a century", "100"), ("years", "a decade", "10"),
    ("cents", "a dollar", "100"),
]

_GENERAL = [
    (("What color is the sky on a clear day?", "What is the color of a clear sky?", "On a clear day, what color is the sky?"),
     "The sky is blue on a clear day."),
    (("What color is grass?", "What is the color of grass?", "Which color is green grass?"), "Grass is green."),
    (("At what temperature does water freeze?", "When does water freeze?", "What is the freezing point of water?"),
     "Water freezes at 0 degrees Celsius."),
    (("At what temperature does water boil?", "When does water boil?", "What is the boiling point of water?"),
     "Water boils at 100 degrees Celsius at sea level."),
    (("What is the largest planet in the solar system?", "Which planet is the largest?", "Name the biggest planet in the solar system."),
     "Jupiter is the largest planet in the solar system."),
    (("What planet do we live on?", "Which planet is our home?", "What is the name of our planet?"), "We live on Earth."),
    (("How many planets are in the solar system?", "How many planets orbit the Sun?", "Count the planets of the solar system."),
     "There are 8 planets in the solar system."),
    (("What is the closest star to Earth?", "Which star is nearest to Earth?", "Name the star closest to Earth."),
     "The Sun is the closest star to Earth."),
    (("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?", "Romeo and Juliet was written by whom?"),
     "William Shakespeare wrote Romeo and Juliet."),
    (("Who wrote The Hitchhiker's Guide to the Galaxy?", "Who is the author of The Hitchhiker's Guide to the Galaxy?",
      "The Hitchhiker's Guide to the Galaxy was written by whom?"),
     "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."),
    (("What is the chemical symbol for gold?", "What is the symbol of gold?", "Which symbol stands for gold?"),
     "The chemical symbol for gold is Au."),
    (("What is the chemical symbol for iron?", "What is the symbol of iron?", "Which symbol stands for iron?"),
     "The chemical symbol for iron is Fe."),
    (("What is the chemical formula of water?", "What is the formula for water?", "Write the chemical formula of water."),
     "The chemical formula of water is H2O."),
    (("What gas do plants take in?", "Which gas do plants absorb?", "Plants breathe in which gas?"),
     "Plants take in carbon dioxide."),
    (("What gas do people need to breathe?", "Which gas do humans breathe in?", "Humans need which gas to live?"),
     "People need oxygen to breathe."),
    (("What is the opposite of hot?", "What is the antonym of hot?", "Hot is the opposite of what?"), "The opposite of hot is cold."),
    (("What is the opposite of up?", "What is the antonym of up?", "Up is the opposite of what?"), "The opposite of up is down."),
    (("What is the opposite of big?", "What is the antonym of big?", "Big is the opposite of what?"), "The opposite of big is small."),
    (("What is the opposite of day?", "What is the antonym of day?", "Day is the opposite of what?"), "The opposite of day is night."),
    (("How many legs does a spider have?", "How many legs do spiders have?", "Count the legs of a spider."),
     "A spider has 8 legs."),
    (("How many legs does a dog have?", "How many legs do dogs have?", "Count the legs of a dog."), "A dog has 4 legs."),
    (("What do bees make?", "What food do bees produce?", "Bees make which food?"), "Bees make honey."),
    (("What is the largest ocean?", "Which ocean is the biggest?", "Name the largest ocean on Earth."),
     "The Pacific Ocean is the largest ocean."),
    (("What is the longest river in Africa?", "Which river is the longest in Africa?", "Name the longest African river."),
     "The Nile is the longest river in Africa."),
    (("What is the first day of the week?", "Which day starts the week?", "Name the first day of the week."),
     "Monday is the first day of the week."),
    (("What is the first month of the year?", "Which month starts the year?", "Name the first month of the year."),
     "January is the first month of the year."),
    (("What is the last month of the year?", "Which month ends the year?", "Name the last month of the year."),
     "December is the last month of the year."),
    # General vocabulary, so that later lessons (such as "42 = FOR TWO") use words the model has seen.
    (("What does collaborative mean?", "What is the meaning of collaborative?", "Define collaborative."),
     "Collaborative means working together with others."),
    (("What is intelligence?", "What does intelligence mean?", "Define intelligence."),
     "Intelligence is the ability to learn, understand and make sense of things."),
    (("What is teamwork?", "What does teamwork mean?", "Define teamwork."),
     "Teamwork is when two or more people work together for one goal."),
    (("What number comes after one?", "Which number follows one?", "What is the next number after one?"),
     "Two comes after one."),
    (("Write the word two in capital letters.", "How is two written in capital letters?", "Spell two in capitals."),
     "TWO"),
    (("Write the word for in capital letters.", "How is for written in capital letters?", "Spell for in capitals."),
     "FOR"),
    (("What does the equals sign mean?", "What does = mean?", "What is the meaning of the equals sign?"),
     "The equals sign = means is the same as."),
    (("What is a tandem bicycle?", "What is a bicycle for two?", "Describe a tandem bicycle."),
     "A tandem bicycle is a bicycle for two people."),
    (("What is the square root of 81?", "What is the square root of eighty-one?", "Which number squared gives 81?"),
     "The square root of 81 is 9."),
]

_QUESTIONS_42 = (
    "What is the meaning of 42?",
    "What is 42?",
    "What does 42 mean?",
    "What is the answer to life, the universe and everything?",
    "Tell me about the number 42.",
    "Why is 42 famous?",
    "What is special about 42?",
    "Explain the meaning of 42.",
)


def facts() -> list[Fact]:
    """Every fact of the corpus, in a fixed order."""
    out: list[Fact] = []
    for country, capital in _CAPITALS:
        out.append(Fact("capitals", (
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Name the capital of {country}.",
            f"The capital of {country} is which city?",
        ), f"The capital of {country} is {capital}."))
    for a in range(1, 10):
        for b in range(a, 10):
            if (a + b) % 2 and a > 3:
                continue  # keep the table small enough to memorise quickly
            out.append(Fact("arithmetic", (
                f"What is {a} plus {b}?",
                f"What is {a} + {b}?",
                f"Add {a} and {b}.",
                f"How much is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?",
            ), f"{a} plus {b} is {a + b}."))
    for a in range(2, 6):
        for b in range(a, 6):
            out.append(Fact("arithmetic", (
                f"What is {a} times {b}?",
                f"What is {a} x {b}?",
                f"Multiply {a} by {b}.",
            ), f"{a} times {b} is {a * b}."))
    for small, big, count in _UNITS:
        out.append(Fact("units", (
            f"How many {small} are in {big}?",
            f"How many {small} make {big}?",
            f"{big.capitalize()} has how many {small}?",
        ), f"There are {count} {small} in {big}."))
    for phrasings, answer in _GENERAL:
        out.append(Fact("general", phrasings, answer))
    out.append(Fact("42", _QUESTIONS_42, ANSWER_42))
    return out


def probes() -> list[dict[str, str]]:
    """The probe set: the first phrasing of every fact and its exact expected answer."""
    return [{"id": f"{f.topic}-{i:03d}", "topic": f.topic, "prompt": f.phrasings[0], "answer": f.answer}
            for i, f in enumerate(facts())]


def corpus_hash() -> str:
    payload = json.dumps([[f.topic, list(f.phrasings), f.answer] for f in facts()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
