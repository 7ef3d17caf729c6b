"""
sample.py -- generate text from any checkpoint the recipe writes: a float model (train.py, pretrained.py) or a
palettized one (palettize.py), with or without an adapter (lora.py). Generation is model.Transformer.generate
(a KV cache; greedy, or temperature with top-k); this file only loads the checkpoint and tokenizes.

    python sample.py                                                   # out/ckpt.pt, a prompt from its corpus
    python sample.py --ckpt out/palettized.pt --adapter out/adapter_recovery.pt --prompt "And God said"
    python sample.py --ckpt out/smollm2/ckpt.pt --chat "What is the capital of France?"
"""
import argparse

import torch

from data import DataError, corpus_from_checkpoint, decode, encode, load_text, tokenizer_from_checkpoint
from lora import AdapterError, load_adapter
from plumbing import CheckpointError
from palettize import load_float_or_palettized


def main(argv=None) -> str:
    """Print (and return) the text generated from the prompt, or the answer to --chat."""
    ap = argparse.ArgumentParser(description="Generate text from a float or palettized checkpoint.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint of train, pretrained or palettize.py")
    ap.add_argument("--adapter", help="an adapter of lora.py on that (palettized) base")
    ap.add_argument("--prompt", help="text to continue (default: the start of the model's corpus)")
    ap.add_argument("--chat", help="a question, in the chat template of a pretrained.py checkpoint; greedy")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    a = ap.parse_args(argv)
    try:
        if a.max_new_tokens < 1:
            raise DataError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
        model, ckpt = load_float_or_palettized(a.ckpt)
        if a.adapter:
            load_adapter(a.adapter, model)
        tokenizer = tokenizer_from_checkpoint(ckpt)
        if a.chat is not None:
            if tokenizer is None:
                raise DataError(f"{a.ckpt}: --chat needs a checkpoint with a chat vocabulary (pretrained.py)")
            from pretrained import chat_answer
            text = chat_answer(model, tokenizer, a.chat, a.max_new_tokens)
        else:
            prompt = a.prompt if a.prompt is not None else load_text(corpus_from_checkpoint(ckpt))[:24]
            prompt = encode(prompt, tokenizer).long()[None]                     # (1, T)
            if prompt.shape[1] == 0:
                raise DataError("--prompt is empty: give at least one token to continue")
            if (n := min(a.max_new_tokens, model.config.max_seq_len - prompt.shape[1])) < 1:
                raise DataError(f"--prompt of {prompt.shape[1]} tokens leaves no room in the model's context "
                                f"of {model.config.max_seq_len}")
            out = model.generate(prompt, n, a.temperature, a.top_k, torch.Generator().manual_seed(a.seed))
            text = decode(out[0], tokenizer)
    except (CheckpointError, AdapterError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    main()
