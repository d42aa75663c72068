"""The instruction template the recommender is tuned on (BIGRec style, kept short).

The bundle stores the rendered `prompt` and `completion` of every sample, so this
module is only used when a bundle is built and when a catalog title must be put in
the same form as a completion (grounding, title scoring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """How a user's history and the next item become prompt and completion texts.

    name: recorded in the bundle's meta.json so a bundle says how it was rendered.
    instruction: the task sentence, in the domain's words.
    """

    name: str
    instruction: str

    def prompt(self, history_titles: Sequence[str]) -> str:
        watched = ", ".join(f'"{title}"' for title in history_titles)
        return f"### Instruction:\n{self.instruction}\n### Input:\n{watched}\n### Response:\n"

    @staticmethod
    def completion(title: str) -> str:
        """The exact text the model learns to emit for an item (also what grounding embeds)."""
        return f'"{title}"'

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "instruction": self.instruction,
            "prompt": self.prompt(["<title 1>", "<title 2>"]),
            "completion": self.completion("<title>"),
        }

    @classmethod
    def from_description(cls, described: dict[str, str]) -> PromptTemplate:
        """The template a bundle's meta.json describes; refused unless this code renders
        its example prompt and completion exactly as recorded (the layout is code, not data)."""
        template = cls(name=described["name"], instruction=described["instruction"])
        if template.describe() != described:
            raise ValueError(f"template '{template.name}' is not rendered by this code's layout")
        return template


MOVIES = PromptTemplate(
    name="bigrec-movies-v1",
    instruction=(
        "Given the movies a user watched, in order, recommend the next movie they will watch."
    ),
)
