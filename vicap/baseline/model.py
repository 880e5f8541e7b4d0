"""The CNN+LSTM captioner: a CNN over the image, an LSTM that writes the caption, beam search.

- `CNNEncoder`: a torchvision ResNet / EfficientNet (or a tiny conv net) without its classifier; the
  last feature map is average-pooled to `grid x grid` regions -> (B, grid*grid, C).
- `LSTMDecoder`, two classic designs:
  - `show_tell` (Vinyals et al., "Show and Tell", 2015): the mean region feature, projected to the
    word-embedding width, is the LSTM's first input; then <bos> and the caption's words.
  - `attention` (Xu et al., "Show, Attend and Tell", 2015): the LSTM state starts from the mean
    feature; at every step an MLP attends over the regions, a sigmoid gate scales the context, and
    [word embedding; gated context] is the LSTM input.
- `beam_search`: batched, with the same length normalization as vicap's generation
  (score = sum of log-probs / length ** length_penalty).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vicap.baseline.recipe import CNNConfig, LSTMConfig
from vicap.baseline.vocab import BOS, EOS, PAD
from vicap.encoders import load_weights_file
from vicap.errors import ModelLoadError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Sequential):
    """Four stride-2 conv blocks (16-32-64-128 channels): a CNN that trains in seconds on a CPU."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        super().__init__(*layers)
        self.out_channels = c_in


# torchvision names its weight files <name>-<first hex digits of the file's sha256>.pth
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth$")


def _imagenet_state_dict(cfg: CNNConfig) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for cfg.cnn: from the torch hub cache, or downloaded when allowed.

    Read like any file a user hands in (load_weights_file: torch.load with weights_only=True), not
    through torchvision's get_state_dict, which unpickles without that guard.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(cfg.cnn).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "VICAP_OFFLINE"))
    how = (
        f'download it on a connected machine (python -c "import torchvision; torchvision.models.{cfg.cnn}'
        f"(weights='DEFAULT')\") and copy {cached.name} to {cached.parent}, or set encoder.weights to a copy "
        "of it (.pth, or .safetensors), or use encoder.weights = 'none'"
    )
    if not cached.is_file():
        if offline:
            raise ModelLoadError(
                f"ImageNet weights for {cfg.cnn} not in the cache ({cached}) and offline mode is on; {how}"
            )
        match = _HASH_IN_NAME.search(cached.name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # written to a temporary name and moved into place only once its sha256 matches the name's
            torch.hub.download_url_to_file(
                weights.url, str(cached), hash_prefix=match.group(1) if match else None, progress=False
            )
        except Exception as e:  # network errors come as URLError, OSError, RuntimeError (bad hash)...
            raise ModelLoadError(
                f"could not download ImageNet weights for {cfg.cnn} from {weights.url} ({type(e).__name__}: {e}); "
                f"{how}"
            ) from None
    return load_weights_file(cached, f"encoder.weights = 'imagenet' ({cfg.cnn}, cached file {str(cached)!r})")


def build_cnn(cfg: CNNConfig) -> tuple[nn.Module, int]:
    """The CNN body (image -> feature map) and its channel count, with the weights the recipe names."""
    if cfg.cnn == "tiny":
        net = TinyCNN()
        return net, net.out_channels
    import torchvision

    full = getattr(torchvision.models, cfg.cnn)(weights=None)
    if cfg.weights == "imagenet":
        state = _imagenet_state_dict(cfg)
    elif cfg.weights != "none":
        state = load_weights_file(Path(cfg.weights), f"encoder.weights = {cfg.weights!r}")
    else:
        state = None
    if state is not None:
        try:
            full.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"{cfg.weights}: not a {cfg.cnn} state dict ({str(e)[:300]})") from None
    if cfg.cnn.startswith("resnet"):
        return nn.Sequential(*list(full.children())[:-2]), full.fc.in_features
    return full.features, full.classifier[-1].in_features


