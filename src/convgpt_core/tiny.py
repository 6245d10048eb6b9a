"""Random-weight ConvGPT checkpoints in the published layout, built offline.

``make_checkpoint`` writes ``config.json``, ``generation_config.json``,
``model.safetensors`` and tokenizer files (a byte-level BPE trained here with
``tokenizers`` on text shipped in this package, with a ChatML chat template).
Weights are scaled so that every part of the network matters to the output (decoder
sublayers contribute O(1) to the residual) and logits have a spread of several units,
so greedy decoding has clear margins instead of near-ties.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from typing import Any

import torch

from .checkpoint import WEIGHTS_NAME, expected_tensors
from .config import ARCHITECTURE, PUBLISHED, ConvGPTConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=256,  # F = 16, e = 2, D = 64
    conv_kernel_h_w=3,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # CPU attention backends need head_dim >= 32
    intermediate_size=128,
    max_position_embeddings=1024,
    rope_theta=10000.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY, tie_word_embeddings=True),
    "tiny-untied": dict(_TINY, tie_word_embeddings=False),
    "tiny-sliding": dict(
        _TINY,
        tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    ),
    "published": PUBLISHED,
}
PRESET_DTYPES = {"published": torch.bfloat16}


def corpus_lines() -> list[str]:
    text = resources.files("convgpt_core").joinpath("data/corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with at most ``vocab_size`` entries, trained on the shipped corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_lines()
    tok.train_from_iterator(lines * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_weights(
    config: ConvGPTConfig, seed: int, dtype: torch.dtype, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Random tensors for every name of :func:`expected_tensors`, scaled for clear margins
    (``progress``: a progress bar over the tensors, for the large presets)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    logit_spread = 4.0
    items = expected_tensors(config).items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="random weights", unit="tensor", leave=False)
    for name, shape in items:
        if name == "model.norm_emb.g":
            t = 1.0 + 0.25 * torch.rand(shape, generator=gen)
        elif len(shape) == 1:  # RMSNorm weights: near one, but not one
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.conv.weight":
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1] * shape[3])
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            # Output logits are (RMS-1 hidden) . row, so rows of this scale spread logits.
            t = torch.randn(shape, generator=gen) * logit_spread / math.sqrt(shape[1])
        else:  # linear (out, in): unit-variance outputs
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        out[name] = t.to(dtype).contiguous()
    return out


def make_checkpoint(
    out_dir: str,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    **overrides: Any,
) -> ConvGPTConfig:
    """Write a random-weight checkpoint of ``preset`` (fields replaced by ``overrides``)."""
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    dtype = dtype or PRESET_DTYPES.get(preset, torch.float32)
    fields = dict(PRESETS[preset], **overrides)
    tokenizer = build_tokenizer(fields["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = ConvGPTConfig(
        **fields,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|pad|>"],
        bos_token_id=None,
        architectures=[ARCHITECTURE],
        dtype=str(dtype).removeprefix("torch."),
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(
            {
                "eos_token_id": [ids["<|endoftext|>"], ids["<|im_end|>"]],
                "pad_token_id": ids["<|pad|>"],
                "do_sample": False,
            },
            f,
            indent=2,
        )
    tokenizer.save_pretrained(out_dir)
    weights = random_weights(config, seed, dtype, progress)
    save_file(weights, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    return config


def train_on_corpus(out_dir: str, steps: int = 100, lr: float = 3e-3, seed: int = 0, log=None) -> float:
    """Fit the checkpoint in ``out_dir`` to the shipped corpus (next-token loss over every
    line, full batch, AdamW, float32 on the CPU) and overwrite its weights; returns the last
    loss.  A fixed number of steps, so the result does not depend on the machine's speed.

    A model trained so continues a line of the corpus from its first words, which lets an
    end-to-end test tell a working serving stack from a broken one by reading the answer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .modeling import ConvGPTForCausalLM

    torch.manual_seed(seed)
    model = ConvGPTForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    tok = AutoTokenizer.from_pretrained(out_dir)
    rows = [tok(line)["input_ids"] + [tok.eos_token_id] for line in corpus_lines()]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % 10 == 0 or step == steps - 1):
            log(step + 1, steps, loss.item())
    names = expected_tensors(model.config)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}
    save_file(state, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    return loss.item()
