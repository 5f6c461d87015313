"""Write README's "Which models work" table from the backbone tests (`tests/test_backbones.py`'s `SUPPORT`,
and `tests/test_hf_backbones.py`'s for Hugging Face models), so the table cannot drift from what is tested.

    python scripts/model_table.py          # print the table
    python scripts/model_table.py --write  # replace it in README.md, between its markers
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- model table: scripts/model_table.py -->", "<!-- end of model table -->"
METHOD_NAMES = {
    "tome": "ToMe",
    "evit": "EViT",
    "random_prune": "random",
    "static_prune": "static",
    "dynamicvit": "DynamicViT",
    "avit": "A-ViT",
    "diffrate": "DiffRate",
}
REASONS = {  # the start of a refusal's message -> what the table says
    "no class token": "no: no class token",
    "its search and merge run on timm's Attention": "no: needs timm's Attention",
    "its head and halting read timm's pooling": "no: needs timm's pooling",
    "it needs one class token and no registers": "no: needs one class token, no registers",
}


def _support() -> list[tuple[dict[str, tuple], dict[tuple[str, str], str | None], tuple[str, ...]]]:
    sys.path.insert(0, str(ROOT / "tests"))
    tables = []
    for module in ("test_backbones", "test_hf_backbones"):
        try:
            tests = importlib.import_module(module)
        except ImportError:  # the Hugging Face tests need the [hf] extra
            if module == "test_backbones":
                raise
            continue
        tables.append((tests.FAMILIES, tests.SUPPORT, tests.METHODS))
    return tables


def table() -> str:
    """The Markdown table: one row per tested family, one column per method."""
    methods = list(METHOD_NAMES)
    lines = [
        "| model family | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for families, support, tested in _support():
        for family, (title, *_) in families.items():
            cells = []
            for method in methods:
                if method not in tested:
                    cells.append("no: not built")
                    continue
                refusal = support[family, method]
                cells.append("yes" if refusal is None else REASONS.get(refusal, f"no: {refusal}"))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    text = table()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])


if __name__ == "__main__":
    main()
