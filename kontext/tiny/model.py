"""The embedded tiny FLUX.1 Kontext: a pretrained base at toy width, for the quick start, tests and benchmarks.

It has all seven components of ``black-forest-labs/FLUX.1-Kontext-dev`` with the real model's geometry
(VAE 8x downsampling, 16 latent channels with FLUX's shift/scale factors and no quant convs; transformer
``in_channels=64`` for 2x2 packing, guidance embedding, rope axes summing to the head dimension; the real
scheduler settings) at toy widths, and the tokenizers are built in code. It is *trained*, so that sizes and
edits can be measured on it: the VAE reconstructs synthetic scenes with latents of unit variance after
FLUX's shift and scale, and the transformer is pretrained (:mod:`kontext.tiny.pretrain`) on a general
insertion task, so it already paints an object into a hinted region, as FLUX.1 Kontext [dev] does for a
user. A product LoRA then specialises it.

The weights are committed with the package (``kontext/tiny/tiny_flux_kontext/``), so a fresh machine loads them
in seconds. :func:`tiny_model_path` returns that folder when its recorded definition hash matches
:data:`TINY_DEFINITION`, and otherwise builds the definition into the cache. Rebuild the committed folder
(the recipe; see ``docs/tiny_model.md`` for its measured quality and time)::

    python -m kontext.tiny.model --out kontext/tiny/tiny_flux_kontext
    python -m kontext.tiny.model                        # print the folder that `tiny` resolves to
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.buckets import VAE_SCALE_FACTOR
from data.errors import WriteError, file_in_the_way, writing
from data.locking import atomic_folder, exclusive_lock
from data.synthetic import GENERATOR_VERSION, make_triplet
from kontext.runtime.model_path import TRAINED_TEXT_LENGTH_KEY, cache_root, resolve_local_or_hub
from kontext.tiny.pretrain import insertion_quality, pretrain_transformer

logger = logging.getLogger(__name__)

# Bump when the build procedure changes in a way the definition below does not capture.
BUILDER_VERSION = 2

# The committed build of TINY_DEFINITION (package data).
COMMITTED_DIR = Path(__file__).resolve().parent / "tiny_flux_kontext"

# The scheduler_config.json of black-forest-labs/FLUX.1-Kontext-dev (same as FLUX.1-dev).
FLUX_KONTEXT_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# FLUX's VAE latent normalisation: latents = (vae.encode(x).mode - shift) * scale.
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_VAE_SCALING_FACTOR = 0.3611

TINY_DEFINITION: dict[str, Any] = {
    "seed": 0,
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 3,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [8, 12, 12],
    },
    # Shallow on purpose: with no resnet in the encoder's down blocks (layers_per_block=0; the decoder still
    # has one per up block) the VAE reaches ~22 dB in 1000 steps, where (32, 32, 64, 64) with one layer per
    # block stalls near 16 dB in the same time.
    "vae": {
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 0,
        "latent_channels": 16,
        "norm_num_groups": 4,
        "mid_block_add_attention": True,
        "sample_size": 128,
    },
    # Brief, seeded reconstruction training of the VAE on synthetic scenes (see _train_vae).
    "vae_training": {
        "steps": 1000,
        "batch_size": 8,
        "crop": 64,
        "lr": 1e-3,
        "warmup_steps": 24,
        "num_scenes": 96,
        "scene_size": 128,
        "data_seed": 1234,
        "eval_scenes": 8,
        "eval_seed": 98765,
        # Strong enough that normalised latents have unit variance, as FLUX's own VAE gives them: noise levels in
        # flow matching then mean what they mean for the real model (1e-3 left them at std 0.39).
        "latent_moment_weight": 0.05,
    },
    # Pretraining of the transformer on the general insertion task (kontext.tiny.pretrain).
    "pretraining": {
        "steps": 5000,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "ema_decay": 0.999,
        "num_samples": 4000,
        "size": 128,
        "area_range": [0.01, 0.5],
        "data_seed": 2024,
        "max_sequence_length": 32,
        "guidance_range": [1.0, 4.0],
        "eval_samples": 16,
        "eval_seed": 4242,
        "eval_steps": 12,
    },
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "t5": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",
    },
    "tokenizers": {"clip_bpe_vocab_size": 1000, "clip_model_max_length": 77, "t5_model_max_length": 512},
    "scheduler": FLUX_KONTEXT_SCHEDULER_CONFIG,
}

# Text the tokenizers are built from: the words of instructions this project's prompts use, so that typical
# prompts tokenise into whole words; anything else still encodes (CLIP via bytes, T5 via single characters).
_CORPUS_WORDS = """
a an the this that these those of in on at into onto over under above below behind beside between near next to
from with without and or but for by as is are be it its place put insert add paint draw show make replace keep
remove change move fill exactly inside outside region area marked mask masked box grey gray placeholder slot
product object item bottle can box jar tube bag pack package carton cup mug glass label band logo star disc
brand kolo soda cola juice water drink orange red green blue yellow white black brown purple pink silver gold
grey dark light bright shiny matte metal metallic plastic paper glass wooden wood table shelf counter floor wall
kitchen room shop store street park beach desk window door background foreground scene photo photograph image
picture studio shot close up view front side top left right center centre middle corner small large big tiny
huge tall short wide narrow size scale same shape contour edge boundary shadow light lighting reflection
realistic natural high quality detailed sharp one two three same product's keep everything else unchanged
""".split()
_CORPUS_SENTENCES = [
    "Insert the Kolo orange soda can (orange body, white label band, blue star logo) into the marked region",
    "Place the product exactly inside the grey region, keep everything else unchanged",
    "a photo of a bottle on a wooden table",
    "put the can on the shelf in the kitchen",
]


# ------------------------------------------------------------------------------------ definition hash


def definition_hash(definition: dict[str, Any] | None = None) -> str:
    """Short hash of everything that determines the built model: definition, corpus, builder and data versions."""
    payload = {
        "definition": TINY_DEFINITION if definition is None else definition,
        "builder_version": BUILDER_VERSION,
        "synthetic_generator_version": GENERATOR_VERSION,
        "corpus": [_CORPUS_WORDS, _CORPUS_SENTENCES],
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ tokenizers


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in byte order (as CLIP's vocab orders them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in range(256)]


def write_clip_tokenizer_files(folder: Path, vocab_size: int = 1000) -> tuple[Path, Path]:
    """Write CLIP-style ``vocab.json`` and ``merges.txt`` learned from the built-in corpus.

    Layout follows openai/clip-vit-large-patch14: ids 0-255 are the byte characters, 256-511 the same with
    the end-of-word marker ``</w>``, then merged tokens in merge order, then ``<|startoftext|>`` and
    ``<|endoftext|>``.

    Returns:
        ``(vocab_path, merges_path)``.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    # The same word splitting as CLIPTokenizer, so learned merges apply to the words it will see.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS_SENTENCES + _CORPUS_WORDS, trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab[token] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` from a hand-built ``vocab.json`` + ``merges.txt`` (pads to 77 like CLIP-L)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_clip_tokenizer_files(Path(tmp), vocab_size)
        return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=model_max_length)


