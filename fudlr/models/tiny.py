"""A tiny random Llama with its own byte-level BPE tokenizer, built offline in seconds.

Tests and quick checks need a real causal LM with the same code paths as SmolLM2
(LlamaForCausalLM, q_proj/v_proj, a fast tokenizer) but none of its cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fudlr.data.prompts import MOVIES
from fudlr.models.store import ModelManifest, write_manifest

EOS = "<|endoftext|>"
_BASE_CORPUS = (
    "the a an of and to in is was for on with as by at from it this that movie film story "
    "love man woman night day world life king return war star city house black white "
    "American Part II III The Les La Le Die Der (1995) (1996) (1997) (1998) (1990) (1980)"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama; small enough that a training step takes milliseconds.

    vocab_size: BPE vocabulary learnt from the corpus (bytes + merges + EOS).
    initializer_range: std of the random weights; well above Llama's 0.02 so that the
    tied embeddings can produce peaked logits and a LoRA on q/v can visibly learn.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 512
    initializer_range: float = 0.2
    seed: int = 0


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE: any text encodes; merges learnt on `corpus` keep sequences short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def build_tiny_model(
    out_dir: Path, config: TinyModelConfig = TinyModelConfig(), corpus: Iterable[str] = ()
) -> ModelManifest:
    """Write a random Llama + tokenizer to `out_dir`; same config and corpus give the same bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [_BASE_CORPUS, MOVIES.prompt(["Title (1995)"]), *corpus]
    tokenizer = build_tokenizer(texts, config.vocab_size)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=config.initializer_range,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return write_manifest(out_dir, "tiny-llama", {"kind": "random", **config.__dict__})
