"""A ~100M-parameter Llama checkpoint, loaded and run by microattn and by transformers on
the same CPU, in one process (issue 15's targets: loads in under 10 s; tokens/s beside
transformers').

1. transformers makes the checkpoint (random weights, its own initialisation) and saves it
   with ``save_pretrained`` to a temporary directory: ``LlamaForCausalLM``, vocab 32000,
   hidden 768, 12 layers, 12 heads (no GQA), intermediate 2048, head tied to the embedding
   (109.5M parameters; ``--untied``: 134.1M), float32, one ``model.safetensors``.
2. Load: ``microattn.models.from_pretrained`` and transformers'
   ``AutoModelForCausalLM.from_pretrained`` (dtype float32), alternately, ``--repeats``
   times each; median [min-max] seconds. The file is in the page cache for both (it was
   just written): these are the loaders' own costs, not the disk's.
3. Generation: greedy, batch 1, ``--new`` tokens (32) after a ``--prompt`` token (32)
   random prompt: ``model.generate(prompt, 32)`` against transformers'
   ``generate(do_sample=False, max_new_tokens=32, min_new_tokens=32)`` (no end-of-sequence
   stop), interleaved repetition by repetition after one untimed call each. Tokens/s =
   new tokens / the call's wall time (the prompt's pass included), median [min-max], and
   the ratio of the medians (above 1: microattn is faster). Whether the two produced the
   same greedy tokens is printed too (random weights give close logits, so a float32
   rounding difference may flip a near-tie).

Threads: each library its own default (BLAS's and torch's), printed; ``--one-thread``
runs both on one thread (``torch.set_num_threads(1)``; OpenBLAS pinned by
``microattn.kernels.blas.single_threaded`` and numba's threads set to 1), which compares
the work without the waiting. The CPU pressure (PSI) is printed at the start and end: on a
shared machine it moves every figure (PyTorch's OpenMP threads spin at each barrier while
a core is taken; see docs/performance.md).

Usage::

    python benchmarks/compare_models.py                  # ~2 minutes on 2 cores
    python benchmarks/compare_models.py --one-thread
    python benchmarks/compare_models.py --repeats 3 --untied
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch
import transformers

from microattn import models
from microattn.kernels import blas


def cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].replace("avg10=", "CPU pressure (PSI avg10) ") + "%"
    except (OSError, IndexError):
        return "CPU pressure unknown"


def summary(values, fmt="{:.3g}") -> str:
    values = np.asarray(values)
    return f"{fmt.format(np.median(values))} [{fmt.format(values.min())}-{fmt.format(values.max())}]"


def make_checkpoint(directory: str, tied: bool) -> int:
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def time_loads(directory: str, repeats: int) -> tuple[list, list]:
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model = models.from_pretrained(directory)
        ours.append(time.perf_counter() - start)
        del model
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        theirs.append(time.perf_counter() - start)
        del model
    return ours, theirs


def time_generation(directory: str, prompt_len: int, new: int, repeats: int):
    ours_model = models.from_pretrained(directory)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    theirs_model.generation_config.eos_token_id = None
    theirs_model.generation_config.pad_token_id = 0
    prompt = np.random.default_rng(1).integers(0, 32000, prompt_len)
    prompt_t, mask = torch.tensor(prompt[None]), torch.ones((1, prompt_len), dtype=torch.long)

    def ours():
        return ours_model.generate(prompt, new)

    def theirs():
        with torch.no_grad():
            return theirs_model.generate(prompt_t, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                         min_new_tokens=new)[0].numpy()

    ours_tokens, theirs_tokens = ours(), theirs()  # untimed first calls (and the comparison)
    times = {"ours": [], "theirs": []}
    for _ in range(repeats):
        for name, call in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times, ours_tokens, theirs_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new", type=int, default=32, help="new tokens (default 32)")
    parser.add_argument("--untied", action="store_true", help="a separate lm_head (134.1M parameters)")
    parser.add_argument("--one-thread", action="store_true", help="both libraries on one thread")
    args = parser.parse_args(argv)
    with blas.single_threaded() if args.one_thread else contextlib.nullcontext():
        if args.one_thread:
            import numba

            torch.set_num_threads(1)
            numba.set_num_threads(1)
        run(args)


def run(args):
    threads = "one thread each" if args.one_thread else "each library's default threads"
    print(f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, {threads}; {cpu_pressure()} at start", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        count = make_checkpoint(directory, tied=not args.untied)
        size = os.path.getsize(os.path.join(directory, "model.safetensors"))
        print(f"checkpoint: Llama, {count / 1e6:.1f}M parameters, float32, model.safetensors {size / 2**20:.0f} MiB",
              flush=True)

        ours, theirs = time_loads(directory, args.repeats)
        print(f"\nload, seconds, median [min-max] of {args.repeats}:")
        print(f"  microattn.models.from_pretrained        {summary(ours)}")
        print(f"  transformers AutoModelForCausalLM       {summary(theirs)}", flush=True)

        times, ours_tokens, theirs_tokens = time_generation(directory, args.prompt, args.new, args.repeats)
        rate = {name: args.new / np.asarray(seconds) for name, seconds in times.items()}
        same = np.array_equal(ours_tokens, theirs_tokens)
        where = "" if same else f" (first difference at new token {int(np.argmax(ours_tokens != theirs_tokens)) - args.prompt})"
        print(f"\ngreedy generation, batch 1, {args.new} new tokens after {args.prompt}; tokens/s, "
              f"median [min-max] of {args.repeats}:")
        print(f"  microattn     {summary(rate['ours'], '{:.1f}')}")
        print(f"  transformers  {summary(rate['theirs'], '{:.1f}')}")
        print(f"  ratio microattn / transformers: {np.median(rate['ours']) / np.median(rate['theirs']):.2f}")
        print(f"  same greedy tokens: {'yes' if same else 'no'}{where}")
    print(f"\n{cpu_pressure()} at the end")


if __name__ == "__main__":
    main()
