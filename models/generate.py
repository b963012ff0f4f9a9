"""Offline greedy generation: ``python -m models.generate --model DIR --max-tokens N --prompt TEXT``.

Prints exactly the continuation's text on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.end_tokens import end_token_ids, read_generation_config
from models.generation import greedy_generate
from models.loader import load_model, tokenizer_directory

log = logging.getLogger("models.generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (GPT-2 or GPT-OSS, any layout)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-experts-packed", action="store_true", help="GPT-OSS: keep MXFP4 experts packed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    loaded = load_model(args.model, args.dtype, args.device, args.keep_experts_packed)
    log.info("loaded %s (%s) on %s as %s", args.model, loaded.family, loaded.device, loaded.dtype)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(args.prompt)
    tokenizer_dir = tokenizer_directory(Path(args.model))
    stop = end_token_ids(read_generation_config(Path(args.model), tokenizer_dir), tokenizer_dir, tokenizer)
    [completion] = greedy_generate(loaded.model, [prompt], args.max_tokens, stop_token_ids=stop,
                                   vocab_size=tokenizer.vocab_size)
    sys.stdout.write(tokenizer.decode(completion))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
