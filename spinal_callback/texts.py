"""Built-in neutral text: plain English the run does not train on, for the neutral probe.

A DPO run trains on its preference pairs; how much the model changes on text outside them tells
learning from damage. These sentences cover everyday topics in plain prose, with no instruction,
question or reply in them, so no preference data set is likely to contain them. Pass
``neutral_texts=`` to the callbacks for a model of another language or domain.
"""

from __future__ import annotations

DEFAULT_NEUTRAL_TEXTS = (
    "The bakery on the corner opens at six, and by seven there is a queue for the bread.",
    "Most of the rain that falls on the hills runs into the river within a few days.",
    "The library moved its old newspapers to the basement when the new wing was built.",
    "A train left the station a little late, but it reached the coast on time.",
    "In the autumn the leaves of the maple turn red before they fall to the ground.",
    "The village school has two classrooms, a small garden and a field for football.",
    "Her grandfather kept bees behind the house and sold the honey at the market.",
    "The bridge was closed for repairs, so the buses took the long road through town.",
    "Cats often sleep for most of the day and hunt in the early morning or at dusk.",
    "The museum's new exhibition shows tools that farmers used two hundred years ago.",
    "When the tide goes out, children search the rocks for crabs and small fish.",
    "The factory made bicycles until the nineteen seventies, when it became a warehouse.",
    "Snow covered the roads overnight, and the first cars moved slowly down the hill.",
    "The orchestra practised the symphony for three weeks before the first concert.",
    "Wheat is harvested in late summer, dried, and stored in tall silos near the farm.",
    "The old map showed a path through the forest that no one had walked for years.",
)
