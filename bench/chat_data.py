"""Realistic chat preference data for the real model: instructions, its own replies, degradations.

``INSTRUCTIONS`` are 212 varied user requests written for the benchmark: facts, how-to and short
writing. Each pair is rendered with the model's chat template. The **chosen** reply is the
model's own greedy reply, generated once and cached beside the checkpoint
(``chat_replies.json``); the **rejected** reply is a degraded copy of it, one of four kinds in
turn: a repetition loop, another instruction's answer, its sentences shuffled, or cut off
mid-sentence. A reply is cut after its last whole sentence that keeps prompt plus reply
within 96 tokens, and only pairs of 64 to 96 tokens are kept.

    PYTHONPATH=. python -m bench.chat_data     # generate (or load) the replies; print a summary
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import torch

FACT_TOPICS = (
    "photosynthesis", "the water cycle", "plate tectonics", "black holes", "the immune system",
    "the French Revolution", "the Roman Empire", "the printing press", "vaccines", "DNA",
    "the Moon's phases", "ocean tides", "volcanoes", "the greenhouse effect", "the Great Wall "
    "of China", "the Amazon rainforest", "the Silk Road", "electric current", "magnetism",
    "the speed of light", "gravity", "earthquakes", "the human heart", "honey bees",
    "the Industrial Revolution", "the Renaissance", "the Sahara desert", "coral reefs",
    "the periodic table", "the Pyramids of Giza", "antibiotics", "solar panels", "rainbows",
    "the Olympic Games", "the internet", "the stock market", "inflation", "democracy",
    "the Milky Way", "glaciers", "the Nile river", "dinosaurs", "the seasons", "clouds",
    "the human brain", "nuclear energy", "the Eiffel Tower", "the piano", "coffee", "chess",
    "the compass", "the telescope", "penguins", "the Arctic", "wind power", "bread yeast",
    "the alphabet", "paper money", "lightning", "the rainforest canopy", "tea", "bicycles",
    "the moon landing", "hurricanes", "sleep", "the calendar", "salt", "the lungs",
    "electric cars", "recycling", "owls", "the Pacific Ocean",
)  # fmt: skip
FACT_TEMPLATES = (
    "What is {}? Answer in a few sentences.",
    "Explain {} to a ten-year-old.",
    "Give me three interesting facts about {}.",
    "Why does {} matter? Keep it short.",
)
HOW_TO_TASKS = (
    "boil an egg", "write a good email to a teacher", "start running as a beginner",
    "learn a new language", "keep a houseplant alive", "save money each month",
    "prepare for a job interview", "make a cup of tea", "clean a laptop keyboard",
    "plan a birthday party", "study for an exam", "fix a flat bicycle tyre", "bake bread",
    "fall asleep faster", "organise a small closet", "write a short story", "take better photos "
    "with a phone", "make a budget", "learn to swim", "plant tomatoes", "read more books",
    "stay focused while working from home", "make a paper airplane", "cook rice",
    "memorise a speech", "choose a good password", "back up files on a computer",
    "wash a wool sweater", "start a journal", "make new friends in a new city",
    "train a puppy to sit", "reduce stress", "write a thank-you note", "paint a room",
    "prepare a healthy lunch", "learn to juggle", "give a short presentation",
    "keep a conversation going", "make pancakes", "change a light bulb safely", "pack a "
    "suitcase", "start learning to code", "care for a cat", "make a simple salad",
    "improve handwriting", "wake up earlier", "set goals for the year", "sharpen a kitchen "
    "knife", "grow herbs on a windowsill", "plan a road trip", "stop procrastinating",
    "learn to play the guitar", "make lemonade", "clean a bathroom quickly",
    "write a simple resume", "meditate for five minutes", "teach a child to ride a bike",
    "brew coffee without a machine", "prepare for a long hike", "remove a coffee stain",
    "make a to-do list that works", "store fresh vegetables", "calm down before an exam",
    "apologise to a friend", "say no politely", "draw a simple portrait", "fold a shirt "
    "neatly", "learn to type faster", "keep a room warm in winter", "make a smoothie",
)  # fmt: skip
HOW_TO_TEMPLATES = ("How do I {}?", "Give me simple steps to {}.", "What is the best way to {}?")
WRITING_TASKS = (
    "a short poem about the sea", "a haiku about autumn leaves", "a two-sentence horror story",
    "a short thank-you message to a neighbour", "a product description for a blue water "
    "bottle", "a limerick about a cat", "a short motivational message for a friend",
    "an invitation to a picnic on Saturday", "a tweet announcing a new bakery",
    "a short bedtime story about a brave mouse", "a slogan for a recycling campaign",
    "a polite complaint about a late delivery", "a short speech for a friend's wedding",
    "a description of a quiet morning in a village", "a riddle about time",
    "a short dialogue between a robot and a child", "a postcard from a trip to the mountains",
    "a paragraph about why reading matters", "a short review of a favourite book",
    "a note asking a colleague for help", "a poem about the city at night",
    "a short fable with a moral", "an opening line for a mystery novel",
    "a short welcome message for new club members", "a story about a lost umbrella",
    "a short letter to your future self", "a weather report for a sunny day",
    "a description of a busy market", "a short advertisement for a bicycle shop",
    "a cheerful birthday message", "a short apology for missing a meeting",
    "a poem about friendship", "a short news headline about a new park",
    "a story that starts with a knock at the door", "a short toast for a retirement party",
    "a few lines about the smell of rain", "a short song chorus about summer",
    "a message cancelling a dinner reservation", "a short tribute to a great teacher",
    "a description of a dragon", "a paragraph describing a winter forest",
    "a short pep talk before a football match", "a list of tips written as a short poem",
    "a story about a talking tree", "a short message welcoming spring",
    "a description of your ideal weekend", "a short scene set on a train",
    "a note reminding a roommate to water the plants", "a short fairy tale ending",
    "a diary entry from a sailor", "a short description of a sunrise over the desert",
    "a letter from a cat to its owner", "a short story about a robot learning to cook",
    "a farewell message to a coworker", "a short motivational quote about learning",
    "a poem about a rainy Monday", "a menu description for a tomato soup",
    "a short ghost story for children", "a paragraph about the joy of cooking",
    "a short scene in a library", "a limerick about a forgetful wizard",
    "a short letter to a pen pal", "an encouraging note to a student",
    "a poem about stars", "a short introduction of yourself for a class",
    "a short story about a kite", "a description of an old lighthouse",
    "a riddle about the moon", "a short blessing for a new home", "a story about a lost key",
)  # fmt: skip
WRITING_TEMPLATES = ("Write {}.", "Please write {}.", "Compose {}, please.")

CACHE_NAME = "chat_replies.json"
MAX_NEW_TOKENS = 160
PAIR_TOKENS = (64, 96)
DEGRADATIONS = ("repetition", "other_answer", "shuffled", "cut_off")


def _render(topics: tuple[str, ...], templates: tuple[str, ...]) -> list[str]:
    return [templates[index % len(templates)].format(t) for index, t in enumerate(topics)]


INSTRUCTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(
        _render(FACT_TOPICS, FACT_TEMPLATES)
        + _render(HOW_TO_TASKS, HOW_TO_TEMPLATES)
        + _render(WRITING_TASKS, WRITING_TEMPLATES)
    )
)


def chat_prompt(tokenizer: Any, instruction: str) -> str:
    """``instruction`` as a user turn in the model's chat template, ready for the reply."""
    messages = [{"role": "user", "content": instruction}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def greedy_replies(model: Any, tokenizer: Any, prompts: list[str], batch: int = 16) -> list[str]:
    """The model's greedy reply (at most ``MAX_NEW_TOKENS``, special tokens dropped) to each of
    ``prompts``, generated in left-padded batches."""
    tokenizer.padding_side = "left"
    replies: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # fmt: skip
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[:, encoded["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return replies


def cached_replies(checkpoint: Path) -> dict[str, str]:
    """Greedy replies to every instruction, generated once and cached beside ``checkpoint``;
    regenerated when the instructions or the generation length changed."""
    path = checkpoint / CACHE_NAME
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("max_new_tokens") == MAX_NEW_TOKENS and set(stored["replies"]) == set(
            INSTRUCTIONS
        ):
            return dict(stored["replies"])
    from spinal_callback.probe.loading import load_local_model, load_local_tokenizer

    tokenizer = load_local_tokenizer(str(checkpoint))
    model = load_local_model(str(checkpoint))
    prompts = [chat_prompt(tokenizer, i) for i in INSTRUCTIONS]
    replies = dict(zip(INSTRUCTIONS, greedy_replies(model, tokenizer, prompts), strict=True))
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"max_new_tokens": MAX_NEW_TOKENS, "replies": replies}))
    partial.replace(path)
    return replies


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def degrade(reply: str, kind: str, other: str, rng: random.Random) -> str:
    """A worse reply than ``reply``: ``kind`` is one of ``DEGRADATIONS`` (``other`` is another
    instruction's answer)."""
    words = reply.split()
    if kind == "repetition":
        loop = " ".join(words[: max(4, min(10, len(words) // 4))])
        return " ".join([loop] * max(2, len(words) // max(1, len(loop.split()))))
    if kind == "other_answer":
        return other
    if kind == "shuffled":
        parts = sentences(reply)
        if len(parts) < 3:
            parts = list(words)
        for _ in range(10):
            shuffled = rng.sample(parts, len(parts))
            if shuffled != parts:
                return " ".join(shuffled)
        return " ".join(reversed(parts))
    cut = rng.randint(max(2, len(words) * 2 // 5), max(3, len(words) * 3 // 5))
    return " ".join(words[:cut])


def fitted(tokenizer: Any, prompt: str, reply: str) -> str:
    """``reply`` cut after its last whole sentence that keeps prompt + reply within
    ``PAIR_TOKENS[1]`` tokens (the whole reply when it fits; CPU time is the limit here)."""
    parts = sentences(reply)
    while len(parts) > 1:
        text = " ".join(parts)
        if len(tokenizer(prompt + text, add_special_tokens=False)["input_ids"]) <= PAIR_TOKENS[1]:
            return text
        parts.pop()
    return " ".join(parts)


def chat_pairs(tokenizer: Any, replies: dict[str, str], seed: int) -> list[dict[str, str]]:
    """One pair per instruction whose prompt + chosen reply is 64-96 tokens, in a seeded order:
    prompt in the chat template, chosen = the model's reply (``fitted``), rejected = a
    degradation of it."""
    rng = random.Random(seed)
    order = list(INSTRUCTIONS)
    rng.shuffle(order)
    pairs = []
    for index, instruction in enumerate(order):
        prompt = chat_prompt(tokenizer, instruction)
        reply = fitted(tokenizer, prompt, replies[instruction])
        length = len(tokenizer(prompt + reply, add_special_tokens=False)["input_ids"])
        if not (PAIR_TOKENS[0] <= length <= PAIR_TOKENS[1]) or len(reply.split()) < 8:
            continue
        other = replies[order[(index + 7) % len(order)]]
        kind = DEGRADATIONS[index % len(DEGRADATIONS)]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": " " + reply,
                "rejected": " " + degrade(reply, kind, other, rng),
            }
        )
    return pairs


def chat_split(
    checkpoint: Path, tokenizer: Any, held_out: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training pairs and ``held_out`` pairs of other instructions."""
    pairs = chat_pairs(tokenizer, cached_replies(checkpoint), seed)
    if len(pairs) <= held_out:
        raise ValueError(f"only {len(pairs)} chat pairs of 64-96 tokens; ask for fewer held out")
    return pairs[held_out:], pairs[:held_out]


def main() -> int:
    from recipes.smollm2 import checkpoint_dir
    from spinal_callback.probe.loading import load_local_tokenizer

    checkpoint = checkpoint_dir()
    tokenizer = load_local_tokenizer(str(checkpoint))
    pairs = chat_pairs(tokenizer, cached_replies(checkpoint), seed=0)
    lengths = [len(tokenizer(p["prompt"] + p["chosen"])["input_ids"]) for p in pairs]
    print(f"{len(INSTRUCTIONS)} instructions, {len(pairs)} pairs of 64-96 tokens "
          f"(median {sorted(lengths)[len(lengths) // 2]})")  # fmt: skip
    for pair in pairs[:4]:
        print(json.dumps(pair, indent=1)[:1200])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
