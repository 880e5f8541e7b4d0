"""Training throughput on CPU: vicap's training step against a straightforward copy of ClipCap's loop.

Settings (--setting), ClipCap's two recipes, ViT-B/32-sized image features (512), a GPT-2-small-shaped
LM (12 layers, 768 wide, vocabulary 50,257; random weights: speed does not depend on their values),
AdamW with no weight decay and no clipping (ClipCap has neither), batch 40:
- `transformer`: transformer mapper (prefix 40, clip length 40, 8 layers, 8 heads), GPT-2 frozen.
- `mlp`: MLP mapper (prefix 10), GPT-2 trained with it. GPT-2's dropout is set to 0 on both sides,
  so their losses can be compared (dropout would cost both sides the same).

The sides:
- reference: CLIP_prefix_caption's train.py loop re-implemented as written -- its TransformerMapper
  (einsum attention) or MLP, GPT-2 parameters left requiring gradients when frozen (its
  ClipCaptionPrefix only hides them from the optimizer, so autograd still computes and accumulates
  their gradients), every caption padded with 0 to the dataset's `max_seq_len = min(mean + 10 * std,
  max)` of caption lengths, logits computed at every position, then `cross_entropy(...,
  ignore_index=0)` over the caption positions.
- vicap: `CaptionModel`, `vicap.train.build_optimizer` and `vicap.train.optimizer_step` -- the code
  `vicap train` runs -- with batches from vicap's `Collator` (padded to the batch's own longest
  caption, pad id = EOS, labels -100 on padding). Where its time goes: the LM frozen (requires_grad
  off, so no GPT-2 weight gradients), logits only at caption positions, GPT-2's GELU as one fused
  kernel (`vicap.decoders.fuse_activations`), the mapper's last layer computing only the prefix rows,
  and fused AdamW.
- vicap-grouped: the same with `train.group_by_image = true`: the Collator gives each image's
  features once and `CaptionModel.forward` runs each image's mapper and LM prefix once for its five
  captions (the KV cache of the prefix copied to each caption).

Equal loss, exactly what is compared: all sides start from the same weights (the same GPT-2 init;
the reference mapper's state_dict loaded into vicap's mapper), see the same captions in the same
batches in the same order, and each reports its per-step training loss: the mean cross-entropy over
every caption token including the final EOS. Caption token ids are drawn from 1..50255 (never 0,
never EOS inside a caption), so the reference's ignore_index=0 masks exactly its padding and the
losses are the same quantity. Per-step losses must agree to 1e-4 relative over all steps (the
warm-up step included, so the later steps also check that the updates were equal).

Captions (--captions): five per image (as COCO and Flickr8k have), consecutive, so a batch of 40 is
8 whole images. `flickr8k`: lengths (words + EOS, about one GPT-2 token per word of Flickr8k's common
English, pre-split punctuation included) drawn from ../shared/data/flickr8k-mini/captions.tsv, as many
as Flickr8k's 30,000 training captions; `coco`: a log-normal shaped like COCO captions under GPT-2's
tokenizer (median 12, std about 3, a long tail), as many as COCO's Karpathy training captions
(566,747). The reference computes its max_seq_len over all of them, as the original does. The timed
batches are the first of them.

More rows, each against vicap's fp32 step on the same batches (--bf16, --compile):
- vicap-bf16: `train.mixed_precision = "bf16"` (Accelerate's autocast; weights and AdamW stay fp32).
- vicap-lm-bf16 (frozen LM only): `decoder.dtype = "bfloat16"`: GPT-2's weights stored in bf16, the
  mapper in fp32 (its prefix cast to the LM's dtype, the logits back to fp32 for the loss).
  bf16 rounding changes the loss: these rows print their per-step loss minus vicap's fp32 loss.
- vicap-grouped-bf16: both options that measured faster, `train.group_by_image` and bf16 autocast.
- vicap-compile: vicap's model under `torch.compile(model, dynamic=True)` (compiled in the warm-up step).

FLOPs: torch.utils.flop_counter.FlopCounterMode over the untimed warm-up step (forward, backward,
optimizer) counts the matrix products the step executes, 2 m n k FLOPs for an (m x k)(k x n) product
(mm, addmm, bmm, and scaled-dot-product attention as its two products, QK^T and AV, over the full
query x key square: 4 B H T S d forward, 2.5x that backward with the scores recomputed; torch's
formulas, registered here for the CPU attention kernel too). Per linear layer over N rows that is
2 N d_in d_out forward, the same again for the gradient of its input, and the same once more for the
gradient of its weight only when the weight trains. A frozen LM (requires_grad off) therefore counts
forward + activations' gradients (about 2x forward; no weight-gradient products are executed), a
trained one about 3x. The reference leaves GPT-2's parameters requiring gradients, so autograd
executes their weight-gradient products too: they are counted in its row (executed, though unused),
as are its padded positions and its logits at every position. The count of the warm-up batch is
scaled to the timed batches' mean LM positions; FLOP/s = that x steps/s, shown as a fraction of this
machine's matmul peak, measured here in every round (the best FLOP/s of a 2048^3 torch.mm, fp32 and
bf16, at the sides' thread count): bf16 rows against the bf16 peak, the others against fp32's.

Each side runs in its own child process (so peak memory is its own), in turn, for --rounds rounds on
a possibly busy machine; steps/s is the median over rounds of (timed steps / their wall time), after
one untimed warm-up step, and each speed-up is the median of the rounds' ratios.

    python bench/train_throughput.py [--setting transformer|mlp] [--captions flickr8k|coco]
        [--batch-size 40] [--steps 3] [--rounds 2] [--threads 0] [--no-grouped] [--bf16] [--compile]
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

D_CLIP, CLIP_LENGTH, LAYERS = 512, 40, 8
EOS = 50256
COCO_CAPTIONS = 566_747  # Karpathy train + restval captions: the set ClipCap computes max_seq_len over
FLICKR8K_CAPTIONS = 30_000  # 6,000 training images x 5
PER_IMAGE = 5  # captions per image in COCO and Flickr8k
FLICKR8K_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-mini" / "captions.tsv"
# ClipCap's two settings: mapper, prefix length, whether GPT-2 trains, learning rate (large for the
# frozen LM so steps move weights; ClipCap's 2e-5 when all of GPT-2 trains)
SETTINGS = {
    "transformer": {"mapper": "transformer", "prefix": 40, "tuning": "frozen", "lr": 1e-3},
    "mlp": {"mapper": "mlp", "prefix": 10, "tuning": "full", "lr": 2e-5},
}


NAMES = {
    "reference": "reference (ClipCap's loop)",
    "vicap": "vicap",
    "vicap-grouped": "vicap, train.group_by_image = true",
    "vicap-bf16": "vicap, train.mixed_precision = bf16 (autocast)",
    "vicap-lm-bf16": 'vicap, decoder.dtype = "bfloat16" (frozen LM in bf16, mapper fp32)',
    "vicap-compile": "vicap, torch.compile(model)",
    "vicap-grouped-bf16": "vicap, train.group_by_image = true and train.mixed_precision = bf16",
}


# --------------------------------------------------------------------------- the original's pieces


def original_mapper(setting: dict):
    """CLIP_prefix_caption's TransformerMapper or MLP (train.py), as written (bench/clipcap_original.py)."""
    from bench.clipcap_original import OriginalMLP, OriginalTransformerMapper

    k = setting["prefix"]
    if setting["mapper"] == "mlp":
        return OriginalMLP((D_CLIP, (768 * k) // 2, 768 * k))
    return OriginalTransformerMapper(D_CLIP, 768, k, CLIP_LENGTH, num_layers=LAYERS)


def vicap_mapper_state(original, setting: dict) -> dict:
    """The original mapper's weights under vicap's names (the transformer's names are the same; the
    MLP's Linear layers are net.0 and net.3 in vicap, which puts a Dropout after the Tanh)."""
    state = original.state_dict()
    if setting["mapper"] == "mlp":
        return {k.replace("model.2.", "net.3.").replace("model.0.", "net.0."): v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- data


def caption_lengths(source: str, rng):
    """Caption lengths in tokens (with EOS) of a whole training set shaped like `source`."""
    import numpy as np

    if source == "flickr8k":
        rows = FLICKR8K_MINI.read_text(encoding="utf-8").splitlines()[1:]
        pool = np.array([len(r.split("\t")[2].split()) + 1 for r in rows])
        return rng.choice(pool, FLICKR8K_CAPTIONS)
    return np.clip(np.round(np.exp(rng.normal(math.log(12), 0.25, COCO_CAPTIONS))), 4, 60).astype(int)


def make_data(source: str, batch_size: int, n_batches: int, seed: int = 0):
    """Caption token lists (ending with EOS), each caption's image (five consecutive captions an image),
    image features, the dataset's max_seq_len and all its caption lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = caption_lengths(source, rng)
    max_seq_len = min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))  # the original's rule
    n = batch_size * n_batches
    captions = [list(rng.integers(1, EOS, size=ln - 1)) + [EOS] for ln in lengths[:n]]  # ids never 0
    images = np.arange(n) // PER_IMAGE
    features = rng.standard_normal((images[-1] + 1, D_CLIP)).astype(np.float32)
    return captions, images, features, max_seq_len, lengths


def reference_batch(captions, features, max_seq_len, prefix: int):
    """The original dataset's __getitem__ + default collate: pad with 0 (cut) to max_seq_len."""
    import torch

    tokens = torch.zeros(len(captions), max_seq_len, dtype=torch.long)
    mask = torch.zeros(len(captions), prefix + max_seq_len)
    mask[:, :prefix] = 1
    for i, c in enumerate(captions):
        c = c[:max_seq_len]
        tokens[i, : len(c)] = torch.tensor([int(t) for t in c])
        mask[i, prefix : prefix + len(c)] = 1
    return tokens, mask, torch.from_numpy(features)


# --------------------------------------------------------------------------- one side, in a child


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_common(setting: dict, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config()  # GPT-2 small: 12 x 768, vocab 50,257
    if setting["tuning"] == "full":  # trained in train mode: no dropout, so the sides' losses compare
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    gpt = GPT2LMHeadModel(config)
    torch.manual_seed(seed + 1)
    mapper = original_mapper(setting)
    return gpt, mapper


def run_reference(args, captions, images, features, max_seq_len) -> dict:
    import torch
    from torch.nn import functional as F

    from vicap.train import linear_warmup_decay

    setting = SETTINGS[args.setting]
    k = setting["prefix"]
    gpt, mapper = build_common(setting)
    mapper.train()
    if setting["tuning"] == "full":  # ClipCaptionModel: GPT-2 trains with the mapper
        gpt.train()
        params = list(mapper.parameters()) + list(gpt.parameters())
    else:  # ClipCaptionPrefix.train() puts the GPT in eval mode; its parameters keep requires_grad
        gpt.eval()
        params = list(mapper.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = args.steps + 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(0, total))
    batches = [
        reference_batch(
            captions[i : i + args.batch_size], features[images[i : i + args.batch_size]], max_seq_len, k
        )
        for i in range(0, len(captions), args.batch_size)
    ]
    setup_rss = _rss_mb()
    losses, times, flops = [], [], None
    for i, (tokens, mask, prefix) in enumerate(batches):
        counter = counting(i == 0)  # the untimed warm-up step is the one counted
        mode = counter.__enter__()
        t0 = time.perf_counter()
        embedding_text = gpt.transformer.wte(tokens)
        prefix_projections = mapper(prefix).view(-1, k, 768)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        out = gpt(inputs_embeds=embedding_cat, attention_mask=mask)
        logits = out.logits[:, k - 1 : -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()  # frozen: the mapper's gradients only; GPT-2's keep accumulating, as in the original
        counter.__exit__(None, None, None)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        flops = mode.get_total_flops() if mode else flops
    return {
        "losses": losses,
        "times": times,
        "step_flops": flops,
        "learned_tokens": [int((t != 0).sum()) for t, _, _ in batches],
        "positions": [int(t.numel() + k * t.shape[0]) for t, _, _ in batches],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpt_grads_allocated": any(p.grad is not None for p in gpt.parameters()),
    }


def run_vicap(args, captions, images, features, max_seq_len) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from vicap.data import Collator
    from vicap.decoders import Decoder
    from vicap.model import CaptionModel
    from vicap.recipe import MapperConfig
    from vicap.train import build_optimizer, linear_warmup_decay, optimizer_step

    setting = SETTINGS[args.setting]
    k = setting["prefix"]
    gpt, original = build_common(setting)
    if args.child == "vicap-lm-bf16":  # decoder.dtype = "bfloat16": the frozen LM's weights in bf16
        gpt.to(torch.bfloat16)
    decoder = Decoder(
        lm=gpt, tokenizer=None, hidden_size=768, eos_token_id=EOS, pad_token_id=EOS, prompt_ids=[]
    )
    cfg = MapperConfig(
        type=setting["mapper"], prefix_length=k, clip_length=CLIP_LENGTH, num_layers=LAYERS, dropout=0.0
    )
    model = CaptionModel(cfg, D_CLIP, decoder, setting["tuning"])
    model.mapper.load_state_dict(vicap_mapper_state(original, setting))  # the same starting weights
    del original
    autocast = args.child in ("vicap-bf16", "vicap-grouped-bf16")
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if autocast else "no")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.lr, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(0, args.steps + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if args.child == "vicap-compile":  # dynamic: every batch has its own caption length
        model = torch.compile(model, dynamic=True)

    class Store:  # the Collator reads rows of a (memory-mapped) feature array
        pass

    store = Store()
    store.features = np.asarray(features)
    grouped = args.child in ("vicap-grouped", "vicap-grouped-bf16")
    collate = Collator(store, EOS, group=grouped)  # train.group_by_image
    batches = [
        collate([(int(images[i + j]), captions[i + j]) for j in range(args.batch_size)])
        for i in range(0, len(captions), args.batch_size)
    ]
    setup_rss = _rss_mb()
    losses, times, flops = [], [], None
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        # The untimed warm-up step is the one counted (not under compile, which traces it: the
        # compiled step runs the same products as vicap's)
        with counting(i == 0 and args.child != "vicap-compile") as counter:
            loss_sum, n_tokens, _ = optimizer_step(
                model, optimizer, scheduler, [batch], accelerator, grad_clip=0.0, params=params
            )
        flops = counter.get_total_flops() if counter else flops
        times.append(time.perf_counter() - t0)
        losses.append(float(loss_sum / n_tokens))
    return {
        "losses": losses,
        "times": times,
        "step_flops": flops,
        "learned_tokens": [int(b["attention_mask"].sum()) for b in batches],
        # LM positions computed: the prefix once per caption, or once per image when grouped
        "positions": [int(b["input_ids"].numel() + k * b["features"].shape[0]) for b in batches],
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpt_grads_allocated": any(p.grad is not None for p in gpt.parameters()),
    }


class counting:
    """FlopCounterMode over one step when `on` (else nothing): `with counting(on) as c:` gives the
    counter, whose get_total_flops() is read after the block."""

    def __init__(self, on: bool):
        import torch
        from torch.utils import flop_counter as fc

        cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if cpu not in fc.flop_registry:  # CPU attention: the same products as the other kernels'
            # (fc.sdpa_flop and sdpa_backward_flop are the registered forms: they take tensors)
            fc.register_flop_formula(cpu, get_raw=True)(fc.sdpa_flop)
            backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
            fc.register_flop_formula(backward, get_raw=True)(fc.sdpa_backward_flop)
        self.mode = fc.FlopCounterMode(display=False) if on else None

    def __enter__(self):
        return self.mode.__enter__() if self.mode else None

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc) if self.mode else None


def matmul_peak(threads: int) -> dict:
    """This machine's matmul peak, measured: the best FLOP/s of a 2048^3 fp32 and bf16 torch.mm over a
    few repeats, at the threads the sides use."""
    import torch

    n, out = 2048, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernels, allocator
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(5))
        out[name] = 2 * n**3 / best
    out["threads"] = torch.get_num_threads()
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "peak":
        print("RESULT " + json.dumps(matmul_peak(args.threads)))
        return
    captions, images, features, max_seq_len, _ = make_data(args.captions, args.batch_size, args.steps + 1)
    run = run_reference if args.child == "reference" else run_vicap
    result = run(args, captions, images, features, max_seq_len)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="transformer", help="ClipCap's recipe")
    p.add_argument(
        "--captions",
        choices=["flickr8k", "coco"],
        default="flickr8k" if FLICKR8K_MINI.is_file() else "coco",
        help=f"caption lengths: Flickr8k's (from {FLICKR8K_MINI}) or COCO-like",
    )
    p.add_argument("--batch-size", type=int, default=40, help="captions per step (ClipCap: 40)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every side in turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the setting's)")
    p.add_argument("--no-grouped", action="store_true", help="leave out vicap with train.group_by_image")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also time vicap with train.mixed_precision = bf16 and, with a frozen LM, decoder.dtype = "
        "bfloat16 (bf16 rounding changes the loss: its difference from vicap's fp32 loss is printed)",
    )
    p.add_argument("--compile", action="store_true", help="also time vicap's model under torch.compile")
    p.add_argument("--child", choices=[*NAMES, "peak"], help=argparse.SUPPRESS)
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    args.lr = setting["lr"] if args.lr is None else args.lr
    if args.child:
        child(args)
        return

    _, _, _, max_seq_len, lengths = make_data(args.captions, args.batch_size, args.steps + 1)
    mapper = f"{setting['mapper']} mapper (prefix {setting['prefix']}"
    mapper += f", clip length {CLIP_LENGTH}, {LAYERS} layers)" if setting["mapper"] == "transformer" else ")"
    print(
        f"setting: ClipCap {mapper}, GPT-2-small-shaped LM (random weights) {setting['tuning']}, "
        f"batch {args.batch_size} ({args.batch_size // PER_IMAGE} images x {PER_IMAGE} captions), lr {args.lr}, "
        f"{args.steps} timed steps + 1 warm-up, {args.rounds} round(s)"
    )
    print(
        f"caption lengths ({args.captions}, tokens incl. EOS): mean {lengths.mean():.1f}, std "
        f"{lengths.std():.1f}, max {lengths.max()}; reference pads every caption to max_seq_len = {max_seq_len}"
    )
    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f} at start")
    sides = ["reference", "vicap"] + ([] if args.no_grouped else ["vicap-grouped"])
    sides += (
        ["vicap-bf16"]
        + (["vicap-lm-bf16"] if setting["tuning"] == "frozen" else [])
        + ([] if args.no_grouped else ["vicap-grouped-bf16"])
        if args.bf16
        else []
    )
    sides += ["vicap-compile"] if args.compile else []
    results: dict[str, list[dict]] = {side: [] for side in [*sides, "peak"]}
    for r in range(args.rounds):
        for side in ["peak", *sides]:
            if side not in results:  # it failed in an earlier round
                continue
            cmd = [sys.executable, __file__, "--child", side] + [
                f"--setting={args.setting}",
                f"--captions={args.captions}",
                f"--batch-size={args.batch_size}",
                f"--steps={args.steps}",
                f"--threads={args.threads}",
                f"--lr={args.lr}",
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None and side in (
                "peak",
                "reference",
                "vicap",
            ):  # the others are measured against these
                sys.exit(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            if line is None:  # an optional row (torch.compile, bf16): said and left out, the others go on
                print(f"  round {r + 1} {side} failed, left out:\n{out.stderr[-1500:]}")
                sides.remove(side)
                del results[side]
                continue
            res = json.loads(line[len("RESULT ") :])
            results[side].append(res)
            if side == "peak":
                print(
                    f"  round {r + 1} matmul peak (2048^3 torch.mm): fp32 {res['fp32'] / 1e9:.1f} GFLOP/s, "
                    f"bf16 {res['bf16'] / 1e9:.1f} GFLOP/s, {res['threads']} threads"
                )
                continue
            timed = res["times"][1:]
            print(
                f"  round {r + 1} {side:13s}: {len(timed) / sum(timed):.4f} steps/s "
                f"(step times {', '.join(f'{t:.2f}' for t in res['times'])} s, first untimed), "
                f"{res['threads']} threads"
            )

    def sps(r: dict) -> float:
        return len(r["times"][1:]) / sum(r["times"][1:])

    def summary(side: str) -> dict:
        runs = results[side]
        rate = statistics.median(sps(r) for r in runs)
        tokens = sum(runs[0]["learned_tokens"][1:]) / len(runs[0]["learned_tokens"][1:])
        positions = sum(runs[0]["positions"][1:]) / len(runs[0]["positions"][1:])
        # The counted step is the warm-up one (batch 0): scaled to the timed batches' mean positions
        counted = runs[0]["step_flops"] or results["vicap"][0]["step_flops"]  # compile: vicap's
        flops = counted * positions / runs[0]["positions"][0]
        return {
            "flops": flops,
            "flops_s": flops * rate,
            "steps_s": rate,
            "captions_s": rate * args.batch_size,
            "tokens_s": rate * tokens,
            "positions": positions,
            "peak": max(r["peak_rss_mb"] for r in runs),
            "step_mem": max(r["peak_rss_mb"] - r["setup_rss_mb"] for r in runs),
        }

    def ratio(side: str, base: str) -> tuple[float, list[float]]:
        # Each round runs the sides back to back, so a round's ratio compares like with like on a
        # machine whose speed drifts; the figure is the median over rounds.
        per_round = [sps(v) / sps(b) for b, v in zip(results[base], results[side], strict=True)]
        return statistics.median(per_round), per_round

    peak = {k: max(r[k] for r in results["peak"]) for k in ("fp32", "bf16")}
    print()
    print(
        "| loop | steps/s | captions/s | caption tokens/s | LM positions/step | GFLOP/step | GFLOP/s | "
        "of matmul peak | peak RSS (MB) | peak RSS above setup (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        s = summary(side)
        dtype = "bf16" if "bf16" in side else "fp32"
        print(
            f"| {NAMES[side]} | {s['steps_s']:.4f} | {s['captions_s']:.2f} | {s['tokens_s']:.1f} | "
            f"{s['positions']:.0f} | {s['flops'] / 1e9:.0f} | {s['flops_s'] / 1e9:.1f} | "
            f"{100 * s['flops_s'] / peak[dtype]:.0f}% of {dtype} | {s['peak']:.0f} | {s['step_mem']:.0f} |"
        )
    print(
        f"matmul peak measured here (best of the rounds): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s"
    )
    print()
    ref = results["reference"][0]["losses"]
    print(f"per-step loss, {'reference':13s}: {', '.join(f'{x:.6f}' for x in ref)}")
    unequal = []
    fp32 = results["vicap"][0]["losses"]
    for side in sides[1:]:
        losses = results[side][0]["losses"]
        if "bf16" in side:  # bf16 rounding: reported against vicap's fp32 loss on the same batches
            diffs = [y - x for x, y in zip(fp32, losses, strict=True)]
            worst = max(abs(d) / x for d, x in zip(diffs, fp32, strict=True))
            print(
                f"per-step loss, {side:13s}: {', '.join(f'{x:.6f}' for x in losses)}  (minus vicap fp32: "
                f"{', '.join(f'{d:+.4f}' for d in diffs)}; max relative {worst:.1e}: bf16 rounding)"
            )
            continue
        rel = max(abs(x - y) / abs(x) for x, y in zip(ref, losses, strict=True))
        verdict = "equal" if rel <= 1e-4 else "NOT EQUAL"
        print(
            f"per-step loss, {side:13s}: {', '.join(f'{x:.6f}' for x in losses)}  "
            f"(max relative difference {rel:.2e}: {verdict})"
        )
        if verdict == "NOT EQUAL":
            unequal.append(side)

    def round_spread(side: str) -> float:  # largest relative loss difference between rounds of one side
        first = results[side][0]["losses"]
        return max(
            abs(x - y) / abs(y) for r in results[side] for x, y in zip(r["losses"], first, strict=True)
        )

    print(
        f"between rounds of one side (thread scheduling): {', '.join(f'{s} {round_spread(s):.1e}' for s in sides)}"
    )
    print(
        "GPT-2 gradients allocated after the steps: "
        + ", ".join(f"{side} {results[side][0]['gpt_grads_allocated']}" for side in sides)
    )
    for side, base in [(s, "reference") for s in sides[1:]] + [(s, "vicap") for s in sides[2:]]:
        median, per_round = ratio(side, base)
        print(
            f"speed-up ({side} / {base} steps/s): {median:.2f}x, median over {len(per_round)} round(s) "
            f"({', '.join(f'{x:.2f}' for x in per_round)})"
        )
    if unequal:
        sys.exit(
            f"{', '.join(unequal)}: losses differ from the reference: the speed comparison is not of equal work"
        )


if __name__ == "__main__":
    main()