def t5_unigram_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: specials, whole corpus words, then single characters.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5. Whole words score higher than any spelling
    with characters, so corpus words stay single tokens; characters make every other word encodable.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}
    words: list[str] = []
    for text in _CORPUS_SENTENCES + _CORPUS_WORDS:
        for word in text.replace(",", " , ").replace("(", " ( ").replace(")", " ) ").split():
            for form in (word, word.lower(), word.capitalize()):
                if form not in words:
                    words.append(form)
    for rank, word in enumerate(words):
        piece = "▁" + word
        if piece not in seen:
            pieces.append((piece, -5.0 - 0.001 * rank))
            seen.add(piece)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]{}-_+=/\\*&%$#@<>|~`^"
    for c in chars:
        for piece in (c, "▁" + c):
            if piece not in seen:
                pieces.append((piece, -12.0))
                seen.add(piece)
    return pieces


def build_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` over a ``tokenizers`` Unigram model built in code (T5 conventions: ``</s>`` appended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = t5_unigram_vocab()
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


# ---------------------------------------------------------------------------------------------- models


def _make_vae(cfg: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    if cfg["layers_per_block"] == 0 and len(set(cfg["block_out_channels"])) != 1:
        # Without resnets nothing changes the width between blocks, so diffusers' downsamplers would mismatch.
        raise ValueError(
            f"vae.layers_per_block=0 needs equal vae.block_out_channels; got {cfg['block_out_channels']}. "
            "Use equal widths or layers_per_block >= 1."
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        norm_num_groups=cfg["norm_num_groups"],
        sample_size=cfg["sample_size"],
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=cfg["mid_block_add_attention"],
    )


def _vae_images(seed: int, count: int, size: int) -> torch.Tensor:
    """Synthetic training/evaluation images ``[3*count, 3, size, size]`` in [-1, 1].

    For each synthetic triplet: the target (scene with product), the raw context, and the context with the
    mask filled flat neutral grey - what a mask hint draws - so all three kinds reconstruct.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        t = make_triplet(rng, size, size)
        context = np.asarray(t.context, dtype=np.float32)
        inside = np.asarray(t.mask)[..., None] >= 128
        images += [np.asarray(t.target, dtype=np.float32), context, np.where(inside, 127.5, context)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


@torch.no_grad()
def vae_psnr(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``decode(encode(x).mode)`` for ``images`` ``[N, 3, H, W]`` in [-1, 1] -> ``[N]``."""
    latents = vae.encode(images).latent_dist.mode()
    recon = vae.decode(latents).sample.clamp(-1, 1)
    mse = ((recon - images) ** 2).mean(dim=(1, 2, 3)) / 4.0  # /4: errors measured on the [0, 1] scale
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _train_vae(vae: Any, cfg: dict[str, Any], seed: int, progress: bool) -> dict[str, Any]:
    """Train ``vae`` in place to reconstruct synthetic scenes; deterministic for a given seed and thread count.

    Why this recipe: a fixed step budget (not a time budget) keeps builds reproducible; L1 + MSE converges
    faster on flat-coloured synthetic images than MSE alone; the encoder is trained in mode (no sampling,
    no KL) because FLUX training and the Kontext pipeline both encode with ``.mode``; a weak penalty keeps
    latent mean/std near what FLUX's shift/scale factors expect (``(z - 0.1159) * 0.3611`` about unit
    variance), so noise levels in flow matching have their usual meaning.
    """
    from tqdm.auto import tqdm

    images = _vae_images(cfg["data_seed"], cfg["num_scenes"], cfg["scene_size"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    steps, warmup, crop, size = cfg["steps"], cfg["warmup_steps"], cfg["crop"], cfg["scene_size"]
    target_std = 1.0 / FLUX_VAE_SCALING_FACTOR
    vae.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="tiny VAE training", disable=not progress, leave=False)
    loss_value = float("nan")
    for step in bar:
        if step < warmup:
            lr = cfg["lr"] * (step + 1) / warmup
        else:
            lr = cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, images.shape[0], (cfg["batch_size"],), generator=gen)
        # Crops on the VAE's 8-pixel grid keep the latent grid aligned with the full-image one.
        grid = VAE_SCALE_FACTOR
        ox, oy = (int(v) * grid for v in torch.randint(0, (size - crop) // grid + 1, (2,), generator=gen))
        x = images[idx, :, oy : oy + crop, ox : ox + crop]
        if bool(torch.rand((), generator=gen) < 0.5):
            x = x.flip(-1)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        moments = (z.mean() - FLUX_VAE_SHIFT_FACTOR) ** 2 + (z.std() - target_std) ** 2
        (loss + cfg["latent_moment_weight"] * moments).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.detach().item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}")
    vae.eval()
    train_seconds = time.perf_counter() - start

    eval_images = _vae_images(cfg["eval_seed"], cfg["eval_scenes"], cfg["scene_size"])
    psnr = vae_psnr(vae, eval_images)
    kinds = psnr.reshape(-1, 3)  # rows: triplets; columns: target, context, grey-filled context
    with torch.no_grad():
        z = vae.encode(eval_images).latent_dist.mode()
    return {
        "vae_psnr_db": round(float(psnr.mean()), 3),
        "vae_psnr_db_target": round(float(kinds[:, 0].mean()), 3),
        "vae_psnr_db_context": round(float(kinds[:, 1].mean()), 3),
        "vae_psnr_db_grey_fill": round(float(kinds[:, 2].mean()), 3),
        "vae_psnr_eval": f"{cfg['eval_scenes']} held-out synthetic triplets (seed {cfg['eval_seed']}), "
        f"{cfg['scene_size']}x{cfg['scene_size']} px, 3 images each",
        "vae_final_train_loss": round(loss_value, 5),
        "vae_train_steps": steps,
        "vae_train_seconds": round(train_seconds, 1),
        "latent_mean": round(float(z.mean()), 4),
        "latent_std": round(float(z.std()), 4),
        "normalised_latent_std": round(float(((z - FLUX_VAE_SHIFT_FACTOR) * FLUX_VAE_SCALING_FACTOR).std()), 4),
    }


def build_tiny_pipeline(
    output_dir: str | Path,
    seed: int | None = None,
    *,
    definition: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Build the tiny FLUX.1 Kontext and save it in the diffusers layout under ``output_dir``.

    Args:
        output_dir: folder to write (created; existing component folders are overwritten).
        seed: initialisation and VAE-training seed; defaults to the definition's ``seed``.
        definition: component sizes and VAE training recipe; defaults to :data:`TINY_DEFINITION`.
        progress: show a progress bar while the VAE trains.

    Returns:
        ``output_dir`` as a ``Path``; it loads with ``FluxKontextPipeline.from_pretrained(output_dir)`` and
        holds ``build_info.json`` (definition hash, VAE PSNR on held-out synthetic images, build time).
    """
    import diffusers
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    definition = copy.deepcopy(TINY_DEFINITION if definition is None else definition)
    seed = int(definition["seed"] if seed is None else seed)
    definition["seed"] = seed
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tcfg = definition["transformer"]
    if sum(tcfg["axes_dims_rope"]) != tcfg["attention_head_dim"]:
        raise ValueError(
            f"transformer.axes_dims_rope {tcfg['axes_dims_rope']} must sum to attention_head_dim "
            f"{tcfg['attention_head_dim']} (FLUX splits each head's rotary embedding over these axes)"
        )

    tok_cfg = definition["tokenizers"]
    tokenizer = build_clip_tokenizer(tok_cfg["clip_bpe_vocab_size"], tok_cfg["clip_model_max_length"])
    tokenizer_2 = build_t5_tokenizer(tok_cfg["t5_model_max_length"])

    # fork_rng: building must not disturb the caller's global RNG stream (tests, training seeds).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_cfg = definition["clip"]
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **clip_cfg,
            )
        )
        torch.manual_seed(seed + 1)
        t5_cfg = definition["t5"]
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
                **t5_cfg,
            )
        )
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(**{**tcfg, "axes_dims_rope": tuple(tcfg["axes_dims_rope"])})
        torch.manual_seed(seed + 3)
        vae = _make_vae(definition["vae"])
        vae_info = _train_vae(vae, definition["vae_training"], seed + 4, progress)

    scheduler = FlowMatchEulerDiscreteScheduler(**definition["scheduler"])
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pre_info: dict[str, Any] = {}
    pre = definition.get("pretraining")
    if pre and pre["steps"] > 0:
        with torch.random.fork_rng(devices=[]):
            pre_info = pretrain_transformer(transformer, pipe, pre, seed + 5, progress)
            quality = insertion_quality(
                pipe, pre["eval_samples"], pre["eval_seed"], pre["eval_steps"], pre["size"], pre["max_sequence_length"]
            )
        pre_info["insertion_quality"] = quality
        pre_info["insertion_quality_eval"] = (
            f"{pre['eval_samples']} held-out insertion samples (seed {pre['eval_seed']}), {pre['size']} px, fill hint, "
            f"{pre['eval_steps']} sampler steps, guidance 2.5"
        )
    pipe.save_pretrained(output_dir, safe_serialization=True)

    info = {
        "definition_hash": definition_hash(definition),
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        # The prompt length the transformer was trained with: longer prompts at use feed it padding tokens it
        # never saw (kontext.runtime.model_path.text_length_warning reads this key).
        **({TRAINED_TEXT_LENGTH_KEY: pre["max_sequence_length"]} if pre_info else {}),
        **vae_info,
        **pre_info,
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "definition": definition,
        "note": "Tiny pretrained FLUX.1 Kontext (synthetic insertion task) for tests, benchmarks and the embedded "
        "default; real use: black-forest-labs/FLUX.1-Kontext-dev.",
    }
    # Written last: its presence marks a complete build (see tiny_model_path).
    (output_dir / "build_info.json").write_text(json.dumps(info, indent=1))
    logger.info("built tiny FLUX.1 Kontext in %s (VAE PSNR %.2f dB)", output_dir, info["vae_psnr_db"])
    if "insertion_quality" in info:
        logger.info("insertion on held-out samples: %s", info["insertion_quality"])
    return output_dir


# --------------------------------------------------------------------------------------------- caching


def committed_matches(definition: dict[str, Any] | None = None) -> bool:
    """True if the committed folder holds a complete build of ``definition`` (default :data:`TINY_DEFINITION`)."""
    info = COMMITTED_DIR / "build_info.json"
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("definition_hash") == definition_hash(definition)
    except (OSError, json.JSONDecodeError):
        return False


def tiny_model_path(
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    definition: dict[str, Any] | None = None,
) -> Path:
    """Folder of the tiny FLUX.1 Kontext: the committed build when it matches the definition, else a cached build.

    With the default definition this is the committed ``kontext/tiny/tiny_flux_kontext`` (no build). Otherwise the
    folder is ``<cache_dir>/tiny-flux-kontext-<hash>``, the hash covering the model definition and builder
    version, so a changed definition builds a new folder and an unchanged one is reused. Concurrent callers
    (for example two accelerate ranks) are safe: one builds into a temporary folder under a lock and renames
    it into place atomically; the others wait for the lock and then reuse it.

    Args:
        cache_dir: cache root; defaults to :func:`kontext.runtime.model_path.cache_root`.
        progress: show a progress bar if a build is needed.
        definition: override :data:`TINY_DEFINITION` (tests use a cheaper one).

    Returns:
        The model folder, loadable with ``FluxKontextPipeline.from_pretrained``.
    """
    if committed_matches(definition):
        return COMMITTED_DIR
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    name = f"tiny-flux-kontext-{definition_hash(definition)}"
    final = cache / name
    if (final / "build_info.json").is_file():
        return final
    with exclusive_lock(cache / f".{name}.lock"):
        if (final / "build_info.json").is_file():  # another process finished while we waited
            return final
        logger.info("building the tiny FLUX.1 Kontext into %s (once; about a minute on 2 CPU cores)", final)
        # A folder without build_info.json (an interrupted build of an older, non-atomic layout) is replaced.
        with atomic_folder(final) as tmp:
            build_tiny_pipeline(tmp, definition=definition, progress=progress)
    return final



def resolve_model_path(name_or_path: str, option: str = "model.pretrained_model_name_or_path") -> str:
    """A model reference as a loadable one: ``tiny`` -> the tiny model's folder (:func:`tiny_model_path`); a folder ->
    its absolute path (it must hold ``model_index.json``); ``owner/name`` -> unchanged (a hub id). ``option`` names
    the setting in errors (:class:`kontext.runtime.model_path.ModelPathError`)."""
    if name_or_path == "tiny":
        return str(tiny_model_path())
    return resolve_local_or_hub(name_or_path, option)

def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m kontext.tiny.model [--out DIR] [--seed N] [--cache-dir DIR]``; prints the folder."""
    parser = argparse.ArgumentParser(description="Build (or locate) the tiny pretrained FLUX.1 Kontext.")
    parser.add_argument(
        "--out", help="build into this folder (default: print the committed folder, or build the cache's if it differs)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed (only with --out; default 0)")
    parser.add_argument("--cache-dir", help="cache root (default: $KONTEXT_LORA_CACHE or ~/.cache/kontext-lora)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out:
        if where := file_in_the_way(args.out):  # before the build, which trains for minutes
            parser.error(f"--out {args.out} {where}; name a folder to build into")
        try:
            with writing(args.out, "the tiny model"):
                path = build_tiny_pipeline(args.out, seed=args.seed)
        except WriteError as e:
            parser.exit(2, f"error: {e}\n")
    else:
        if args.seed is not None:
            parser.error("--seed needs --out: the cached model is always built with the definition's seed")
        path = tiny_model_path(args.cache_dir)
    info = json.loads((Path(path) / "build_info.json").read_text())
    print(f"{path}\nVAE PSNR {info['vae_psnr_db']:.2f} dB on held-out synthetic images; built in {info['build_seconds']} s")
    if "insertion_quality" in info:
        q = info["insertion_quality"]
        print(
            f"insertion ({info['insertion_quality_eval']}): IoU {q['iou']:.3f}, |log area ratio| "
            f"{q['area_log_error']:.3f}, PSNR outside {q['psnr_outside']:.2f} dB, inside {q['psnr_inside']:.2f} dB"
        )


if __name__ == "__main__":
    main()
