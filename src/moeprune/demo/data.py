"""Synthetic training and held-out data for the demo model.

Two kinds of examples, both rendered as chat turns:

* multiple-choice questions in the exact prompt shape of lm-eval's ``gpqa_diamond_cot_zeroshot``
  (question, choices (A)-(D), "Let's think step by step: "), answered with a short thought and
  "The answer is (X).". Every question is decided by a rule over the numbers shown (the only
  even one, the only odd one, the only one above 50, the only one below 50), so held-out
  questions are answerable without memorised facts;
* short general replies per calibration domain (math, logic, code, science, creative), so that
  calibration prompts get sensible-ish continuations and the experts see varied text.

Everything is a pure function of a ``random.Random`` seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

LETTERS = "ABCD"

# lm-eval's gpqa_diamond_cot_zeroshot doc_to_text, verbatim (note: no space after the colon).
GPQA_PROMPT_TEMPLATE = (
    "What is the correct answer to this question:{question}\nChoices:\n"
    "(A) {c1}\n(B) {c2}\n(C) {c3}\n(D) {c4}\nLet's think step by step: "
)

QUESTION_KINDS = ("even", "odd", "above", "below")
_QUESTION_TEXT = {
    "even": "Which of these numbers is even?",
    "odd": "Which of these numbers is odd?",
    "above": "Which of these numbers is greater than 50?",
    "below": "Which of these numbers is less than 50?",
}


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question; ``choices`` are in display order (A, B, C, D)."""

    kind: str
    choices: tuple[int, int, int, int]
    answer_index: int

    @property
    def question(self) -> str:
        return _QUESTION_TEXT[self.kind]

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        """Identity of the question irrespective of the order of its choices."""
        return (self.kind, tuple(sorted(self.choices)))

    def prompt(self) -> str:
        """The user message, exactly as gpqa_diamond_cot_zeroshot renders it."""
        c1, c2, c3, c4 = (str(c) for c in self.choices)
        return GPQA_PROMPT_TEMPLATE.format(question=self.question, c1=c1, c2=c2, c3=c3, c4=c4)

    def thought(self) -> str:
        """Step-by-step check of each choice (about 20 tokens, under the demo's 64-token budget).

        Judging every choice on its own line keeps each step local (one digit decides it), which
        a small model learns far faster than picking the answer in a single step.
        """
        verdicts = []
        for letter, value in zip(LETTERS, self.choices, strict=True):
            if self.kind in ("even", "odd"):
                verdict = "even" if value % 2 == 0 else "odd"
            else:
                verdict = "above 50" if value > 50 else "below 50"
            verdicts.append(f"({letter}) {value} is {verdict}.")
        return " ".join(verdicts)

    def reply(self, with_steps: bool = False) -> str:
        """Visible answer; both lm-eval filters (strict-match and flexible-extract) read it.

        ``with_steps`` prefixes the step-by-step check, for replies given without a thinking channel.
        """
        value = self.choices[self.answer_index]
        answer = f"{value} is choice ({self.answer_letter}). The answer is ({self.answer_letter})."
        return f"{self.thought()} {answer}" if with_steps else answer

    def to_lm_eval_doc(self) -> dict[str, str | list[str]]:
        """Row of the demo_mcq dataset (field names follow gpqa's processed docs)."""
        choices = [str(c) for c in self.choices]
        return {
            "Question": self.question,
            "choice1": choices[0],
            "choice2": choices[1],
            "choice3": choices[2],
            "choice4": choices[3],
            "choices": choices,
            "answer": f"({self.answer_letter})",
            "kind": self.kind,
        }


def random_mcq(rng: random.Random, kind: str | None = None) -> MCQ:
    """Draw one question: four distinct two-digit numbers of which exactly one has the property."""
    kind = kind or rng.choice(QUESTION_KINDS)
    numbers = range(10, 100)
    has_property = {
        "even": lambda n: n % 2 == 0,
        "odd": lambda n: n % 2 == 1,
        "above": lambda n: n > 50,
        "below": lambda n: n < 50,
    }[kind]
    # 50 itself is neither above nor below 50: keep it out of both pools of those questions.
    pool_yes = [n for n in numbers if has_property(n) and n != 50]
    pool_no = [n for n in numbers if not has_property(n) and n != 50]
    target = rng.choice(pool_yes)
    values = [target, *rng.sample(pool_no, 3)]
    rng.shuffle(values)
    return MCQ(kind=kind, choices=tuple(values), answer_index=values.index(target))  # type: ignore[arg-type]


