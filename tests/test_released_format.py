"""Released VILA-U checkpoints in and out (issue 24 item 1).

A tiny checkpoint is written in the released layout, its names and shapes enumerated here from the
reference's modules (mit-han-lab/vila-u: RQVAESiglipModel = transformers SigLIP + RQBottleneck + VQGAN
Decoder, RQTransformer, mlp2x_gelu MultimodalProjector, a transformers LLaMA), then imported, trained for one
stage-2 step through `model.init_from`, exported back and imported again.
"""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, WIDTH, DEPTH, CODES = 4, 32, 3, 64
LLM_HIDDEN, RQT_EMBED = 48, 32
DTYPE = torch.bfloat16  # the releases' model_dtype


def _siglip_config() -> dict:
    return {
        "model_type": "siglip",
        "vision_config": {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "text_config": {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16},
    }


def _vision_tower_config(siglip_dir: str) -> dict:
    return {
        "architectures": ["RQVAESIGLIPTransformer"], "model_type": "rqvaesigliptransformer_model",
        "hidden_size": WIDTH,
        "rqvaesiglip": {
            "architectures": ["RQVAESiglipModel"], "model_type": "rqvaesiglip_model",
            "embed_dim": WIDTH, "n_embed": CODES, "latent_shape": [GRID, GRID, WIDTH],
            "code_shape": [GRID, GRID, DEPTH], "shared_codebook": True, "restart_unused_codes": True,
            "decay": 0.99, "latent_loss_weight": 0.25, "decoder_latent_shape": None,
            "pretrained_model": siglip_dir,
            "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                         "dropout": 0.0},
        },
        "rqtransformer": {
            "architectures": ["RQTransformer"], "model_type": "rqtransformer_model",
            "block_size": [GRID, GRID, DEPTH], "input_embed_dim_1": WIDTH, "input_embed_dim_2": LLM_HIDDEN,
            "embed_dim": RQT_EMBED, "vocab_size": CODES, "head": {"block": {"n_head": 2}, "n_layer": 2},
        },
    }


def _decoder_shapes(dd: dict, embed_dim: int) -> dict[str, tuple]:
    """The reference's Decoder (+ post_quant_conv) parameters, walked as its __init__ builds them."""
    shapes = {"rqvaesiglip.post_quant_conv.weight": (dd["z_channels"], embed_dim, 1, 1),
              "rqvaesiglip.post_quant_conv.bias": (dd["z_channels"],)}
    p = "rqvaesiglip.decoder."

    def conv(name, cout, cin, k):
        shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(name + ".norm1", cin), conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout), conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    ch, mult, levels = dd["ch"], dd["ch_mult"], len(dd["ch_mult"])
    block_in = ch * mult[-1]
    res = dd["resolution"] // 2 ** (levels - 1)
    conv("conv_in", block_in, dd["z_channels"], 3)
    resblock("mid.block_1", block_in, block_in), attn("mid.attn_1", block_in), resblock("mid.block_2", block_in, block_in)
    for level in reversed(range(levels)):
        block_out = ch * mult[level]
        for j in range(dd["num_res_blocks"] + 1):
            resblock(f"up.{level}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in dd["attn_resolutions"]:
                attn(f"up.{level}.attn.{j}", block_in)
        if level != 0:
            conv(f"up.{level}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("norm_out", block_in), conv("conv_out", dd["out_ch"], block_in, 3)
    return shapes


def _rqtransformer_shapes(cfg: dict) -> dict[str, tuple]:
    e, layers, p = cfg["embed_dim"], cfg["head"]["n_layer"], "rqtransformer."
    shapes = {p + "in_mlp_1.weight": (e, cfg["input_embed_dim_1"]), p + "in_mlp_1.bias": (e,),
              p + "in_mlp_2.weight": (e, cfg["input_embed_dim_2"]), p + "in_mlp_2.bias": (e,),
              p + "pos_emb_d": (1, cfg["block_size"][2], e),
              p + "classifier_mlp.layer_norm.weight": (e,), p + "classifier_mlp.layer_norm.bias": (e,),
              p + "classifier_mlp.linear.weight": (cfg["vocab_size"], e), p + "classifier_mlp.linear.bias": (cfg["vocab_size"],)}
    for i in range(layers):
        b = f"{p}head_transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[b + ln + ".weight"], shapes[b + ln + ".bias"] = (e,), (e,)
        for lin in ("key", "query", "value", "proj"):
            shapes[f"{b}attn.{lin}.weight"], shapes[f"{b}attn.{lin}.bias"] = (e, e), (e,)
        shapes[b + "mlp.0.weight"], shapes[b + "mlp.0.bias"] = (4 * e, e), (4 * e,)
        shapes[b + "mlp.2.weight"], shapes[b + "mlp.2.bias"] = (e, 4 * e), (e,)
    return shapes


def write_tiny_release(root, texts) -> str:
    """A released VILA-U directory at tiny sizes; returns its path."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipConfig, SiglipModel

    from vilau_model.tokenizer import train_bpe_tokenizer

    g = torch.Generator().manual_seed(0)
    src = os.path.join(root, "vila-u-tiny")
    siglip_dir = os.path.join(root, "siglip-tiny")
    os.makedirs(siglip_dir)
    with open(os.path.join(siglip_dir, "config.json"), "w") as f:
        json.dump(_siglip_config(), f)

    vt_cfg = _vision_tower_config(siglip_dir)
    siglip = SiglipModel(SiglipConfig.from_dict(_siglip_config()))
    state = {"rqvaesiglip.siglip_model." + k: v for k, v in siglip.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    shapes.update(_decoder_shapes(vt_cfg["rqvaesiglip"]["ddconfig"], WIDTH))
    shapes.update(_rqtransformer_shapes(vt_cfg["rqtransformer"]))
    state = {k: (torch.randn(s, generator=g) * 0.1).to(DTYPE) for k, s in shapes.items()}
    # the reference ties these to siglip_model's (an attribute of RQVAESiglipModel holding the same Parameter)
    state["rqvaesiglip.logit_scale"] = state["rqvaesiglip.siglip_model.logit_scale"]
    state["rqvaesiglip.logit_bias"] = state["rqvaesiglip.siglip_model.logit_bias"]
    # one shared VQEmbedding listed DEPTH times: K codes + the padding row (non-zero here, to see it carried)
    weight = torch.randn(CODES + 1, WIDTH, generator=g).to(DTYPE)
    count = (torch.rand(CODES, generator=g) * 5).to(DTYPE)
    ema = torch.randn(CODES, WIDTH, generator=g).to(DTYPE)
    for i in range(DEPTH):
        q = f"rqvaesiglip.quantizer.codebooks.{i}."
        state[q + "weight"], state[q + "cluster_size_ema"], state[q + "embed_ema"] = weight, count, ema
    state = {k: v.clone() for k, v in state.items()}  # safetensors stores no shared storage
    os.makedirs(os.path.join(src, "vision_tower"))
    save_file(state, os.path.join(src, "vision_tower", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "vision_tower", "config.json"), "w") as f:
        json.dump(vt_cfg, f)

    llm_dir = os.path.join(src, "llm")
    tokenizer = train_bpe_tokenizer(texts, llm_dir, vocab_size=300)  # the markers are its last four tokens
    llm_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=LLM_HIDDEN, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(llm_cfg).to(DTYPE).save_pretrained(llm_dir, safe_serialization=True)

    os.makedirs(os.path.join(src, "mm_projector"))
    projector = {"layers.0.weight": torch.randn(LLM_HIDDEN, WIDTH, generator=g), "layers.0.bias": torch.randn(LLM_HIDDEN, generator=g),
                 "layers.2.weight": torch.randn(LLM_HIDDEN, LLM_HIDDEN, generator=g), "layers.2.bias": torch.randn(LLM_HIDDEN, generator=g)}
    save_file({k: (v * 0.1).to(DTYPE) for k, v in projector.items()},
              os.path.join(src, "mm_projector", "model.safetensors"), metadata={"format": "pt"})
    mm_cfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": "mlp2x_gelu"}
    with open(os.path.join(src, "mm_projector", "config.json"), "w") as f:
        json.dump(mm_cfg, f)
    with open(os.path.join(llm_dir, "config.json")) as f:
        llm_json = json.load(f)
    top = {"architectures": ["VILAULlamaModel"], "model_type": "vila_u_llama", "llm_cfg": llm_json,
           "vision_tower_cfg": vt_cfg, "mm_projector_cfg": mm_cfg, "hidden_size": LLM_HIDDEN, "mm_hidden_size": WIDTH,
           "mm_use_im_start_end": True, "mm_use_vi_start_end": True, "mm_use_im_patch_token": False,
           "image_aspect_ratio": "resize", "num_video_frames": 8, "model_dtype": "torch.bfloat16", "resume_path": None}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(top, f)
    return src


def _batch(special, seed=0):
    """Two rows: text then a 4x4 grid of codes (generation layout), and text only."""
    g = torch.Generator().manual_seed(seed)
    L = 1 + 6 + 1 + GRID * GRID + 1 + 3
    ids = torch.randint(3, special.vocab_size - 4, (2, L), generator=g)
    ids[:, 0] = special.bos
    visual = torch.zeros(2, L, dtype=torch.bool)
    ids[0, 7] = special.im_start
    visual[0, 8:8 + GRID * GRID] = True
    ids[0, 8 + GRID * GRID] = special.im_end
    ids[visual] = special.visual
    codes = torch.zeros(2, L, DEPTH, dtype=torch.long)
    codes[visual] = torch.randint(0, CODES, (int(visual.sum()), DEPTH), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "codes": codes, "is_visual": visual}


@torch.no_grad()
def _logits(model, batch):
    """Text logits at every position, and the teacher-forced depth logits of every visual position."""
    model.eval()
    hidden = model.hidden_states(batch["input_ids"], batch["codes"], batch["is_visual"])
    text = model.llm.get_output_embeddings()(hidden)
    sel = batch["is_visual"][:, 1:]
    h = hidden[:, :-1][sel]
    target = batch["codes"][:, 1:][sel]
    depth = model.depth(h, model.code_vectors(target)[:, :-1])
    return text, depth


def _released_tensors(directory):
    return {sub: load_file(os.path.join(directory, sub, "model.safetensors")) for sub in ("vision_tower", "mm_projector")}


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    texts = [f"a photo of a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] * 4
    return write_tiny_release(str(tmp_path_factory.mktemp("released")), texts)


def test_released_round_trip_and_a_stage2_step(release, tmp_path):
    from orchestration.config import load_config
    from orchestration.data.lm_data import directory_files
    from orchestration.released import export_released, import_released
    from orchestration.train.lm import LMTask
    from orchestration.train.outputs import read_lm_export, save_lm_export

    first = str(tmp_path / "imported")
    info = import_released(release, first)
    assert info["tower_config"].decoder == "rqvae" and info["tower_config"].code_depth == DEPTH
    assert info["lm_config"].depth_hidden_size == RQT_EMBED and info["lm_config"].depth_layers == 2
    assert info["extras"] == ["rqvaesiglip.quantizer.codebooks.0.weight:padding_row"]
    model_a, tokenizer = read_lm_export(first)
    batch = _batch(model_a.special)
    text_a, depth_a = _logits(model_a, batch)
    assert torch.isfinite(text_a).all() and depth_a.shape == (GRID * GRID, DEPTH, CODES)

    # the released layout back: same names, shapes, dtypes and values; the LLM's files as they were
    back = str(tmp_path / "exported")
    export_released(first, back)
    _assert_same_tensors(_released_tensors(back)["vision_tower"], _released_tensors(release)["vision_tower"])
    _assert_same_tensors(_released_tensors(back)["mm_projector"], _released_tensors(release)["mm_projector"])
    llm_files = sorted(os.listdir(os.path.join(release, "llm")))
    assert sorted(os.listdir(os.path.join(back, "llm"))) == llm_files
    assert filecmp.cmpfiles(os.path.join(release, "llm"), os.path.join(back, "llm"), llm_files, shallow=False)[0] == llm_files
    for sub in ("vision_tower", "mm_projector"):
        with open(os.path.join(release, sub, "config.json")) as f, open(os.path.join(back, sub, "config.json")) as g:
            assert json.load(f) == json.load(g), sub

    # ... and imported again: the same forward logits
    second = str(tmp_path / "reimported")
    import_released(back, second)
    model_b, _ = read_lm_export(second)
    text_b, depth_b = _logits(model_b, batch)
    assert torch.equal(text_a, text_b) and torch.equal(depth_a, depth_b)

    # stage 2 from the import through model.init_from: the weights the trainer starts from are the import's
    config = load_config(None, [f"model.init_from={first}", f"output_dir={tmp_path / 'out'}", "tracking.enabled=false"])
    assert config.model.lm_path == os.path.join(first, "llm") and config.model.tower_checkpoint == first
    task = LMTask(config, directory_files(config.model.lm_path))
    with torch.device("meta"):  # as the trainer builds it: shapes first, then every weight from init_weights
        model = task.build_model()
    model.to_empty(device="cpu")
    task.init_weights(model, seed=123)
    reference = model_a.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith(("llm.", "projector.", "depth.", "tower.quantizer.")):
            assert torch.equal(tensor, reference[name]), name
    text_t, depth_t = _logits(model, batch)
    assert torch.equal(text_t, text_a) and torch.equal(depth_t, depth_a)

    model.train()
    optim = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    out = model(**batch)
    assert torch.isfinite(out["loss"]) and out["num_image"] == GRID * GRID
    out["loss"].backward()
    for part in (model.projector[0].weight, model.depth.blocks[0].qkv.weight, model.llm.get_input_embeddings().weight):
        assert part.grad is not None and part.grad.abs().sum() > 0
    optim.step()
    assert not torch.equal(model.depth.head.weight, model_a.depth.head.weight)

    # the trained model in the released layout, imported again: its tensors (the whole frozen tower, as the
    # end-of-run export writes it beside the trained LM)
    model.tower = model_a.tower
    trained = str(tmp_path / "trained")
    save_lm_export(model.eval(), tokenizer, trained)
    export_released(trained, str(tmp_path / "trained-released"))
    import_released(str(tmp_path / "trained-released"), str(tmp_path / "trained-reimported"))
    model_c, _ = read_lm_export(str(tmp_path / "trained-reimported"))
    state_c = model_c.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith(("llm.", "projector.", "depth.", "tower.")) and "perceptual" not in name:
            assert torch.equal(tensor, state_c[name]), name


def test_unmapped_tensors_are_named(release, tmp_path):
    from orchestration.released import import_released
    from vilau_model.released_format import UnmappedTensors

    broken = str(tmp_path / "broken")
    import shutil

    shutil.copytree(release, broken)
    path = os.path.join(broken, "vision_tower", "model.safetensors")
    state = load_file(path)
    state["rqvaesiglip.something_new.weight"] = torch.zeros(2)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(UnmappedTensors, match="rqvaesiglip.something_new.weight"):
        import_released(broken, str(tmp_path / "out"))


def test_unsupported_released_config_is_named(release, tmp_path):
    from orchestration.released import read_released_configs
    from vilau_model.released_format import ReleasedConfigError, tower_config_from_released

    cfgs = read_released_configs(release)
    cfgs.vision_tower["rqvaesiglip"]["ddconfig"]["attn_resolutions"] = [8]
    with pytest.raises(ReleasedConfigError, match="ddconfig.attn_resolutions"):
        tower_config_from_released(cfgs)


def test_conversation_template_matches_the_reference_format():
    from vilau_model.released_format import VICUNA_V1

    system = VICUNA_V1.system
    assert VICUNA_V1.prompt("a red circle") == f"{system} USER: a red circle ASSISTANT:"
    # the unconditional prompt: the template with an empty user turn
    assert VICUNA_V1.prompt(" ") == f"{system} USER:ASSISTANT:"


def test_generation_uses_the_released_template(release, tmp_path):
    """An imported model generates from the release's chat template; its unconditional stream is the template
    with an empty user turn (DESIGN.md 4), tokenized as the reference tokenizes `prompt + " <im_start>"`."""
    from orchestration.released import import_released
    from orchestration.train.generation import generate
    from orchestration.train.outputs import read_lm_export
    from vilau_model.released_format import VICUNA_V1, template_prompt_ids

    out = str(tmp_path / "imported")
    import_released(release, out)
    model, tokenizer = read_lm_export(out)
    assert model.conversation == VICUNA_V1
    uncond = template_prompt_ids(tokenizer, VICUNA_V1, "", "<im_start>")
    # the space of " <im_start>" stays a token before the marker, as in the reference's one-string tokenization
    assert tokenizer.decode(uncond[1:]) == VICUNA_V1.system + " USER:ASSISTANT: "
    images = generate(model, tokenizer, ["a red circle"], seed=0, temperature=0.0)
    assert len(images) == 1 and images[0].size == (32, 32)
