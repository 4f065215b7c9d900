#!/usr/bin/env python
"""Print the annotated YAML reference of every trainer config key (from the config classes' field docstrings), or
rewrite README.md's generated section with it (--write-readme)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgs_megatron.config import reference  # noqa: E402
from mgs_megatron.rl.config import TrainConfig  # noqa: E402

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write-readme", action="store_true", help="replace the section between the README's markers")
    args = ap.parse_args(argv)
    text = "```yaml\n" + "\n".join(reference(TrainConfig)) + "\n```"
    if not args.write_readme:
        print(text)
        return 0
    readme = Path(__file__).resolve().parents[1] / "README.md"
    s = readme.read_text()
    head, rest = s.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
