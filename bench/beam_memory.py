"""Peak memory of beam search with a large vocabulary: Gemma 3's 262,144 tokens.

    python bench/beam_memory.py                       # beam 5, 32 images, 30 new tokens
    python bench/beam_memory.py --one-call            # the batch in one generate call (vicap before)
    /usr/bin/time -v python bench/beam_memory.py      # the same, with the kernel's own peak RSS

Model: a Gemma-3-shaped text LM (random, seeded) with Gemma 3's vocabulary size, made small everywhere
else (width 64, 2 layers) so that the vocabulary dominates, as it does in Gemma 3 270M (its embedding
is 168M of its 268M parameters). With random weights EOS never wins, so every caption runs to the
length limit: the longest decoding, the worst case. Decoding is `vicap.generate.decode_batch`, as
`vicap evaluate` and `vicap caption` run it.

It prints the resident memory after building the model and the peak while decoding (ru_maxrss). Per
step, beam search over R = images x beams rows handles (R, vocab) float32 matrices (the logits, their
log-softmax, the processors' outputs, the running sums): 32 x 5 x 262,144 x 4 bytes = 168 MB each.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vicap  # noqa: E402,F401  (the torchvision guard, before transformers)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new", type=int, default=30)
    parser.add_argument(
        "--one-call",
        action="store_true",
        help="decode the whole batch in one generate call, as vicap did before LOGITS_BUDGET",
    )
    args = parser.parse_args()

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import vicap.generate
    from vicap.decoders import Decoder
    from vicap.generate import generate_ids
    from vicap.model import CaptionModel
    from vicap.recipe import GenerateConfig, MapperConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    lm = Gemma3ForCausalLM(config).eval()
    decoder = Decoder(lm=lm, tokenizer=None, hidden_size=64, eos_token_id=1, pad_token_id=0, prompt_ids=[2])
    model = CaptionModel(MapperConfig(prefix_length=10), 512, decoder, "frozen").eval()
    features = torch.randn(args.images, 512)
    built = rss_mb()
    if args.one_call:
        vicap.generate.LOGITS_BUDGET = 2**62
    cfg = GenerateConfig(strategy="beam", beam_size=args.beams, max_new_tokens=args.max_new)
    calls = -(-args.images // vicap.generate.images_per_call(model, cfg))
    start = time.perf_counter()
    ids = generate_ids(model, features, cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"vocab {args.vocab:,}, {args.images} images, beam {args.beams}, {args.max_new} new tokens, "
        f"{calls} generate call(s): "
        f"RSS after building {built:,.0f} MB, peak {peak:,.0f} MB (+{peak - built:,.0f} MB decoding), "
        f"{seconds:.1f} s, caption lengths {sorted({len(i) for i in ids})}"
    )


if __name__ == "__main__":
    main()
