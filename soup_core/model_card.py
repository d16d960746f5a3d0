"""Model cards: what an export writes beside its weights, and the rule that a card replaces only a card.

A safetensors file ``soup.safetensors`` gets its card as ``soup.md`` (a Hugging Face folder gets
``README.md`` inside it). Every card carries :data:`CARD_MARK` in its front matter, so the next
export to the same place knows a previous soup's card from a user's notes: it replaces the first
and refuses, before anything is written, to replace the second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from soup_core.errors import SoupError
from soup_core.io import refuse_inputs
from soup_core.io.write import refuse_special

CARD_MARK = "library_name: model-soup-lab"  # in every card's front matter: a card this library wrote


def card_beside(out: Path, inputs: Iterable[str | Path] = ()) -> Path:
    """The card's path beside a safetensors file (its name with ``.md``), once it is clear that
    writing there replaces neither an input nor a file this library did not write."""
    card = out.with_suffix(".md") if out.suffix else out.with_name(out.name + ".md")
    if card == out:
        raise SoupError(f"{out}: the weights would be written where their model card goes; name them "
                        f"{out.with_suffix('.safetensors').name}")
    refuse_inputs(card, inputs)
    refuse_special(card)  # a link, a folder or a device at the card's place is left alone
    try:
        with open(card, "rb") as handle:
            head = handle.read(256).decode("utf-8", "replace")
    except FileNotFoundError:
        return card
    except OSError as exc:
        raise SoupError(f"{card}: cannot check the file at the model card's place ({exc.strerror})") from None
    if CARD_MARK not in head:
        raise SoupError(f"{card} exists and was not written by soup; its model card would replace it: move the "
                        "file away, or choose another --out")
    return card


def model_card(plan: Any) -> str:
    """A Markdown model card (after mergekit's) of an :class:`~soup_core.export.ExportPlan`: what
    was mixed, how, how well, how to remake it."""
    p = plan.provenance
    lines = ["---", CARD_MARK, "tags:", "- model-soup", "- merge", "---", "",
             f"# {plan.title} — {p['zoo']}", "",
             f"Made with Model Soup Lab {p['library_version']}: **{p['recipe_name']}** ({p['reference']}).", ""]
    if plan.weights:
        lines += ["## Ingredients", "", "| checkpoint | weight | sha256 |", "|---|---:|---|"]
        digests = {i["name"]: i["sha256"] for i in p["ingredients"]}
        lines += [f"| {n} | {w:.4f} | `{digests.get(n, '')}` |" for n, w in zip(plan.ingredients, plan.weights)]
    else:
        lines += ["## Plane", "", f"Plane through {', '.join(p['plane'])} (origin {p['plane'][0]}); point "
                  f"({p['xy'][0]:.6g}, {p['xy'][1]:.6g}) in parameter-space L2 units; BatchNorm: {p['bn']}."]
    if p.get("options"):
        lines += ["", "## Parameters", "", *[f"- `{k}`: {v}" for k, v in p["options"].items()]]
    if plan.metrics:
        lines += ["", "## Metrics", "", "Every choice was made on `val`; the other splits are reports.", "",
                  "| split | accuracy | loss | ECE |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {100 * m.accuracy:.2f}% | {m.loss:.4f} | {m.ece:.4f} |" for s, m in plan.metrics.items()]
    if plan.significance:
        lines += ["", f"Against the {plan.significance[0].a}, chosen on `val` (exact McNemar test on the same "
                  f"{plan.significance[0].unit}; 95% score interval of the difference, Tango's, continuity-corrected):", ""]
        lines += [f"- {c.split}: {c.sentence()} (interval {100 * c.interval[0]:+.1f} to {100 * c.interval[1]:+.1f})"
                  for c in plan.significance]
    lines += ["", "## Remake it", ""]
    if plan.command_line:
        lines += ["```sh", plan.command_line, "```"]
    else:
        lines += ["No single `soup` command remakes it: it uses checkpoints that the zoo's manifest does not "
                  "list (their sha256 is above)."]
    lines += ["", "The full provenance is in the weights file's metadata (`soup_provenance`)."]
    return "\n".join(lines) + "\n"
