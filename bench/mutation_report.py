"""What ``make mutate`` found: per module, and each surviving mutant sorted by what it changed.

Reads mutmut's results (``mutants/**/*.meta``) and the mutants themselves (``mutants/**/*.py``),
so it runs after ``make mutate`` without running anything again::

    python bench/mutation_report.py            # the table (Markdown) and the survivors' kinds
    python bench/mutation_report.py --list     # every survivor, with its changed line

A survivor's kind comes from the line the mutant changed, by these rules, in order:

* **message**: the line builds an error's text (``raise``, ``…Error(``, or a string continuing one):
  the error is raised, its wording is not checked;
* **device**: the line names a device or moves tensors (``device``, ``.to(``, ``cuda``): on a
  machine with one CPU every device is the same one;
* **import time**: the mutant is in code that runs when the module is imported (the recipes'
  registry helpers), before mutmut switches a mutant on: only a test that calls the helper itself
  (``test_a_task_vector_recipe_is_declared_by_its_name_alone``) can kill it;
* **memory or time**: the line sets a knob that changes what is kept or reused, never a value: an
  evaluator's ``cache=``, a mask applied ``in_place=``, the sha256 thread pool, the bound on hashes
  pending, the task-vector update kept for every λ (``one_update_for_every_scale`` and its byte budget):
  the same numbers come out, at another cost (``bench/`` measures the costs);
* **other**: the rest, which a test should kill or a reader should find equivalent.

These rules read the text only: they sort, they do not prove a mutant equivalent.
"""

from __future__ import annotations

import argparse
import ast
import collections
import difflib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
VERDICTS = {0: "survived", 1: "killed", 3: "killed", 33: "no tests", 34: "skipped", 35: "suspicious",
            36: "timeout", 24: "timeout", -24: "timeout", 37: "type check", None: "not run"}
IMPORT_TIME = ("soup_core.recipes.x__merge", "soup_core.recipes.task_vectors.x__recipe")
MESSAGE = re.compile(r"raise |Error\(|^\s*f?\"|^\s*f?'")
DEVICE = re.compile(r"device|\.to\(|cuda")
COST = re.compile(r"cache=|in_place=|ThreadPoolExecutor\(|MAX_PENDING_HASHES|one_update_for_every_scale|"
                  r"REUSED_UPDATE_BYTES|reused\[\"bytes\"\]")


def changed_line(module: Path, mutant: str) -> str:
    """The original line the mutant changed (the first differing one)."""
    tree = ast.parse(module.read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    short = mutant.rsplit(".", 1)[-1]
    original = functions.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    changed = functions.get(short)
    if original is None or changed is None:
        return ""
    source = module.read_text()
    old = ast.get_source_segment(source, original).splitlines()[1:]
    new = ast.get_source_segment(source, changed).splitlines()[1:]
    for line in difflib.ndiff(old, new):
        if line.startswith("- "):
            return line[2:].strip()
    return new[0].strip() if new else ""


def kind(mutant: str, line: str) -> str:
    if mutant.startswith(IMPORT_TIME):
        return "import time"
    if MESSAGE.search(line):
        return "message"
    if DEVICE.search(line):
        return "device"
    if COST.search(line):
        return "memory or time"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="every survivor with its changed line")
    args = parser.parse_args()
    table: dict[str, collections.Counter] = {}
    kinds: collections.Counter = collections.Counter()
    survivors = []
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = meta.with_suffix("")
        name = str(module.relative_to(MUTANTS))
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        table[name] = collections.Counter(VERDICTS.get(code, f"exit {code}") for code in verdicts.values())
        for mutant, code in verdicts.items():
            if code == 0:
                line = changed_line(module, mutant)
                kinds[kind(mutant, line)] += 1
                survivors.append((name, mutant.rsplit(".", 1)[-1], kind(mutant, line), line))
    columns = ["killed", "survived", "no tests", "timeout", "not run"]
    print("| module | mutants | " + " | ".join(columns) + " | surviving |")
    print("|---|---:|" + "---:|" * len(columns) + "---:|")
    total: collections.Counter = collections.Counter()
    for name, counts in table.items():
        total.update(counts)
        tested = counts["killed"] + counts["survived"] + counts["no tests"] + counts["timeout"]
        rate = f"{100 * (counts['survived'] + counts['no tests']) / tested:.0f}%" if tested else "—"
        print(f"| `soup_core/{name.removeprefix('soup_core/')}` | {sum(counts.values())} | "
              + " | ".join(str(counts[c]) for c in columns) + f" | {rate} |")
    tested = total["killed"] + total["survived"] + total["no tests"] + total["timeout"]
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[c]) for c in columns)
          + f" | **{100 * (total['survived'] + total['no tests']) / max(tested, 1):.1f}%** |")
    print("\nSurviving = (survived + no tests) / (killed + survived + no tests + timed out); not run excluded.")
    print("\nSurvivors by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    same_values = kinds["device"] + kinds["memory or time"]
    print(f"Surviving, less the {same_values} that cannot change a value where mutmut runs (device on one CPU; "
          f"memory or time): {100 * (total['survived'] + total['no tests'] - same_values) / max(tested, 1):.1f}%")
    if args.list:
        for name, mutant, what, line in survivors:
            print(f"{name}  {mutant}  [{what}]  {line}")


if __name__ == "__main__":
    main()
