"""Twelve synthetic task domains for tuning: deterministic splits, answers computed from the input.

Each domain turns a random draw into (document + question, answer). The answer is always computable
from the prompt — an extraction, a classification by a rule stated in or implied by the text, or a
small calculation — and scored by exact match after normalisation (`evals.suite.normalise`). Splits
are drawn from one seeded generator and are disjoint by prompt, so validation and test never repeat
a training prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from loraforge.errors import ConfigError
from loraforge.evals.suite import normalise

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea"]
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Tokyo", "Oslo", "Lima", "Cairo", "Dublin"]


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str

    def passes(self, output: str) -> bool:
        return normalise(output) == normalise(self.answer)


Generator = Callable[[random.Random], Task]


def _financial(r: random.Random) -> Task:
    qty, price, fee = r.randint(2, 5), r.randint(2, 9), r.randint(1, 9)
    return Task(f"Invoice: {qty} units at {price} dollars each, plus a {fee} dollar fee. What is the total in "
                f"dollars?", str(qty * price + fee))


def _legal(r: random.Random) -> Task:
    start, notice = r.randint(1, 15), r.randint(2, 14)
    party = r.choice(NAMES)
    return Task(f"Contract: {party} gives notice on day {start} of the month; the notice period is {notice} "
                f"days. On which day of the month does the contract end?", str(start + notice))


def _medical(r: random.Random) -> Task:
    tablets, times = r.randint(1, 3), r.randint(2, 4)
    patient, drug = r.choice(NAMES), r.choice(["aspirin", "ibuprofen", "amoxicillin", "paracetamol"])
    return Task(f"Prescription for {patient}: {drug}, {tablets} tablets, {times} times a day. How many tablets "
                f"per day?", str(tablets * times))


_STATUS = {"S": "shipped", "D": "delivered", "R": "returned", "P": "pending", "C": "cancelled"}


def _ecommerce(r: random.Random) -> Task:
    code = r.choice(sorted(_STATUS))
    order = r.randint(100, 999)
    return Task(f"Order {order} has status code {code}. Codes: S shipped, D delivered, R returned, P pending, "
                f"C cancelled. What is the status of order {order}?", _STATUS[code])


def _real_estate(r: random.Random) -> Task:
    rooms, baths, city = r.randint(1, 6), r.randint(1, 3), r.choice(CITIES)
    ask = r.choice(["rooms", "bathrooms", "city"])
    answer = {"rooms": str(rooms), "bathrooms": str(baths), "city": city}[ask]
    question = {"rooms": "How many rooms does it have?", "bathrooms": "How many bathrooms does it have?",
                "city": "In which city is it?"}[ask]
    return Task(f"Listing: apartment in {city} with {rooms} rooms and {baths} bathrooms. {question}", answer)


_TICKETS = {"billing": ["invoice", "charge", "refund", "payment"], "technical": ["crash", "error", "bug", "login"],
            "account": ["password", "email", "username", "profile"]}


def _support(r: random.Random) -> Task:
    label = r.choice(sorted(_TICKETS))
    word = r.choice(_TICKETS[label])
    who, channel = r.choice(NAMES), r.choice(["email", "chat", "phone", "the app"])
    return Task(f"Ticket from {who} via {channel}: I have a problem with my {word}. Classify the ticket as billing, "
                f"technical or account.", label)


_TONE = {"positive": ["great", "lovely", "excellent", "perfect", "fantastic", "good"],
         "negative": ["bad", "terrible", "awful", "broken", "useless", "poor"]}


def _marketing(r: random.Random) -> Task:
    label = r.choice(sorted(_TONE))
    word = r.choice(_TONE[label])
    product = r.choice(["phone", "lamp", "bike", "chair", "kettle", "desk", "camera", "watch"])
    return Task(f"Review by {r.choice(NAMES)}: the {product} is {word}. Is the review positive or negative?", label)


def _code_review(r: random.Random) -> Task:
    names = r.sample(["a", "b", "c", "d", "e", "f"], r.randint(1, 5))
    return Task(f"Code: def f({', '.join(names)}): pass. How many parameters does f take?", str(len(names)))


def _hr(r: random.Random) -> Task:
    days, hours = r.randint(2, 5), r.randint(2, 5)
    who = r.choice(NAMES)
    return Task(f"Timesheet: {who} worked {days} days of {hours} hours. How many hours in total?", str(days * hours))


def _supply_chain(r: random.Random) -> Task:
    stock = r.randint(5, 20)
    shipped = r.randint(1, stock)
    city = r.choice(CITIES)
    return Task(f"Warehouse {city}: {stock} boxes in stock, {shipped} boxes shipped. How many boxes remain?",
                str(stock - shipped))


def _insurance(r: random.Random) -> Task:
    claim = r.randint(5, 20)
    deductible = r.randint(1, claim)
    return Task(f"Claim: damage of {claim} hundred dollars, deductible of {deductible} hundred dollars. How many "
                f"hundred dollars are paid out?", str(claim - deductible))


def _education(r: random.Random) -> Task:
    a, b = r.sample(NAMES, 2)
    sa, sb = r.sample(range(1, 11), 2)
    return Task(f"Scores: {a} got {sa}, {b} got {sb}. Who got the higher score?", a if sa > sb else b)


DOMAINS: dict[str, Generator] = {
    "financial": _financial, "legal": _legal, "medical": _medical, "e-commerce": _ecommerce,
    "real-estate": _real_estate, "customer-support": _support, "marketing": _marketing,
    "code-review": _code_review, "hr": _hr, "supply-chain": _supply_chain, "insurance": _insurance,
    "education": _education,
}


def splits(domain: str, seed: int = 0, *, train: int = 64, validation: int = 32,
           test: int = 32) -> dict[str, list[Task]]:
    """Deterministic, prompt-disjoint train/validation/test splits of one domain."""
    if domain not in DOMAINS:
        raise KeyError(domain)
    rng = random.Random(f"{domain}:{seed}")
    wanted = train + validation + test
    seen: set[str] = set()
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < wanted:
        attempts += 1
        if attempts > wanted * 200:
            raise ConfigError(f"domain {domain} has fewer than {wanted} distinct tasks: lower train_size, "
                              f"validation_size or test_size (they add up to {wanted})", field="train_size")
        task = DOMAINS[domain](rng)
        if task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
    return {"train": tasks[:train], "validation": tasks[train:train + validation], "test": tasks[train + validation:]}


def accuracy(tasks: list[Task], outputs: list[str]) -> float:
    if len(tasks) != len(outputs):
        raise ValueError("one output per task")
    return sum(t.passes(o) for t, o in zip(tasks, outputs)) / len(tasks) if tasks else 0.0