def heldout_mcqs(count: int, seed: int) -> list[MCQ]:
    """``count`` distinct questions, the same number of each kind, in a fixed order."""
    rng = random.Random(f"demo-heldout-{seed}")
    seen: set[tuple[str, tuple[int, ...]]] = set()
    out: list[MCQ] = []
    per_kind = count // len(QUESTION_KINDS)
    for kind in QUESTION_KINDS:
        made = 0
        while made < per_kind:
            q = random_mcq(rng, kind)
            if q.key not in seen:
                seen.add(q.key)
                out.append(q)
                made += 1
    rng.shuffle(out)
    return out


def training_mcqs(rng: random.Random, exclude: set[tuple[str, tuple[int, ...]]]) -> Iterator[MCQ]:
    """Endless stream of questions that never repeat a held-out question (in any choice order)."""
    while True:
        q = random_mcq(rng)
        if q.key not in exclude:
            yield q


# ---------------------------------------------------------------------------------------------
# General text per calibration domain: (user prompt, thought, reply) triples from small grammars.

_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lena"]
_ANIMALS = ["cats", "dogs", "birds", "foxes", "owls", "whales", "bees", "frogs"]
_CLASSES = ["animals", "mammals", "living things", "hunters", "swimmers", "creatures"]
_FUNCS = [
    ("add", "sum", "+"),
    ("subtract", "difference", "-"),
    ("multiply", "product", "*"),
]
_SCIENCE = [
    ("Why is the sky blue?",
     "Sunlight scatters off air molecules, and blue light scatters the most.",
     "The sky looks blue because air scatters short blue wavelengths of sunlight more than red ones."),
    ("Why does ice float on water?",
     "Ice is less dense than liquid water.",
     "Ice floats because water expands when it freezes, so ice is less dense than the water around it."),
    ("What do plants need to make food?",
     "Photosynthesis uses light, water and carbon dioxide.",
     "Plants use sunlight, water and carbon dioxide to make sugar, and they release oxygen."),
    ("Why do we have seasons?",
     "The axis of the Earth is tilted.",
     "Seasons happen because the tilted axis of the Earth changes how directly sunlight hits each half."),
    ("What is an atom made of?",
     "Protons, neutrons and electrons.",
     "An atom has a nucleus of protons and neutrons, with electrons moving around it."),
    ("Why does a metal spoon feel cold?",
     "Metal conducts heat well.",
     "A metal spoon feels cold because it carries heat away from your hand quickly."),
    ("What makes a rainbow?",
     "Raindrops bend and split sunlight.",
     "A rainbow forms when raindrops bend sunlight and split it into its colors."),
    ("Why does the moon change shape?",
     "We see different parts of its lit side.",
     "The moon seems to change shape because we see different amounts of its sunlit half as it orbits."),
]
_TOPICS = ["the sea", "the moon", "a quiet forest", "the first snow", "an old city", "a small robot",
           "the morning sun", "a lost key", "the river", "a paper boat"]
_ADJ = ["silver", "gentle", "quiet", "bright", "cold", "golden", "soft", "deep"]
_VERBS = ["sings", "waits", "drifts", "shines", "sleeps", "wanders", "glows", "listens"]


