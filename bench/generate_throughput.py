"""Caption generation throughput: vicap against the original ClipCap's decoding algorithm.

    python bench/generate_throughput.py                  # ~4 minutes on 2 idle CPU cores
    python bench/generate_throughput.py --original-beam  # + the original generate_beam (~2 more)
    python bench/generate_throughput.py --quick          # 8 images, 1 round: a smoke test
    python bench/generate_throughput.py --bf16           # + vicap at generate.precision = "bf16"

Model: a GPT-2-small-shaped LM (GPT2Config() defaults: 12 layers, 768 wide, 50257 tokens; random
weights, seeded) behind a random ClipCap MLP mapper (512-d features -> 10 prefix embeddings). With
random weights EOS never wins, so every caption would run to the length limit; the EOS row of the
(tied) embedding is scaled up (--eos-scale) so that captions end at different lengths, as real ones do
and as batched decoding must handle.

vicap: `vicap.generate.decode_batch` -- HF generate(inputs_embeds=...), KV cache, batched.

reference: the original ClipCap algorithm (rmokady/CLIP_prefix_caption, predict.py), one image at a
time, no KV cache, the whole sequence recomputed at every step and the LM's logits computed at every
position, as its `model.gpt(inputs_embeds=generated).logits[:, -1]` does:
- beam 1: its `generate2` decoding (argmax of each step's logits; top-p filtering never changes the
  argmax), stopping at EOS (the original stops at '.'; vicap's captions end with EOS).
- beam 5: the original's `generate_beam` keeps finished beams inside the beam and ranks everything by
  average log-prob at every step, while HF's beam search (vicap) keeps finished hypotheses apart,
  ranks live beams by summed log-prob and finished ones by sum / length ** length_penalty, with its
  early-stopping rule. Those are different searches that can return different captions, so an exact
  check needs the same one: the reference beam below implements HF's rules step for step, with the
  original's cost model (per image, no cache, full recomputation). `--original-beam` also times the
  original `generate_beam` itself (stop at EOS) and reports how many captions it shares with vicap.

Both decode the same prefixes with max 20 new tokens. The script checks that vicap's captions equal the
reference's (and that batch 1 equals batch 32), prints the table, and exits 1 if any differ. Each
configuration runs in its own process, so peak RSS is that configuration's own. Timings are the best
of --rounds runs, interleaved so that every configuration meets the same kind of load on a shared
machine. The reference (and vicap at batch 1) decode every --ref-every-th of the images vicap decodes at
batch 32 (the reference is slow); captions/s is computed over the images each one decoded.

--bf16 adds vicap at batch 32 under `generate.precision = "bf16"` (vicap.device.autocast, as `vicap
caption` runs it) and with the LM's weights in bf16 (`decoder.dtype = "bfloat16"`, no autocast),
greedy and beam, where this machine has bf16: each one's captions/s, its ratio
over the reference, and how many of its captions equal fp32's (bf16 rounding may change a close
choice, so this is reported, not required; the fp32 captions are the ones checked against the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vicap  # noqa: E402,F401  (the torchvision guard, before transformers)

FEATURE_DIM, PREFIX_LEN, MAX_NEW, BEAMS, LENGTH_PENALTY = 512, 10, 20, 5, 1.0


def build(eos_scale: float, n_images: int):
    """The seeded model and image features (identical in every process)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vicap.decoders import Decoder
    from vicap.model import CaptionModel
    from vicap.recipe import MapperConfig

    torch.manual_seed(0)
    config = GPT2Config()
    lm = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        lm.get_input_embeddings().weight[config.eos_token_id] *= eos_scale
    eos = config.eos_token_id
    decoder = Decoder(
        lm=lm, tokenizer=None, hidden_size=config.n_embd, eos_token_id=eos, pad_token_id=eos, prompt_ids=[]
    )
    model = CaptionModel(MapperConfig(prefix_length=PREFIX_LEN), FEATURE_DIM, decoder, "frozen").eval()
    features = torch.randn(n_images, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    return model, features


# ---------------------------------------------------------------------------------------- vicap


def vicap_captions(model, features, beams: int, batch: int) -> list[list[int]]:
    from vicap.generate import decode_batch
    from vicap.recipe import GenerateConfig

    beam = {"strategy": "beam", "beam_size": beams, "length_penalty": LENGTH_PENALTY}
    cfg = GenerateConfig(
        **(beam if beams > 1 else {"strategy": "greedy"}), max_new_tokens=MAX_NEW, batch_size=batch
    )
    out: list[list[int]] = []
    for start in range(0, features.shape[0], batch):
        out += [h[0].ids for h in decode_batch(model, features[start : start + batch], cfg)]
    return out


# ---------------------------------------------------------------------------------------- reference


def _logits_last(model, prefix: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """Full recomputation: prefix + every token so far through the LM, logits at every position."""
    rows = prefix.expand(len(tokens), -1, -1)
    if tokens[0]:
        rows = torch.cat([rows, model.embed(torch.tensor(tokens))], dim=1)
    return model.lm(inputs_embeds=rows).logits[:, -1].float()


def reference_greedy(model, prefix: torch.Tensor) -> list[int]:
    eos, tokens = model.decoder.eos_token_id, []
    for _ in range(MAX_NEW):
        token = int(_logits_last(model, prefix, [tokens])[0].argmax())
        if token == eos:
            break
        tokens.append(token)
    return tokens


def reference_beam(model, prefix: torch.Tensor, k: int = BEAMS, lp: float = LENGTH_PENALTY) -> list[int]:
    """HF beam search's rules (transformers' `_beam_search`), without a cache, one image at a time.

    Live beams are ranked by summed log-prob; each step keeps the 2k best (beam, token) pairs; of the k
    best, those ending in EOS (or reaching the length limit) become finished hypotheses scored
    sum / length ** lp (length counts the EOS), of which the k best are kept; the k best pairs that did
    not finish go on. The search stops when every finished slot is taken and the best live beam,
    scored at its current length, cannot beat the worst of them (HF's early_stopping=False heuristic).
    """
    eos = model.decoder.eos_token_id
    beams, scores = [[]], torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []
    for t in range(MAX_NEW):
        logp = torch.log_softmax(_logits_last(model, prefix, beams), dim=-1)
        vocab = logp.shape[-1]
        top_v, top_i = (scores[:, None] + logp).view(-1).topk(2 * k)
        src, tok = (top_i // vocab).tolist(), (top_i % vocab).tolist()
        last = t + 1 == MAX_NEW
        done = [tok[j] == eos or last for j in range(2 * k)]
        new = [(float(top_v[j] / (t + 1) ** lp), beams[src[j]] + [tok[j]]) for j in range(k) if done[j]]
        finished = sorted(finished + new, key=lambda h: -h[0])[:k]
        keep = [j for j in range(2 * k) if not done[j]][:k]
        if last or not keep:
            break
        beams, scores = [beams[src[j]] + [tok[j]] for j in keep], top_v[keep]
        if len(finished) == k and not float(scores[0] / (t + 1) ** lp) > finished[-1][0]:
            break
    best = finished[0][1]
    return best[:-1] if best and best[-1] == eos else best


def original_clipcap_beam(model, prefix: torch.Tensor, beam_size: int = BEAMS) -> list[int]:
    """CLIP_prefix_caption's `generate_beam`, ported as written (stop token = EOS, temperature 1)."""
    stop = model.decoder.eos_token_id
    tokens, scores = None, None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = prefix
    for _ in range(MAX_NEW):
        logits = model.lm(inputs_embeds=generated).logits[:, -1, :].float().softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        next_embed = model.embed(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_embed), dim=1)
        is_stopped = is_stopped + next_tokens.eq(stop).squeeze(1)
        if is_stopped.all():
            break
    order = (scores / seq_lengths).argsort(descending=True)
    best = tokens[order[0], : int(seq_lengths[order[0]])].tolist()
    return best[:-1] if best and best[-1] == stop else best


# ---------------------------------------------------------------------------------------- one job


# --bf16 rows: generate.precision = "bf16" (autocast over fp32 weights), and the LM's weights in bf16
BF16 = {"vicap-bf16": "bf16 autocast", "vicap-lm-bf16": "LM in bf16"}


def run_job(job: dict) -> dict:
    from vicap.device import autocast

    torch.set_num_threads(job["threads"])
    model, features = build(job["eos_scale"], job["pool"])
    if job["impl"] == "vicap-lm-bf16":  # decoder.dtype = "bfloat16": the LM's weights in bf16
        model.lm.to(torch.bfloat16)
    features = features[job["indices"]]
    precision = "bf16" if job["impl"] == "vicap-bf16" else "fp32"
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        if job["impl"].startswith("vicap"):
            vicap_captions(model, features[:1], job["beams"], 1)  # warm-up (allocator, kernels)
            t0 = time.perf_counter()
            caps = vicap_captions(model, features, job["beams"], job["batch"])
        else:
            decode = {"greedy": reference_greedy, "beam": reference_beam, "original": original_clipcap_beam}
            fn = decode[job["impl"].split("-")[1]]
            fn(model, model.prefix(features[:1]))
            t0 = time.perf_counter()
            caps = [fn(model, model.prefix(f[None])) for f in features]
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"captions": caps, "seconds": seconds, "peak_rss_mb": peak}


def spawn(job: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"job {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="images vicap decodes at batch --images")
    ap.add_argument(
        "--ref-every", type=int, default=4, help="the reference and vicap batch 1 take every k-th"
    )
    ap.add_argument("--rounds", type=int, default=2, help="timings are the best of this many runs")
    ap.add_argument("--original-beam", action="store_true", help="also time the original generate_beam")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    ap.add_argument("--eos-scale", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="8 images, 1 round: a smoke test")
    ap.add_argument(
        "--bf16", action="store_true", help='also vicap at batch --images, generate.precision "bf16"'
    )
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    if args.quick:
        args.images, args.rounds = 8, 1

    n = args.images
    subset = list(range(0, n, args.ref_every))
    plan = [
        ("vicap", 1, n, list(range(n))),
        ("vicap", 1, 1, subset),
        ("reference-greedy", 1, 1, subset),
        ("vicap", BEAMS, n, list(range(n))),
        ("vicap", BEAMS, 1, subset),
        ("reference-beam", BEAMS, 1, subset),
    ]
    if args.original_beam:
        plan.append(("reference-original", BEAMS, 1, subset))
    if args.bf16:
        plan += [(impl, beams, n, list(range(n))) for impl in BF16 for beams in (1, BEAMS)]
    common = {"threads": args.threads, "eos_scale": args.eos_scale, "pool": n}
    t_start = time.perf_counter()
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):  # rounds interleave, so every configuration sees the same kind of load
        for impl, beams, batch, indices in plan:
            job = {**common, "impl": impl, "beams": beams, "batch": batch, "indices": indices}
            res = spawn(job)
            runs.setdefault((impl, beams, batch), []).append(res)
            print(
                f"  round {r + 1}: {impl:18s} beam {beams} batch {batch:2d}: "
                f"{len(indices):2d} images in {res['seconds']:6.1f} s",
                file=sys.stderr,
            )

    ok = True
    best: dict[tuple, dict] = {}
    for key, rs in runs.items():
        if any(r["captions"] != rs[0]["captions"] for r in rs):
            print(f"FAIL: {key} gave different captions in different rounds")
            ok = False
        best[key] = {
            **rs[0],
            "seconds": min(r["seconds"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }

    # ---- the same captions?
    for beams, ref in ((1, "reference-greedy"), (BEAMS, "reference-beam")):
        full = best[("vicap", beams, n)]["captions"]
        mine = [full[i] for i in subset]
        for name, key in (("reference", (ref, beams, 1)), ("vicap batch 1", ("vicap", beams, 1))):
            theirs = best[key]["captions"]
            same = sum(a == b for a, b in zip(mine, theirs, strict=True))
            print(f"beam {beams}: vicap batch {n} vs {name}: {same}/{len(theirs)} captions identical")
            ok &= same == len(theirs)
    if args.original_beam:
        mine = [best[("vicap", BEAMS, n)]["captions"][i] for i in subset]
        orig = best[("reference-original", BEAMS, 1)]["captions"]
        same = sum(a == b for a, b in zip(mine, orig, strict=True))
        print(
            f"beam {BEAMS}: the original generate_beam returns vicap's caption for {same}/{len(orig)} (different rules)"
        )
    if args.bf16:
        for impl in BF16:
            for beams in (1, BEAMS):
                fp32, bf16 = best[("vicap", beams, n)]["captions"], best[(impl, beams, n)]["captions"]
                same = sum(a == b for a, b in zip(fp32, bf16, strict=True))
                print(
                    f"beam {beams}: {impl} vs fp32 at batch {n}: {same}/{n} captions identical (informational)"
                )
    for beams in (1, BEAMS):
        lengths = [len(c) for c in best[("vicap", beams, n)]["captions"]]
        print(
            f"beam {beams}: caption length (tokens) min {min(lengths)}, mean {sum(lengths) / len(lengths):.1f}, "
            f"max {max(lengths)}; {sum(x < MAX_NEW for x in lengths)}/{len(lengths)} ended by EOS"
        )

    # ---- the table
    print(
        f"\nGPT-2-small-shaped LM (random, seeded), MLP mapper, prefix {PREFIX_LEN}, max {MAX_NEW} new tokens, "
        f"{args.threads} threads, torch {torch.__version__}; best of {args.rounds} round(s)"
    )
    head = (
        "| mode   | batch | vicap capt/s | reference capt/s | ratio  | vicap peak RSS | reference peak RSS |"
    )
    print(head + "\n|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for beams, ref in ((1, "reference-greedy"), (BEAMS, "reference-beam")):
        r = best[(ref, beams, 1)]
        ref_cps = len(r["captions"]) / r["seconds"]
        for batch in (1, n):
            v = best[("vicap", beams, batch)]
            cps = len(v["captions"]) / v["seconds"]
            mode = "greedy" if beams == 1 else f"beam {beams}"
            print(
                f"| {mode:6s} | {batch:5d} | {cps:12.2f} | {ref_cps:16.3f} | {cps / ref_cps:5.1f}x |"
                f" {v['peak_rss_mb']:11.0f} MB | {r['peak_rss_mb']:15.0f} MB |"
            )
            for impl, label in BF16.items() if args.bf16 and batch == n else ():
                v = best[(impl, beams, batch)]
                cps = len(v["captions"]) / v["seconds"]
                print(
                    f"| {mode:6s} | {batch:5d}, {label} | {cps:12.2f} | {ref_cps:16.3f} | {cps / ref_cps:5.1f}x |"
                    f" {v['peak_rss_mb']:11.0f} MB | {r['peak_rss_mb']:15.0f} MB |"
                )
    if args.original_beam:
        r = best[("reference-original", BEAMS, 1)]
        print(f"original generate_beam (its own rules): {len(r['captions']) / r['seconds']:.3f} captions/s")
    print(
        f"\nvicap batch {n}: images 0..{n - 1}; the reference and vicap batch 1: {len(subset)} of them "
        f"(every {args.ref_every}th); total bench time {time.perf_counter() - t_start:.0f} s"
    )
    if not ok:
        print("FAIL: captions differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
