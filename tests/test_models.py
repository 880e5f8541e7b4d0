"""Encoders, decoders, mappers and the caption model, on tiny models loaded through the real loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_CLIP_CFG, save_tiny_llama
from vicap.data import encode_captions
from vicap.decoders import Decoder, load_decoder
from vicap.encoders import load_encoder
from vicap.errors import ModelLoadError
from vicap.images import load_image
from vicap.mappers import MAPPERS, build_mapper
from vicap.model import IGNORE, CaptionModel
from vicap.recipe import DecoderConfig, EncoderConfig, MapperConfig

ENCODER_DIM = TINY_CLIP_CFG["embed_dim"]  # 24


def _encoder_cfg(folder: Path, **kw) -> EncoderConfig:
    return EncoderConfig(model=f"local-dir:{folder}", **kw)


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path):
    return load_encoder(_encoder_cfg(tiny_clip_dir))


@pytest.fixture(scope="module")
def pixels(encoder, ktvic_dir: Path) -> torch.Tensor:
    paths = sorted((ktvic_dir / "train-images").glob("*.jpg"))[:3]
    return torch.stack([encoder.preprocess(load_image(p)) for p in paths])


# --------------------------------------------------------------------------- encoder


def test_encoder_width_comes_from_the_model(encoder, pixels: torch.Tensor) -> None:
    assert encoder.embed_dim == ENCODER_DIM
    assert tuple(pixels.shape) == (3, 3, 32, 32)  # preprocessing from open_clip_config.json
    out = encoder.encode(pixels)
    assert tuple(out.shape) == (3, ENCODER_DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_encoder_is_frozen(encoder, pixels: torch.Tensor) -> None:
    params = list(encoder.model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for m in encoder.model.modules())
    assert not encoder.encode(pixels).requires_grad


def test_normalized_encoder(tiny_clip_dir: Path, encoder, pixels: torch.Tensor) -> None:
    normed = load_encoder(_encoder_cfg(tiny_clip_dir, normalize=True))
    out = normed.encode(pixels)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out, torch.nn.functional.normalize(encoder.encode(pixels), dim=-1))
    assert normed.key != encoder.key  # different features -> different store


def test_encoder_key_follows_the_weights(tmp_path: Path, tiny_clip_dir: Path, encoder, pixels) -> None:
    assert load_encoder(_encoder_cfg(tiny_clip_dir)).key == encoder.key  # stable across loads
    moved = shutil.copytree(tiny_clip_dir, tmp_path / "moved")
    assert load_encoder(_encoder_cfg(moved)).key == encoder.key  # content, not location

    weights = moved / "open_clip_model.safetensors"
    state = load_file(str(weights))
    # The image tower's output projection (a constant added to e.g. the class embedding would be
    # cancelled by the LayerNorm after it).
    state["visual.proj"] = state["visual.proj"] * 1.5
    save_file(state, str(weights))
    changed = load_encoder(_encoder_cfg(moved))
    assert changed.key != encoder.key
    assert changed.identity["weights"] != encoder.identity["weights"]
    assert not torch.allclose(changed.encode(pixels), encoder.encode(pixels))


def test_encoder_missing_folder_or_config(tmp_path: Path, tiny_clip_dir: Path) -> None:
    nowhere = tmp_path / "no-such-clip"
    with pytest.raises(ModelLoadError, match="no-such-clip"):
        load_encoder(_encoder_cfg(nowhere))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_model.safetensors", no_config)
    with pytest.raises(ModelLoadError, match=r"no open_clip_config\.json in .*no-config"):
        load_encoder(_encoder_cfg(no_config))


def test_encoder_folder_without_weights_is_an_error(tmp_path: Path, tiny_clip_dir: Path) -> None:
    # open_clip itself only logs a warning and returns random weights here.
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_config.json", folder)
    with pytest.raises(ModelLoadError, match=r"no weights file .* in .*config-only"):
        load_encoder(_encoder_cfg(folder))


def test_encoder_unknown_name_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"'ViT-Nope-99' is not an open_clip model; known include"):
        load_encoder(EncoderConfig(model="ViT-Nope-99", pretrained=""))
    with pytest.raises(ModelLoadError, match=r"encoder\.pretrained = .*w\.safetensors.*file not found"):
        load_encoder(EncoderConfig(model="ViT-B-32", pretrained=str(tmp_path / "w.safetensors")))


# --------------------------------------------------------------------------- decoders


def test_gpt2_decoder(tiny_lm_dir: Path) -> None:
    dec = load_decoder(DecoderConfig(model=str(tiny_lm_dir)))
    assert dec.hidden_size == dec.lm.config.n_embd == 128
    assert dec.eos_token_id == dec.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert dec.tokenizer.pad_token_id is None and dec.pad_token_id == dec.eos_token_id
    assert dec.prompt_ids == []  # GPT-2 puts nothing before a text
    assert not any(p.requires_grad for p in dec.lm.parameters()) and not dec.lm.training


def test_missing_decoder_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no-such-lm.*directory not found"):
        load_decoder(DecoderConfig(model=str(tmp_path / "no-such-lm")))
    empty = tmp_path / "empty-lm"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"could not load decoder .*empty-lm"):
        load_decoder(DecoderConfig(model=str(empty)))


@pytest.mark.parametrize("written", ["~/{name}", "local-dir:{folder}", "local-dir:~/{name}"])
def test_decoder_folder_by_home_or_local_dir(written: str, tiny_lm_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_lm_dir.parent))
    dec = load_decoder(DecoderConfig(model=written.format(name=tiny_lm_dir.name, folder=tiny_lm_dir)))
    assert dec.hidden_size == 128


def test_decoder_not_in_the_cache_says_how_to_get_it() -> None:
    # HF_HUB_OFFLINE=1 (conftest): transformers looks in the cache only
    with pytest.raises(ModelLoadError, match=r"could not load decoder 'vicap-tests/no-such-lm'") as err:
        load_decoder(DecoderConfig(model="vicap-tests/no-such-lm"))
    assert "`huggingface-cli download vicap-tests/no-such-lm --local-dir DIR`" in str(err.value)
    assert str(err.value).endswith("set decoder.model = DIR.")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer puts <s> before every text, saved as a Hugging Face folder."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("llama") / "tiny-llama", ["a một con mèo chó đen trắng nằm trên ghế"]
    )


def test_llama_decoder_feeds_bos_after_the_prefix(tiny_llama_dir: Path) -> None:
    dec = load_decoder(DecoderConfig(model=str(tiny_llama_dir)))
    assert type(dec.lm).__name__ == "LlamaForCausalLM"
    assert (dec.hidden_size, dec.eos_token_id, dec.pad_token_id) == (32, 2, 2)
    assert dec.prompt_ids == [1]

    torch.manual_seed(0)
    model = CaptionModel(MapperConfig(prefix_length=3), ENCODER_DIM, dec, "frozen")
    feats = torch.randn(2, ENCODER_DIM)
    prefix = model.prefix(feats)
    assert tuple(prefix.shape) == (2, 3 + 1, 32)
    bos = dec.lm.get_input_embeddings().weight[1]
    for row in prefix:
        torch.testing.assert_close(row[-1], bos)

    ids = encode_captions(["một con mèo", "con chó đen nằm trên ghế"], dec, 10)
    assert 1 not in ids[0] and ids[0][-1] == 2  # BOS comes from the prefix, EOS ends the caption
    input_ids, mask = _pad(ids, dec.pad_token_id)
    labels = _captured_labels(model, feats, input_ids, mask)
    assert (labels[:, :4] == IGNORE).all()  # k prefix positions and the BOS
    out = model(feats, input_ids, mask)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapper.parameters())
    assert all(p.grad is None for p in model.lm.parameters())


# --------------------------------------------------------------------------- mappers


@pytest.mark.parametrize("name", MAPPERS.names())
def test_every_mapper_maps_and_learns(name: str) -> None:
    torch.manual_seed(0)
    mapper = build_mapper(MapperConfig(type=name, prefix_length=3), 24, 16)
    x = torch.randn(5, 1 + 4, 24) if mapper.uses_tokens else torch.randn(5, 24)  # pooled + 4 patch tokens
    out = mapper(x)
    assert tuple(out.shape) == (5, 3, 16)
    out.pow(2).sum().backward()
    for n, p in mapper.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_mlp_mapper_size_is_clipcaps() -> None:
    d_in, d_lm, k = 24, 16, 3
    h = d_lm * k // 2
    mapper = build_mapper(MapperConfig(type="mlp", prefix_length=k), d_in, d_lm)
    assert sum(p.numel() for p in mapper.parameters()) == d_in * h + h + h * d_lm * k + d_lm * k
    linears = [m for m in mapper.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(d_in, h), (h, d_lm * k)]
    wide = build_mapper(MapperConfig(type="mlp", prefix_length=k, hidden_dim=7), d_in, d_lm)
    assert [m.out_features for m in wide.modules() if isinstance(m, torch.nn.Linear)] == [7, d_lm * k]


def test_mlp_prefixes_are_per_position() -> None:
    # (B, k*d) -> (B, k, d) must split each row into k consecutive chunks, not mix rows.
    mapper = build_mapper(MapperConfig(type="mlp", prefix_length=2), 4, 3)
    x = torch.randn(2, 4)
    flat = mapper.net(x)
    torch.testing.assert_close(mapper(x)[1, 1], flat[1, 3:6])


# --------------------------------------------------------------------------- caption model


@pytest.fixture
def gpt2(tiny_lm_dir: Path) -> Decoder:
    """A fresh decoder per test: CaptionModel changes requires_grad on the LM it is given."""
    return load_decoder(DecoderConfig(model=str(tiny_lm_dir)))


def _pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return input_ids, mask


def _captured_labels(model: CaptionModel, feats, input_ids, mask) -> torch.Tensor:
    seen = {}
    forward = model.lm.forward

    def spy(*args, **kwargs):
        seen["attention_mask"] = kwargs["attention_mask"].clone()
        return forward(*args, **kwargs)

    model.lm.forward = spy
    try:
        seen["labels"] = model(feats, input_ids, mask)["labels"]  # the model computes the loss itself
    finally:
        del model.lm.forward
    n_prefix = model.prefix_length + len(model.decoder.prompt_ids)
    assert (seen["attention_mask"][:, :n_prefix] == 1).all()
    assert torch.equal(seen["attention_mask"][:, n_prefix:], mask)
    return seen["labels"]


def test_labels_mask_prefix_and_padding_but_learn_eos(gpt2: Decoder) -> None:
    torch.manual_seed(0)
    k = 2
    model = CaptionModel(MapperConfig(prefix_length=k), ENCODER_DIM, gpt2, "frozen")
    ids = encode_captions(["một con mèo đen nằm trên ghế", "con chó"], gpt2, 20)
    assert len(ids[0]) > len(ids[1])
    input_ids, mask = _pad(ids, gpt2.pad_token_id)
    eos = gpt2.eos_token_id
    assert gpt2.pad_token_id == eos  # so padding and EOS share an id: masking must go by position
    feats = torch.randn(2, ENCODER_DIM)
    labels = _captured_labels(model, feats, input_ids, mask)
    assert tuple(labels.shape) == (2, k + input_ids.shape[1])
    assert (labels[:, :k] == IGNORE).all()
    for i, t in enumerate(ids):
        assert labels[i, k : k + len(t)].tolist() == t  # caption tokens and the final EOS are learned
        assert labels[i, k + len(t) - 1] == eos
        assert (labels[i, k + len(t) :] == IGNORE).all()
    assert (labels[1] == IGNORE).sum() == k + len(ids[0]) - len(ids[1])


def test_padding_content_does_not_change_the_loss(gpt2: Decoder) -> None:
    torch.manual_seed(0)
    model = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, gpt2, "frozen")
    ids = encode_captions(["một con mèo đen nằm trên ghế", "con chó"], gpt2, 20)
    feats = torch.randn(2, ENCODER_DIM)
    input_ids, mask = _pad(ids, gpt2.pad_token_id)
    other = input_ids.masked_fill(mask == 0, 5)
    with torch.no_grad():
        a, b = model(feats, input_ids, mask)["loss"], model(feats, other, mask)["loss"]
    assert torch.isfinite(a)
    torch.testing.assert_close(a, b)


def test_frozen_lm_stays_frozen_and_in_eval(gpt2: Decoder) -> None:
    model = CaptionModel(MapperConfig(prefix_length=2, dropout=0.1), ENCODER_DIM, gpt2, "frozen")
    model.train()
    assert model.mapper.training
    assert not any(m.training for m in model.lm.modules())  # LM dropout stays off
    assert not any(p.requires_grad for p in model.lm.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"mapper.{n}" for n, _ in model.mapper.named_parameters()}
    state = model.trainable_state_dict()
    assert set(state) == trainable
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())


def test_full_tuning_trains_the_lm(gpt2: Decoder) -> None:
    model = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, gpt2, "full")
    model.train()
    assert model.lm.training
    assert all(p.requires_grad for p in model.lm.parameters())
    keys = set(model.trainable_state_dict())
    assert any(k.startswith("lm.") for k in keys) and any(k.startswith("mapper.") for k in keys)


def test_load_trainable_round_trip_and_rejections(gpt2: Decoder) -> None:
    torch.manual_seed(0)
    a = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, gpt2, "frozen")
    torch.manual_seed(1)
    b = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, gpt2, "frozen")
    state = a.trainable_state_dict()
    b.load_trainable(state)
    for k, v in b.trainable_state_dict().items():
        torch.testing.assert_close(v, state[k])

    key = "mapper.net.0.weight"
    wrong = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"mapper\.net\.0\.weight has shape \(3, 3\), model has \(128, 24\)"):
        b.load_trainable(wrong)
    missing = {k: v for k, v in state.items() if k != "mapper.net.0.bias"}
    with pytest.raises(ValueError, match=r"missing \['mapper\.net\.0\.bias'\]"):
        b.load_trainable(missing)
    with pytest.raises(ValueError, match=r"unexpected \['lm\.lm_head\.weight'\]"):
        b.load_trainable(dict(state, **{"lm.lm_head.weight": torch.zeros(1)}))


def test_gpt2_activation_is_fused_with_the_same_outputs(tiny_lm_dir: Path) -> None:
    from transformers.activations import NewGELUActivation

    from vicap.decoders import fuse_activations

    plain = load_decoder(DecoderConfig(model=str(tiny_lm_dir))).lm
    assert plain.config.activation_function == "gelu_new"
    n_layers = plain.config.n_layer
    fused = load_decoder(DecoderConfig(model=str(tiny_lm_dir))).lm
    assert fuse_activations(fused) == n_layers
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    fused_acts = [m for m in fused.modules() if isinstance(m, torch.nn.GELU)]
    assert len(fused_acts) == n_layers and all(m.approximate == "tanh" for m in fused_acts)
    assert fuse_activations(fused) == 0  # idempotent
    ids = torch.randint(0, plain.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    # CaptionModel fuses the LM it is given.
    decoder = load_decoder(DecoderConfig(model=str(tiny_lm_dir)))
    model = CaptionModel(MapperConfig(prefix_length=2), ENCODER_DIM, decoder, "frozen")
    assert not any(isinstance(m, NewGELUActivation) for m in model.lm.modules())


def test_optimizer_is_fused_adamw_with_the_default_update(monkeypatch) -> None:
    from vicap.train import build_optimizer

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = build_optimizer(a, 1e-2, 0.01)
    assert fused.param_groups[0]["fused"] is True
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        for ps, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            sum((p * torch.arange(p.numel()).view_as(p)).sin().sum() for p in ps).backward()
            opt.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # Where the fused kernel is refused, the default implementation is used.
    real = torch.optim.AdamW

    def refuse_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError(
                "fused=True requires all the params to be floating point Tensors of supported devices"
            )
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", refuse_fused)
    assert not build_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0).param_groups[0]["fused"]


def test_resume_keeps_this_machines_optimizer_implementation(tiny_recipe, tmp_path: Path) -> None:
    # A checkpoint written by the default AdamW resumes into fused AdamW (and the other way round)
    # with the same moments, and the next update is the same.
    from vicap.checkpoint import list_checkpoints, load_trainer_state, read_checkpoint, save_checkpoint
    from vicap.train import build_optimizer

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    plain = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
    p.grad = torch.randn(3, 2)
    plain.step()
    save_checkpoint(
        tmp_path / "run",
        model_state={"w": p.detach().clone()},
        meta={
            "format": "vicap-checkpoint-1",
            "recipe": tiny_recipe().to_json(),
            "encoder_dim": str(ENCODER_DIM),
        },
        step=1,
        epoch=0,
        optimizer=plain,
    )
    q = torch.nn.Parameter(p.detach().clone())
    fused = build_optimizer([q], 1e-2, 0.0)
    load_trainer_state(read_checkpoint(list_checkpoints(tmp_path / "run")[-1]), fused, None)
    assert fused.param_groups[0]["fused"] is True
    torch.testing.assert_close(fused.state[q]["exp_avg_sq"], plain.state[p]["exp_avg_sq"])
    p.grad = q.grad = torch.randn(3, 2)
    plain.step()
    fused.step()
    torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