class CNNEncoder(nn.Module):
    """Pixels (B, 3, H, W) -> region features (B, grid*grid, C).

    `cnn = "timm"` is vicap's own timm encoder (`vicap_encoder`, loaded as a vicap recipe's
    `encoder.name = "timm"` loads it): its pooled vector is the one region, and its identity keys the
    feature store, so the baseline reads the rows a vicap run with that model and weights wrote."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.grid = cfg.grid
        self.vicap_encoder = None
        if cfg.cnn == "timm":
            from vicap.encoders import load_encoder
            from vicap.recipe import EncoderConfig

            if not Path(cfg.weights).expanduser().is_file():  # named by the baseline's own key
                raise ModelLoadError(f"encoder.weights = {cfg.weights!r}: file not found")
            self.vicap_encoder = load_encoder(
                EncoderConfig(name="timm", model=cfg.model, pretrained=cfg.weights)
            )
            self.body, self.channels = self.vicap_encoder.model, self.vicap_encoder.embed_dim
            return
        self.body, self.channels = build_cnn(cfg)
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vicap_encoder is not None:
            return self.body(pixels).unsqueeze(1)  # (B, 1, C): the pooled vector
        fmap = self.pool(self.body(pixels))  # (B, C, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, g*g, C)


def image_transform(cfg: CNNConfig):
    """PIL image -> normalized (3, S, S) tensor: shorter side resized to S, center crop, ImageNet stats."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(cfg.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(cfg.image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class LSTMDecoder(nn.Module):
    """Writes a caption from region features, one token per step (see the module docstring)."""

    def __init__(self, cfg: LSTMConfig, vocab_size: int, feat_dim: int) -> None:
        super().__init__()
        self.type = cfg.type
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)
        if cfg.type == "show_tell":
            self.image_in = nn.Linear(feat_dim, cfg.embed_dim)
            self.lstm = nn.LSTMCell(cfg.embed_dim, cfg.hidden_dim)
        else:
            self.init_h = nn.Linear(feat_dim, cfg.hidden_dim)
            self.init_c = nn.Linear(feat_dim, cfg.hidden_dim)
            self.att_feat = nn.Linear(feat_dim, cfg.attention_dim)
            self.att_hidden = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
            self.att_score = nn.Linear(cfg.attention_dim, 1)
            self.gate = nn.Linear(cfg.hidden_dim, feat_dim)
            self.lstm = nn.LSTMCell(cfg.embed_dim + feat_dim, cfg.hidden_dim)

    def init_state(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder state before <bos>; every tensor's first dimension is the batch (for beam reordering)."""
        mean = feats.mean(1)
        if self.type == "show_tell":
            B, H = feats.size(0), self.lstm.hidden_size
            zeros = feats.new_zeros(B, H)
            h, c = self.lstm(self.image_in(mean), (zeros, zeros))
            return {"h": h, "c": c}
        return {
            "h": torch.tanh(self.init_h(mean)),
            "c": torch.tanh(self.init_c(mean)),
            "feats": feats,
            "att_feats": self.att_feat(feats),  # computed once per image, reused at every step
        }

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        """One step: previous tokens (B,) -> next-token logits (B, V) and the new state."""
        x = self.embed(tokens)
        if self.type == "attention":
            e = self.att_score(torch.tanh(state["att_feats"] + self.att_hidden(state["h"]).unsqueeze(1)))
            alpha = torch.softmax(e.squeeze(-1), dim=1)  # (B, L)
            context = (alpha.unsqueeze(-1) * state["feats"]).sum(1)
            context = torch.sigmoid(self.gate(state["h"])) * context
            x = torch.cat([x, context], dim=-1)
        h, c = self.lstm(x, (state["h"], state["c"]))
        return self.out(self.dropout(h)), {**state, "h": h, "c": c}

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: inputs (B, T) = <bos> w1 .. w(T-1) -> logits (B, T, V) for w1 .. <eos>."""
        state = self.init_state(feats)
        logits = []
        for t in range(inputs.size(1)):
            out, state = self.step(inputs[:, t], state)
            logits.append(out)
        return torch.stack(logits, 1)


class CNNLSTM(nn.Module):
    def __init__(self, cnn: CNNConfig, lstm: LSTMConfig, vocab_size: int) -> None:
        super().__init__()
        self.encoder = CNNEncoder(cnn)
        self.decoder = LSTMDecoder(lstm, vocab_size, self.encoder.channels)

    def features(self, pixels_or_feats: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) through the CNN, or cached region features (B, L*C) reshaped."""
        if pixels_or_feats.dim() == 4:
            return self.encoder(pixels_or_feats)
        return pixels_or_feats.view(pixels_or_feats.size(0), -1, self.encoder.channels)

    def forward(self, images: torch.Tensor, inputs: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """images: one row per image; image_index maps each caption row of `inputs` to its image."""
        feats = self.features(images)
        return self.decoder(feats[image_index], inputs)


@torch.no_grad()
def beam_search(
    decoder: LSTMDecoder,
    feats: torch.Tensor,
    *,
    beam_size: int,
    max_len: int,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Best token ids (without <bos>/<eos>) per image; beam_size 1 is greedy decoding."""
    B, K = feats.size(0), beam_size
    state = decoder.init_state(feats.repeat_interleave(K, 0))
    tokens = torch.full((B * K,), BOS, dtype=torch.long, device=feats.device)
    scores = torch.full((B, K), float("-inf"), device=feats.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step fans out
    seqs = torch.zeros((B * K, 0), dtype=torch.long, device=feats.device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for t in range(max_len):
        logits, state = decoder.step(tokens, state)
        logp = F.log_softmax(logits.float(), dim=-1)
        logp[:, PAD] = float("-inf")
        logp[:, BOS] = float("-inf")
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top, idx = cand.topk(K, dim=1)  # (B, K)
        beam, tok = idx // V, idx % V
        rows = (torch.arange(B, device=feats.device).unsqueeze(1) * K + beam).view(-1)
        seqs = torch.cat([seqs[rows], tok.view(-1, 1)], dim=1)
        state = {k: v[rows] for k, v in state.items()}
        scores = top.clone()
        ended = tok == EOS
        for b, k in ended.nonzero().tolist():
            if top[b, k] > float("-inf"):
                finished[b].append(
                    (float(top[b, k]) / (t + 1) ** length_penalty, seqs[b * K + k, :-1].tolist())
                )
        scores[ended] = float("-inf")  # a finished beam stops; the others go on
        tokens = tok.view(-1)
        if all(len(f) >= K for f in finished) or bool(torch.isinf(scores).all()):
            break
    out = []
    for b in range(B):
        pool = list(finished[b])
        if not pool:  # nothing ended within max_len: take the live beams as they are
            length = seqs.size(1)
            pool = [
                (float(scores[b, k]) / max(length, 1) ** length_penalty, seqs[b * K + k].tolist())
                for k in range(K)
                if scores[b, k] > float("-inf")
            ]
        out.append(max(pool, key=lambda p: p[0])[1] if pool else [])
    return out
