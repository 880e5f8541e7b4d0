"""Training throughput on CPU: vicap's training step against a straightforward copy of ClipCap's loop.

Setting: ClipCap's "transformer mapper, GPT-2 frozen" recipe -- ViT-B/32-sized image features (512),
transformer mapper with prefix 40 / clip length 40 / 8 layers / 8 heads, a GPT-2-small-shaped LM
(12 layers, 768 wide, vocabulary 50,257; random weights: speed does not depend on their values), AdamW
with no weight decay and no clipping (ClipCap has neither), batch 40.

The two sides:
- reference: CLIP_prefix_caption's train.py loop re-implemented as written -- its TransformerMapper
  (einsum attention), GPT-2 parameters left requiring gradients (its ClipCaptionPrefix only hides them
  from the optimizer, so autograd still computes and accumulates their gradients), every caption padded
  with 0 to the dataset's `max_seq_len = min(mean + 10 * std, max)` of caption lengths, logits computed
  at every position, then `cross_entropy(..., ignore_index=0)` over the caption positions.
- vicap: `CaptionModel`, `vicap.train.build_optimizer` and `vicap.train.optimizer_step` -- the code
  `vicap train` runs -- with batches from vicap's `Collator` (padded to the batch's own longest
  caption, pad id = EOS, labels -100 on padding). Where its time goes: the LM frozen (requires_grad
  off, so no GPT-2 weight gradients), logits only at caption positions, GPT-2's GELU as one fused
  kernel (`vicap.decoders.fuse_activations`), the mapper's last layer computing only the prefix rows,
  and fused AdamW.

Equal loss, exactly what is compared: both sides start from the same weights (the same GPT-2 init;
the reference mapper's state_dict loaded into vicap's mapper -- the names match), see the same
captions in the same batches in the same order, and each reports its per-step training loss: the mean
cross-entropy over every caption token including the final EOS. Caption token ids are drawn from
1..50255 (never 0, never EOS inside a caption), so the reference's ignore_index=0 masks exactly its
padding and the two losses are the same quantity. Per-step losses must agree to 1e-4 relative over
all steps (the warm-up step included, so the later steps also check that the updates were equal).

Caption lengths (tokens, with EOS) are drawn from a log-normal shaped like COCO captions under GPT-2's
tokenizer (median 12, std about 3, a long tail), as many as COCO's Karpathy training captions
(566,747): the reference computes its max_seq_len over all of them, as the original does over COCO.
The timed batches are the first of them.

Each side runs in its own child process (so peak memory is its own), alternating reference / vicap
for --rounds rounds on a possibly busy machine; steps/s is the median over rounds of
(timed steps / their wall time), after one untimed warm-up step, and the speed-up is the median of
the rounds' ratios.

    python bench/train_throughput.py [--batch-size 40] [--steps 3] [--rounds 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vicap  # noqa: E402,F401  (the torchvision guard, before transformers)

D_CLIP, PREFIX, CLIP_LENGTH, LAYERS = 512, 40, 40, 8
EOS = 50256
COCO_CAPTIONS = 566_747  # Karpathy train + restval captions: the set ClipCap computes max_seq_len over


# --------------------------------------------------------------------------- the original's pieces


def original_mapper():
    """CLIP_prefix_caption's TransformerMapper (train.py), as written (bench/clipcap_original.py)."""
    from bench.clipcap_original import OriginalTransformerMapper

    return OriginalTransformerMapper(D_CLIP, 768, PREFIX, CLIP_LENGTH, num_layers=LAYERS)


# --------------------------------------------------------------------------- data


def make_data(batch_size: int, n_batches: int, seed: int = 0):
    """Caption token lists (ending with EOS) and image features; the dataset's max_seq_len."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(np.exp(rng.normal(math.log(12), 0.25, COCO_CAPTIONS))), 4, 60).astype(int)
    max_seq_len = min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))  # the original's rule
    n = batch_size * n_batches
    captions = [list(rng.integers(1, EOS, size=ln - 1)) + [EOS] for ln in lengths[:n]]  # ids never 0
    features = rng.standard_normal((n, D_CLIP)).astype(np.float32)
    return captions, features, max_seq_len, lengths


def reference_batch(captions, features, max_seq_len):
    """The original dataset's __getitem__ + default collate: pad with 0 (cut) to max_seq_len."""
    import torch

    tokens = torch.zeros(len(captions), max_seq_len, dtype=torch.long)
    mask = torch.zeros(len(captions), PREFIX + max_seq_len)
    mask[:, :PREFIX] = 1
    for i, c in enumerate(captions):
        c = c[:max_seq_len]
        tokens[i, : len(c)] = torch.tensor([int(t) for t in c])
        mask[i, PREFIX : PREFIX + len(c)] = 1
    return tokens, mask, torch.from_numpy(features)