def _math_example(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    form = rng.randrange(4)
    if form == 0:
        return (f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"{a} times {b} is {a * b}.")
    if form == 1:
        c = rng.randint(1, 30)
        return (f"Solve for x: x + {c} = {c + a * b}.", f"Subtract {c} from both sides.",
                f"x = {a * b}, because {a * b} + {c} = {c + a * b}.")
    if form == 2:
        return (f"What is {a * 10 + b} plus {b * 3}?", f"Add {b * 3} to {a * 10 + b}.",
                f"{a * 10 + b} plus {b * 3} is {a * 10 + b + b * 3}.")
    return (f"A box holds {a} rows of {b} eggs. How many eggs are there?", f"There are {a} rows of {b}.",
            f"There are {a} times {b}, which is {a * b} eggs.")


def _logic_example(rng: random.Random) -> tuple[str, str, str]:
    x, y = rng.sample(_ANIMALS, 1)[0], rng.choice(_CLASSES)
    name = rng.choice(_NAMES)
    form = rng.randrange(3)
    if form == 0:
        return (f"All {x} are {y}. {name} is one of the {x}. Is {name} one of the {y}?",
                f"Every one of the {x} is one of the {y}.",
                f"Yes. Since all {x} are {y} and {name} is one of the {x}, {name} is one of the {y}.")
    if form == 1:
        p, q, r = rng.sample(_NAMES, 3)
        return (f"{p} is taller than {q}, and {q} is taller than {r}. Who is the tallest?",
                f"{p} is taller than {q}, who is taller than {r}.",
                f"{p} is the tallest, because height order is {p}, then {q}, then {r}.")
    p, q = rng.sample(_NAMES, 2)
    return (f"If it rains, {p} takes an umbrella. It is raining. What does {p} do?",
            "The rule applies because it is raining.",
            f"{p} takes an umbrella, since the condition of the rule is true.")


def _code_example(rng: random.Random) -> tuple[str, str, str]:
    verb, noun, sym = rng.choice(_FUNCS)
    form = rng.randrange(3)
    if form == 0:
        return (f"Write a Python function that returns the {noun} of two numbers.",
                f"The function takes a and b and returns a {sym} b.",
                f"def {verb}(a, b):\n    return a {sym} b")
    if form == 1:
        n = rng.randint(3, 9)
        return (f"Write a Python loop that prints the numbers from 1 to {n}.",
                "Use range with an end one past the last number.",
                f"for i in range(1, {n + 1}):\n    print(i)")
    name = rng.choice(["items", "values", "scores", "names"])
    return (f"How do I get the length of a list called {name} in Python?",
            "The built-in len works on lists.",
            f"Use len({name}). It returns the number of elements in the list.")


def _science_example(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_SCIENCE)


def _creative_example(rng: random.Random) -> tuple[str, str, str]:
    topic = rng.choice(_TOPICS)
    a1, a2 = rng.sample(_ADJ, 2)
    v1, v2 = rng.sample(_VERBS, 2)
    if rng.randrange(2) == 0:
        return (f"Write a short poem about {topic}.", f"A calm poem with {a1} images.",
                f"Over {topic} the {a1} light {v1},\nand every {a2} shadow {v2}.")
    name = rng.choice(_NAMES)
    return (f"Write the opening line of a story about {topic}.", f"Start with {name} and {topic}.",
            f"{name} had always wondered about {topic}, until one {a1} evening it {v1} back.")


DOMAIN_GENERATORS = {
    "math": _math_example,
    "logic": _logic_example,
    "code": _code_example,
    "science": _science_example,
    "creative": _creative_example,
}


def general_example(rng: random.Random) -> tuple[str, str, str, str]:
    """(domain, user prompt, thought, reply) from one of the calibration domains."""
    domain = rng.choice(sorted(DOMAIN_GENERATORS))
    prompt, thought, reply = DOMAIN_GENERATORS[domain](rng)
    return domain, prompt, thought, reply


def tokenizer_corpus(seed: int, num_mcq: int = 3000, num_general: int = 3000) -> list[str]:
    """Text the BPE merges are learned from: the same distribution the model is trained on."""
    rng = random.Random(f"demo-tokenizer-{seed}")
    lines: list[str] = []
    for _ in range(num_mcq):
        q = random_mcq(rng)
        lines += [q.prompt(), q.reply(with_steps=True)]
    for _ in range(num_general):
        _, prompt, thought, reply = general_example(rng)
        lines += [prompt, thought, reply]
    # Role names and the thought channel name follow a control token in every conversation.
    lines += ["system\nuser\nmodel\nthought\nYou are a helpful assistant."] * 200
    return lines
