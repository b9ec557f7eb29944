"""Text generation from a checkpoint with the model's KV cache: greedy, temperature and top-k sampling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from nmoe.train.inference import autocast, eval_mode


@torch.no_grad()
def generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Token ids generated after `prompt` (ids, non-empty), at most max_new_tokens, stopping after stop_id.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the top_k
    most likely tokens (top_k 0: all), drawn from a generator seeded with `seed` (same seed, same text).
    """
    if not prompt:
        raise ValueError("the prompt is empty: pass at least one token (e.g. the bos token)")
    if temperature < 0 or top_k < 0 or max_new_tokens < 0:
        raise ValueError("temperature, top_k and max_new_tokens must be >= 0")
    needed = len(prompt) + max_new_tokens
    if needed > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len "
            f"({model.cfg.max_seq_len}); shorten one of them"
        )
    device = model.tok_emb.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, max(needed, 1))
    out: list[int] = []
    with eval_mode(model), autocast(device):
        logits = model.decode(torch.tensor([list(prompt)], device=device), cache)[0, -1]
        for step in range(max_new_tokens):
            token = _pick(logits, temperature, top_k, gen)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token == stop_id or step == max_new_tokens - 1:
                break
            logits = model.decode(torch.tensor([[token]], device=device), cache)[0, -1]
    return out


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """Next token from logits[V] float32."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmoe-sample",
        description="Generate text from an nmoe checkpoint (KV-cached decoding).",
        epilog='example: uv run nmoe-sample runs/checkpoints/tiny --prompt "The expert router" --temperature 0.8 --top-k 50',
    )
    p.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory or a run's checkpoint folder (its latest)")
    p.add_argument("--prompt", required=True, help="text to continue (the bos token is put before it)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda if available)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the run's data.tokenizer)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nmoe.train.inference import LoadError, load_model, pick_device

    try:
        device = pick_device(args.device)
        _, model, tok = load_model(args.checkpoint, device, args.tokenizer)
        prompt = [tok.bos_id, *tok.encode(args.prompt)]
        printer = _StreamPrinter(tok)
        sys.stdout.write(args.prompt)
        generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            stop_id=tok.bos_id,  # the document separator: the model ended the text
            on_token=printer,
        )
    except (LoadError, ValueError) as e:
        print(f"\nnmoe-sample: error: {e}", file=sys.stderr)
        return 2
    printer.flush()
    sys.stdout.write("\n")
    return 0


class _StreamPrinter:
    """Writes the text of the tokens so far as they arrive (a token may end in the middle of a character)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, token: int) -> None:
        if token == self.tok.bos_id:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.shown :])
            sys.stdout.flush()
            self.shown = len(text)

    def flush(self) -> None:
        text = self.tok.decode(self.ids)
        sys.stdout.write(text[self.shown :])


if __name__ == "__main__":
    sys.exit(main())
