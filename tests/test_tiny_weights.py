"""The tiny weights: the real layout and architecture, and the same bytes for the same seed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from scripts.random_weights.tree import write_tiny_weights


def digest(root: Path) -> dict[str, str]:
    """Every written file's hash; the caches other tests fill under the same root are not weights."""
    caches = {"lora-cache", "fp8-cache", "compile-cache"}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in caches
    }


def test_same_seed_same_bytes_other_seed_other_weights(tiny_weights: Path, tmp_path: Path) -> None:
    assert digest(write_tiny_weights(tmp_path / "again")) == digest(tiny_weights)
    other = digest(write_tiny_weights(tmp_path / "other", seed=1))
    key = "FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors"
    assert other[key] != digest(tiny_weights)[key]


def test_the_script_leaves_a_tree_that_is_there_as_it_is(tiny_weights: Path) -> None:
    """The README's first command runs it before every `generate`: the second time writes nothing."""
    before = digest(tiny_weights)
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_weights.py"
    result = subprocess.run(
        [sys.executable, script, tiny_weights], capture_output=True, text=True, check=True
    )
    assert "nothing written" in result.stdout and digest(tiny_weights) == before


def test_layout_and_architecture(tiny_weights: Path) -> None:
    def config(path: str) -> dict:
        return json.loads((tiny_weights / path).read_text())

    dev, schnell = (
        config("FLUX.1-dev/transformer/config.json"),
        config("FLUX.1-schnell/transformer/config.json"),
    )
    assert dev["guidance_embeds"] and not schnell["guidance_embeds"]
    for transformer in (dev, schnell):
        assert transformer["num_layers"] >= 2 and transformer["num_single_layers"] >= 2
        assert transformer["in_channels"] == 64
    vae = config("FLUX.1-dev/vae/config.json")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    assert len(vae["block_out_channels"]) == 4  # 8x downsampling, as FLUX's VAE
    assert config("FLUX.1-dev/scheduler/scheduler_config.json")["use_dynamic_shifting"] is True
    assert config("FLUX.1-schnell/scheduler/scheduler_config.json")["use_dynamic_shifting"] is False
    for folder in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        assert (tiny_weights / "FLUX.1-dev" / folder).is_dir(), folder
    assert not (tiny_weights / "FLUX.1-schnell" / "vae").exists()  # shared with dev
    for folder in ("safety-checker", "nsfw-classifier"):
        assert (tiny_weights / folder / "config.json").is_file()
    assert sum(p.stat().st_size for p in tiny_weights.rglob("*") if p.is_file()) < 10 * 2**20


def test_wide_profile_has_flux_real_layer_widths() -> None:
    """The wide tree (benchmarks) is built on the meta device here: its configs, not its GBs."""
    import torch
    from diffusers import FluxTransformer2DModel

    from scripts.random_weights.models import PROFILES, transformer_config

    wide = PROFILES["wide"]
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**transformer_config(wide, guidance_embeds=True))
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears["transformer_blocks.0.attn.to_q"].weight.shape == (3072, 3072)
    assert linears["transformer_blocks.0.ff.net.0.proj"].weight.shape == (12288, 3072)  # MLP x4
    assert linears["single_transformer_blocks.0.proj_out"].weight.shape == (3072, 3072 + 12288)
    assert linears["context_embedder"].weight.shape == (3072, 4096)  # T5-XXL's width
    assert linears["time_text_embed.text_embedder.linear_1"].weight.shape == (3072, 768)  # CLIP-L's
    parameters = sum(p.numel() for p in transformer.parameters())
    assert 0.6e9 < parameters < 0.8e9  # 1 double + 2 single blocks at full width
    assert (wide.t5_dim, wide.t5_ff, wide.t5_dim // wide.t5_heads) == (4096, 10240, 64)
    assert sum(wide.rope_axes) == wide.head_dim == 128


def test_deep_profile_has_flux_real_depth(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from scripts.random_weights.models import PROFILES, transformer_config

    deep = PROFILES["deep"]
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**transformer_config(deep, guidance_embeds=True))
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
    assert deep.clip_layers == 12  # CLIP-L's depth, for kohya lora_te1_ files
