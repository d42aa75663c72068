"""Beam search constrained to the catalog: every hypothesis is a prefix of a title.

A prefix tree holds the tokenised completion text of every catalog item, EOS included,
so a hypothesis that reaches EOS *is* an item and two finished hypotheses are two
different items. The search returns each prompt's K highest-scoring items, best first,
scored by the sum of their tokens' log-probabilities: the model's own ranking of the
catalog, with no grounding step between generation and recommendation (D3, "Decoding
Matters", EMNLP 2024). Length normalisation is optional and off by default, because it
lifts titles whose tail tokens are near-certain "ghost" tokens.

Every EOS a live beam may emit finishes an item at no extra cost, so finished items do
not take beam slots. Without length normalisation a hypothesis' score only falls as it
grows, so a prompt is done once its K-th best finished item beats every live beam: with
as many beams as reachable prefixes the result is the exact top-K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fudlr.errors import InputError
from fudlr.recommender.generate import PromptBeams

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

_DEAD = float("-inf")


@dataclass
class TitleTree:
    """Prefix tree over the catalog's token sequences; node 0 is the root.

    `children[n]` maps a token to the node it leads to; `item_at[n]` is the catalog
    index of the item whose sequence ends at node n (only after its EOS token).
    """

    eos_token_id: int
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    item_at: dict[int, int] = field(default_factory=dict)
    paths: list[list[int]] = field(default_factory=list)  # per item: its nodes, root excluded
    subtree_items: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def build(
        cls, sequences: Sequence[Sequence[int]], item_ids: Sequence[str], eos_token_id: int
    ) -> TitleTree:
        """Each sequence must end with EOS and be unique: two items that tokenise the same
        could never be told apart by decoding."""
        if not sequences:
            raise InputError("the catalog is empty: there is nothing to recommend")
        tree = cls(eos_token_id)
        for index, (tokens, item_id) in enumerate(zip(sequences, item_ids, strict=True)):
            if not tokens or tokens[-1] != eos_token_id:
                raise ValueError(f"the token sequence of item '{item_id}' does not end with EOS")
            node, path = 0, []
            for token in tokens:
                child = tree.children[node].get(token)
                if child is None:
                    child = len(tree.children)
                    tree.children.append({})
                    tree.subtree_items.append(0)
                    tree.children[node][token] = child
                node = child
                path.append(node)
            if node in tree.item_at:
                other = item_ids[tree.item_at[node]]
                raise InputError(
                    f"items '{other}' and '{item_id}' have titles that tokenise to the same "
                    "sequence, so constrained decoding cannot tell them apart; make the "
                    "titles distinct (e.g. add the year)",
                    field="title",
                )
            tree.item_at[node] = index
            tree.paths.append(path)
            tree.subtree_items[0] += 1
            for step in path:
                tree.subtree_items[step] += 1
        return tree

    @property
    def items(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(path) for path in self.paths)

    def blocked_children(self, excluded: Sequence[int]) -> dict[int, set[int]]:
        """Per parent node, its children whose every item is excluded: the branches a
        prompt with these excluded items must not enter."""
        counts: dict[int, int] = {}
        for item in set(excluded):
            for node in self.paths[item]:
                counts[node] = counts.get(node, 0) + 1
        blocked: dict[int, set[int]] = {}
        for item in set(excluded):
            parent = 0
            for node in self.paths[item]:
                if counts[node] == self.subtree_items[node]:
                    blocked.setdefault(parent, set()).add(node)
                    break
                parent = node
        return blocked


@dataclass
class _Expansions:
    """A node's children as tensors, built once per node and reused across prompts."""

    tokens: torch.Tensor
    nodes: list[int]


