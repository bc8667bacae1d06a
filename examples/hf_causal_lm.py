"""Two Hugging Face causal language models of different families trained together, token by token.

A GPT-2-style and a Llama-style model built from ``transformers`` configs (nothing is downloaded),
of comparable size, on byte-level tokens (the vocabulary is the 256 byte values). Inputs are token
ids ``[B, T]``, the members return ``.logits`` ``[B, T, V]`` (``class_dim=-1``), ``shift_targets=True``
makes position t learn the byte at t + 1 (labels are the ids, as Hugging Face's), and with
``granularity="position"`` the member with the lower cross-entropy at a token teaches the other there,
by the generalized Jensen-Shannon divergence (``KL(divergence="jsd")``, TRL's GKD loss).
``result.scalars()`` is logged every step.

Text: Tiny Shakespeare from ``--data`` (default: ``$TINYSHAKESPEARE``, or the first
``shared/data/tinyshakespeare/input.txt`` beside the repository); ``--smoke`` uses this docstring.

    python examples/hf_causal_lm.py --smoke    # three steps on a few hundred bytes, CPU
"""

import argparse
import os
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from competitive import KL, CompetitiveGroup


def find_text(given: Path | None) -> Path:
    if given is not None or os.environ.get("TINYSHAKESPEARE"):
        return Path(given or os.environ["TINYSHAKESPEARE"])
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "data" / "tinyshakespeare" / "input.txt"
        if candidate.exists():
            return candidate
    raise SystemExit("Tiny Shakespeare not found: pass --data PATH or set TINYSHAKESPEARE (or use --smoke).")


def members(width: int = 128, layers: int = 2, context: int = 128) -> list[torch.nn.Module]:
    gpt2 = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=4, bos_token_id=0,
                      eos_token_id=0)  # fmt: skip
    llama = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return [GPT2LMHeadModel(gpt2), LlamaForCausalLM(llama)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="three steps on this docstring's bytes")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device of the members and batches (default: cuda when available)")
    args = p.parse_args(argv)
    steps, context, batch = (3, 32, 4) if args.smoke else (args.steps, args.context, args.batch)
    text = (__doc__ or "").encode() if args.smoke else find_text(args.data).read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    torch.manual_seed(0)
    nets = [n.to(args.device) for n in members(width=32 if args.smoke else 128, context=context)]
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in nets]
    group = CompetitiveGroup(
        nets, optimizers, class_dim=-1, shift_targets=True, granularity="position", terms=[KL(divergence="jsd")],
        warmup_steps=0 if args.smoke else 50,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    log = []
    for step in range(steps):
        start = torch.randint(0, len(data) - context, (batch,), generator=generator)
        ids = torch.stack([data[s : s + context] for s in start.tolist()]).to(args.device)
        result = group.step((ids, ids))  # labels = the ids; the group shifts them
        log.append(result.scalars())
        if step % 20 == 0 or step == steps - 1:
            s = log[-1]
            print(
                f"step {step + 1}: ce {s['ce/0']:.3f} (gpt2) / {s['ce/1']:.3f} (llama) nats per byte, jsd "
                f"{s['kl/0']:.4f} / {s['kl/1']:.4f}, tokens taught {s['teacher_share/0']:.2f} / "
                f"{s['teacher_share/1']:.2f}",
                flush=True,
            )
    print(f"stats {group.stats}")
    return {"log": log, "teacher": result.teacher, "ids": ids, "stats": group.stats}


if __name__ == "__main__":
    main()