# --------------------------------------------------------------------------- one side, in a child


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_common(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 x 768, vocab 50,257
    torch.manual_seed(seed + 1)
    mapper = original_mapper()
    return gpt, mapper


def run_reference(args, captions, features, max_seq_len) -> dict:
    import torch
    from torch.nn import functional as F

    from vicap.train import linear_warmup_decay

    gpt, mapper = build_common()
    gpt.eval()  # ClipCaptionPrefix.train() puts the GPT in eval mode; its parameters keep requires_grad
    mapper.train()
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=args.lr, weight_decay=0.0)
    total = args.steps + 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(0, total))
    batches = [
        reference_batch(captions[i : i + args.batch_size], features[i : i + args.batch_size], max_seq_len)
        for i in range(0, len(captions), args.batch_size)
    ]
    setup_rss = _rss_mb()
    losses, times = [], []
    for tokens, mask, prefix in batches:
        t0 = time.perf_counter()
        embedding_text = gpt.transformer.wte(tokens)
        prefix_projections = mapper(prefix).view(-1, PREFIX, 768)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        out = gpt(inputs_embeds=embedding_cat, attention_mask=mask)
        logits = out.logits[:, PREFIX - 1 : -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()  # the mapper's gradients only; GPT-2's keep accumulating, as in the original
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {
        "losses": losses,
        "times": times,
        "learned_tokens": [int((t != 0).sum()) for t, _, _ in batches],
        "positions": [int(t.numel() + PREFIX * t.shape[0]) for t, _, _ in batches],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpt_grads_allocated": any(p.grad is not None for p in gpt.parameters()),
    }


def run_vicap(args, captions, features, max_seq_len) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from vicap.data import Collator
    from vicap.decoders import Decoder
    from vicap.model import CaptionModel
    from vicap.recipe import MapperConfig
    from vicap.train import build_optimizer, linear_warmup_decay, optimizer_step

    gpt, original = build_common()
    decoder = Decoder(
        lm=gpt, tokenizer=None, hidden_size=768, eos_token_id=EOS, pad_token_id=EOS, prompt_ids=[]
    )
    cfg = MapperConfig(type="transformer", prefix_length=PREFIX, clip_length=CLIP_LENGTH, num_layers=LAYERS)
    model = CaptionModel(cfg, D_CLIP, decoder, "frozen")
    model.mapper.load_state_dict(original.state_dict())  # the same starting weights, names and all
    del original
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.child == "vicap-bf16" else "no")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.lr, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(0, args.steps + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    class Store:  # the Collator reads rows of a (memory-mapped) feature array
        pass

    store = Store()
    store.features = np.asarray(features)
    collate = Collator(store, EOS)
    batches = [
        collate([(i + j, captions[i + j]) for j in range(args.batch_size)])
        for i in range(0, len(captions), args.batch_size)
    ]
    setup_rss = _rss_mb()
    losses, times = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss_sum, n_tokens, _ = optimizer_step(
            model, optimizer, scheduler, [batch], accelerator, grad_clip=0.0, params=params
        )
        times.append(time.perf_counter() - t0)
        losses.append(float(loss_sum / n_tokens))
    return {
        "losses": losses,
        "times": times,
        "learned_tokens": [int(b["attention_mask"].sum()) for b in batches],
        "positions": [int(b["input_ids"].numel() + PREFIX * b["input_ids"].shape[0]) for b in batches],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpt_grads_allocated": any(p.grad is not None for p in gpt.parameters()),
    }


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    captions, features, max_seq_len, _ = make_data(args.batch_size, args.steps + 1)
    run = run_reference if args.child == "reference" else run_vicap
    result = run(args, captions, features, max_seq_len)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=40, help="captions per step (ClipCap: 40)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating reference / vicap rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="AdamW learning rate (large, so steps move weights)"
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also time vicap with train.mixed_precision = bf16 (informational: bf16 rounding changes the loss)",
    )
    p.add_argument("--child", choices=["reference", "vicap", "vicap-bf16"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    _, _, max_seq_len, lengths = make_data(args.batch_size, args.steps + 1)
    print(
        f"setting: ClipCap transformer mapper (prefix {PREFIX}, clip length {CLIP_LENGTH}, {LAYERS} layers), "
        f"GPT-2-small-shaped LM (random weights) frozen, batch {args.batch_size}, "
        f"{args.steps} timed steps + 1 warm-up, {args.rounds} round(s)"
    )
    print(
        f"caption lengths (tokens incl. EOS): mean {lengths.mean():.1f}, std {lengths.std():.1f}, "
        f"max {lengths.max()}; reference pads every caption to max_seq_len = {max_seq_len}"
    )
    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f} at start")
    sides = ("reference", "vicap", "vicap-bf16") if args.bf16 else ("reference", "vicap")
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides:
            cmd = [sys.executable, __file__, "--child", side] + [
                f"--batch-size={args.batch_size}",
                f"--steps={args.steps}",
                f"--threads={args.threads}",
                f"--lr={args.lr}",
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(line[len("RESULT ") :])
            results[side].append(res)
            timed = res["times"][1:]
            print(
                f"  round {r + 1} {side:10s}: {len(timed) / sum(timed):.4f} steps/s "
                f"(step times {', '.join(f'{t:.2f}' for t in res['times'])} s, first untimed), "
                f"{res['threads']} threads"
            )

    def summary(side: str) -> dict:
        runs = results[side]
        sps = statistics.median(len(r["times"][1:]) / sum(r["times"][1:]) for r in runs)
        tokens = sum(runs[0]["learned_tokens"][1:]) / len(runs[0]["learned_tokens"][1:])
        positions = sum(runs[0]["positions"][1:]) / len(runs[0]["positions"][1:])
        return {
            "steps_s": sps,
            "tokens_s": sps * tokens,
            "positions_s": sps * positions,
            "positions": positions,
            "peak": max(r["peak_rss_mb"] for r in runs),
            "step_mem": max(r["peak_rss_mb"] - r["setup_rss_mb"] for r in runs),
        }

    ref, ours = summary("reference"), summary("vicap")
    print()
    print(
        "| loop | steps/s | caption tokens/s | LM positions/step | peak RSS (MB) | peak RSS above setup (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, s in (("reference (ClipCap's loop)", ref), ("vicap", ours)):
        print(
            f"| {name} | {s['steps_s']:.4f} | {s['tokens_s']:.1f} | {s['positions']:.0f} | "
            f"{s['peak']:.0f} | {s['step_mem']:.0f} |"
        )
    a, b = results["reference"][0]["losses"], results["vicap"][0]["losses"]
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))

    def round_spread(side: str) -> float:  # largest relative loss difference between rounds of one side
        first = results[side][0]["losses"]
        return max(
            abs(x - y) / abs(y) for r in results[side] for x, y in zip(r["losses"], first, strict=True)
        )

    spread = ", ".join(f"{side} {round_spread(side):.1e}" for side in ("reference", "vicap"))
    if args.bf16:
        bf = summary("vicap-bf16")
        c = results["vicap-bf16"][0]["losses"]
        rel_bf = max(abs(x - y) / abs(x) for x, y in zip(a, c, strict=True))
        print(
            f"| vicap, train.mixed_precision = bf16 (not the equal-loss comparison) | {bf['steps_s']:.4f} | "
            f"{bf['tokens_s']:.1f} | {bf['positions']:.0f} | {bf['peak']:.0f} | {bf['step_mem']:.0f} |"
        )
        print(
            f"  bf16: {bf['steps_s'] / ref['steps_s']:.2f}x the reference; loss differs by up to {rel_bf:.1e} relative"
        )
    print()
    print(f"per-step loss, reference: {', '.join(f'{x:.6f}' for x in a)}")
    print(f"per-step loss, vicap    : {', '.join(f'{x:.6f}' for x in b)}")
    print(
        f"max relative loss difference {rel:.2e} ({'equal' if rel <= 1e-4 else 'NOT EQUAL'} at 1e-4); "
        f"between rounds of one side (thread scheduling): {spread}"
    )
    print(
        f"GPT-2 gradients allocated: reference {results['reference'][0]['gpt_grads_allocated']}, "
        f"vicap {results['vicap'][0]['gpt_grads_allocated']}"
    )

    def sps(r: dict) -> float:
        return len(r["times"][1:]) / sum(r["times"][1:])

    # Each round runs the two sides back to back, so a round's ratio compares like with like on a
    # machine whose speed drifts; the figure is the median over rounds.
    per_round = [sps(v) / sps(r) for r, v in zip(results["reference"], results["vicap"], strict=True)]
    ratio = statistics.median(per_round)
    print(
        f"speed-up (vicap / reference steps/s): {ratio:.2f}x, median over {len(per_round)} round(s) "
        f"({', '.join(f'{x:.2f}' for x in per_round)})  (target >= 2x)"
    )
    if rel > 1e-4:
        sys.exit("the two loops' losses differ: the speed comparison is not of equal work")


if __name__ == "__main__":
    main()