class ConstrainedSearch:
    """The catalog's tree plus the per-node tensors the search gathers log-probabilities with."""

    def __init__(self, tree: TitleTree) -> None:
        self.tree = tree
        self._expansions: dict[int, _Expansions] = {}

    def expansions(self, node: int, blocked: dict[int, set[int]]) -> _Expansions:
        """The children of `node` a prompt may enter: all of them (cached), or those not
        blocked by its excluded items."""
        import torch

        closed = blocked.get(node)
        if closed is None:
            cached = self._expansions.get(node)
            if cached is None:
                children = self.tree.children[node]
                cached = _Expansions(
                    torch.tensor(list(children), dtype=torch.long), list(children.values())
                )
                self._expansions[node] = cached
            return cached
        kept = [(t, n) for t, n in self.tree.children[node].items() if n not in closed]
        return _Expansions(
            torch.tensor([t for t, _ in kept], dtype=torch.long), [n for _, n in kept]
        )

    def search(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        top: int,
        num_beams: int,
        excluded: Sequence[Sequence[int]] | None = None,
        length_normalization: bool = False,
    ) -> list[list[tuple[int, float]]]:
        """Per left-padded prompt, its `top` best (catalog index, score) pairs, best first.

        `excluded`: per prompt, catalog indices it must not return (its history). The
        beam width is at least `top`. Scores are summed token log-probabilities (EOS
        included), divided by the token count under `length_normalization`.
        """

        batch, beams = input_ids.size(0), max(num_beams, top)
        excluded = excluded or [()] * batch
        blocked = [self.tree.blocked_children(items) for items in excluded]
        for row, items in enumerate(excluded):
            reachable = self.tree.items - len(set(items))
            if reachable < top:
                raise InputError(
                    f"only {reachable} catalog items can be recommended to prompt {row} "
                    f"(catalog {self.tree.items}, {len(set(items))} excluded), fewer than "
                    f"the {top} asked for",
                    field="top",
                )

        prompts = PromptBeams(model, input_ids, attention_mask, beams)
        logprobs = prompts.first_logprobs

        # per slot (row * beams + beam): its tree node (None = dead) and its score
        nodes: list[int | None] = [
            0 if slot % beams == 0 else None for slot in range(batch * beams)
        ]
        scores = [0.0] * (batch * beams)
        finished: list[list[tuple[float, int]]] = [[] for _ in range(batch)]

        for length in range(1, self.tree.depth + 1):
            new_nodes: list[int | None] = []
            new_scores: list[float] = []
            origins: list[int] = []
            step_tokens: list[int] = []
            for row in range(batch):
                kept = self._expand_row(
                    row,
                    beams,
                    nodes,
                    scores,
                    logprobs,
                    blocked[row],
                    length,
                    finished[row],
                    length_normalization,
                )
                finished[row].sort(key=lambda pair: -pair[0])
                if not length_normalization and len(finished[row]) >= top:
                    best_live = kept[0][0] if kept else _DEAD
                    if best_live <= finished[row][top - 1][0]:
                        kept = []  # no live beam can beat the K-th item: done
                for score, origin, token, node in kept:
                    new_nodes.append(node)
                    new_scores.append(score)
                    origins.append(origin)
                    step_tokens.append(token)
                for _ in range(beams - len(kept)):
                    new_nodes.append(None)
                    new_scores.append(_DEAD)
                    origins.append(row * beams)
                    step_tokens.append(self.tree.eos_token_id)
            nodes, scores = new_nodes, new_scores
            if all(node is None for node in nodes):
                break
            logprobs = prompts.step(origins, step_tokens)
        return [
            [(item, score) for score, item in sorted(row, key=lambda pair: -pair[0])[:top]]
            for row in finished
        ]

    def _expand_row(
        self,
        row: int,
        beams: int,
        nodes: list[int | None],
        scores: list[float],
        logprobs: torch.Tensor,
        blocked: dict[int, set[int]],
        length: int,
        finished: list[tuple[float, int]],
        length_normalization: bool,
    ) -> list[tuple[float, int, int, int]]:
        """One step of one prompt: every EOS child finishes an item (into `finished`); the
        best `beams` other children are returned as (score, origin slot, token, node)."""
        import torch

        values, tokens, children, slots = [], [], [], []
        for slot in range(row * beams, (row + 1) * beams):
            node = nodes[slot]
            if node is None:
                continue
            expansion = self.expansions(node, blocked)
            if not expansion.nodes:
                continue
            values.append(logprobs[slot][expansion.tokens.to(logprobs.device)] + scores[slot])
            tokens.append(expansion.tokens)
            children.extend(expansion.nodes)
            slots.extend([slot] * len(expansion.nodes))
        if not values:
            return []
        value, token = torch.cat(values).cpu(), torch.cat(tokens)
        ends = (token == self.tree.eos_token_id).nonzero().flatten().tolist()
        for position in ends:
            score = float(value[position])
            item = self.tree.item_at[children[position]]
            finished.append((score / length if length_normalization else score, item))
        value[token == self.tree.eos_token_id] = _DEAD
        best = value.topk(min(beams, len(children) - len(ends)))
        return [
            (score, slots[position], int(token[position]), children[position])
            for score, position in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]
