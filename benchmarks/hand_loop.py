"""Benchmark: the limit for a real-model round, a hand-written single-process GRPO loop, beside
rlhf-ray's own round, in process and on a local Ray, from one run.

What it measures
    ``jobs/arithmetic_cpu.yaml``'s round with micro-batches of 8 rows (``ppo.micro_batch_size=8``):
    SmolLM2-135M-Instruct in float32, 8 arithmetic prompts x 4 samples, 24 new tokens at
    temperature 0.7, one epoch of 2 minibatches of 16 rows, a clipped loss plus a k3 KL term
    (coefficient 0.01, ``seq_mean_token_mean``), gradient clipping at 1.0, AdamW (lr 1e-5).
    The hand loop does exactly that work with nothing but transformers and torch:

    generate  HF ``generate`` (do_sample, temperature 0.7, no top-k) on the policy itself
    score     no-grad forwards of the reference and of the policy (old log-probs), 16 rows each,
              logits of the response positions only (``logits_to_keep``); the reward
    advantage group-normalised rewards (GRPO), one per sequence
    update    one backward per micro-batch of 8 rows, ``clip_grad_norm_`` and ``AdamW.step``
              per minibatch

    It has no sync phase (it samples with the trained model) and no run dir. Each figure is
    the median of rounds 1-4 (round 0 warms up); rlhf-ray's come from its ``metrics.jsonl``
    (``benchmarks/real_round.py``'s ``run_setup``), with the same rounds.

    rlhf-ray's setups (``SETUPS``): in process with its default engine (auto: torch AdamW for
    this one float32 rank), the torch or the DeepSpeed engine; on a local Ray of 2 CPUs with
    the job's own topology (one actor per role), whose phases get the CPUs the run holds
    (``cluster.phase_threads``, ``rlhf_ray/distributed/threads.py``), and the same with every
    actor on its CPU share of threads (``share threads``, the behaviour before).

Output
    A table of seconds per phase, each setup a column, and the ratio of each to the hand loop;
    then ONE JSON line with every figure. The load average is printed beside it (2 shared
    cores: compare only figures from one run).

How to run (from the repository root)
    python benchmarks/hand_loop.py                  # the hand loop alone
    python benchmarks/hand_loop.py --compare        # + rlhf-ray: every setup of SETUPS
    python benchmarks/hand_loop.py --compare \
        --setups "rlhf-ray default,rlhf-ray on Ray,rlhf-ray on Ray (share threads)"
    git archive REV | tar -x -C /tmp/before          # + the same of an older revision, first
    python benchmarks/hand_loop.py --compare --before /tmp/before --setups "rlhf-ray default"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, median, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES, NEW_TOKENS, TEMPERATURE = 8, 4, 24, 0.7
MINIBATCH, MICRO, SCORE_ROWS = 16, 8, 16
CLIP_EPS, KL_COEF, LR, GRAD_CLIP = 0.2, 0.01, 1.0e-5, 1.0
PHASES = ("generate", "score", "advantage", "update", "round")
SETUPS = {  # column -> placement, overrides of jobs/arithmetic_cpu.yaml (besides the micro-batch)
    "rlhf-ray default": ("inprocess", []),  # the job's engine: auto
    "rlhf-ray torch": ("inprocess", ["policy.engine=torch"]),
    "rlhf-ray deepspeed": ("inprocess", ["policy.engine=deepspeed"]),
    "rlhf-ray on Ray": ("ray", []),  # the job's topology: one actor per role on 2 CPUs
    "rlhf-ray on Ray (share threads)": ("ray", ["cluster.phase_threads=false"]),
}


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def response_logprobs(model, ids, mask, prompt_len: int) -> torch.Tensor:
    """Log-probs ``(B, R)`` of the response tokens: the logits of the last R + 1 positions."""
    R = ids.shape[1] - prompt_len
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions, logits_to_keep=R + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float() / TEMPERATURE, -1)
    return logp.gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


class HandLoop:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf_ray.data.arithmetic import arithmetic_rows

        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        load = dict(dtype=torch.float32)
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, **load).train()
        self.reference = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LR)
        self.rows = arithmetic_rows()
        self.eos = self.tok.eos_token_id

    @torch.no_grad()
    def generate(self, index: int) -> dict:
        rows = self.rows[index * PROMPTS : (index + 1) * PROMPTS]
        chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        texts = [
            self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chats
        ]
        enc = self.tok(
            [t for t in texts for _ in range(SAMPLES)], return_tensors="pt", padding=True
        )
        out = self.policy.generate(
            **enc,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=self.eos,
        )
        P = enc["input_ids"].shape[1]
        response = out[:, P:]
        response = torch.nn.functional.pad(
            response, (0, NEW_TOKENS - response.shape[1]), value=self.eos
        )
        ended = (response == self.eos).long().cumsum(1)
        response_mask = ((ended - (response == self.eos).long()) == 0).long()  # through 1st EOS
        response = torch.where(response_mask.bool(), response, self.eos)
        labels = [r["label"] for r in rows for _ in range(SAMPLES)]
        return {
            "ids": torch.cat([enc["input_ids"], response], 1),
            "mask": torch.cat([enc["attention_mask"], response_mask], 1),
            "response_mask": response_mask.float(),
            "prompt_len": P,
            "labels": labels,
        }

    @torch.no_grad()
    def score(self, b: dict) -> None:
        from rlhf_ray.rewards.arithmetic import last_number_matches

        for key, model in (("ref", self.reference), ("old", self.policy)):
            parts = [
                response_logprobs(
                    model,
                    b["ids"][i : i + SCORE_ROWS],
                    b["mask"][i : i + SCORE_ROWS],
                    b["prompt_len"],
                )
                for i in range(0, len(b["ids"]), SCORE_ROWS)
            ]
            b[key] = torch.cat(parts) * b["response_mask"]
        texts = self.tok.batch_decode(b["ids"][:, b["prompt_len"] :], skip_special_tokens=True)
        b["rewards"] = torch.tensor(last_number_matches([""] * len(texts), texts, b["labels"]))

    def advantage(self, b: dict) -> None:
        groups = b["rewards"].view(-1, SAMPLES)
        adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)
        b["adv"] = adv.flatten().unsqueeze(1) * b["response_mask"]

    def update(self, b: dict, index: int) -> None:
        perm = torch.randperm(len(b["ids"]), generator=torch.Generator().manual_seed(index))
        for start in range(0, len(perm), MINIBATCH):
            for first in range(start, start + MINIBATCH, MICRO):
                rows = perm[first : first + MICRO]
                mask = b["response_mask"][rows]
                logp = response_logprobs(
                    self.policy, b["ids"][rows], b["mask"][rows], b["prompt_len"]
                )
                ratio = torch.exp((logp - b["old"][rows]).clamp(-20, 20))
                adv = b["adv"][rows]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
                d = b["ref"][rows] - logp
                k3 = torch.exp(d) - d - 1
                loss = seq_mean_token_mean(pg, mask) + KL_COEF * seq_mean_token_mean(k3, mask)
                (loss * MICRO / MINIBATCH).backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def round(self, index: int) -> dict[str, float]:
        marks = [time.perf_counter()]
        batch = self.generate(index)
        marks.append(time.perf_counter())
        self.score(batch)
        marks.append(time.perf_counter())
        self.advantage(batch)
        marks.append(time.perf_counter())
        self.update(batch, index)
        marks.append(time.perf_counter())
        times = {p: b - a for p, a, b in zip(PHASES, marks, marks[1:], strict=False)}
        return {**times, "round": marks[-1] - marks[0]}


def run_hand_loop(rounds: int) -> dict[str, float]:
    from rlhf_ray.models.sources import resolve_model_source

    torch.manual_seed(0)
    loop = HandLoop(resolve_model_source("builtin:smollm2-135m-instruct"))
    per_phase: dict[str, list[float]] = defaultdict(list)
    for index in range(rounds):
        times = loop.round(index)
        print(f"round {index}: " + json.dumps(times), file=sys.stderr, flush=True)
        for phase, seconds in times.items():
            per_phase[phase].append(seconds)
    return {f"{p}_s": median(per_phase[p][1:] or per_phase[p]) for p in PHASES}


def hand_loop_subprocess(rounds: int) -> dict[str, float]:
    """The hand loop in a fresh process (as the CLI runs), its JSON line back."""
    cmd = [sys.executable, __file__, "--rounds", str(rounds), "--json-only"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rounds: int, setups: list[str], before: Path | None) -> dict:
    """rlhf-ray's ``setups`` (and with ``before``, a source tree of an older revision, its
    default-engine and torch-engine rounds first), then the hand loop; each in its own
    process, one after the other."""
    from real_round import run_setup

    runs = [(name, *SETUPS[name], REPO) for name in setups]
    if before is not None:  # its LearnerConfig default was deepspeed
        old = [("before: default", "inprocess", ["policy.engine=deepspeed"], before)]
        runs = [*old, ("before: torch", "inprocess", ["policy.engine=torch"], before), *runs]
    results: dict = {}
    for name, placement, overrides, repo in runs:
        out = run_setup("hf", placement, rounds, [*overrides, "ppo.micro_batch_size=8"], repo)
        results[name] = {**out, "load": os.getloadavg()[0]}
    results["hand loop"] = {**hand_loop_subprocess(rounds), "load": os.getloadavg()[0]}
    return results


def print_table(results: dict) -> None:
    names = list(results)
    hand = results["hand loop"]
    rows = [[p] + [results[n].get(f"{p}_s", float("nan")) for n in names] for p in PHASES]
    rows += [
        [f"{p} / hand"] + [results[n].get(f"{p}_s", float("nan")) / hand[f"{p}_s"] for n in names]
        for p in ("update", "round")
    ]
    rows.append(["load (1 min)"] + [results[n]["load"] for n in names])
    print(table(["s (median of rounds 1-)", *names], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="rlhf-ray's rounds beside it")
    parser.add_argument("--setups", default=",".join(SETUPS), help="with --compare")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="with --compare: a source tree of an older revision (git archive REV | tar -x -C "
        "DIR), whose default-engine and torch-engine rounds come first",
    )
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json_only:
        print(json.dumps(run_hand_loop(args.rounds)))
        return 0
    banner("a real-model round: rlhf-ray in process against a hand-written loop")
    if args.compare:
        results = compare(args.rounds, args.setups.split(","), args.before)
    else:
        results = {"hand loop": {**run_hand_loop(args.rounds), "load": os.getloadavg()[0]}}
    print_table(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
