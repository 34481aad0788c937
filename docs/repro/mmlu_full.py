"""Full MMLU (14,042 questions, real tokenizer) on the 13M hub-shaped OLMo: the shared-prefix picks
against the whole-prompt path (the pre-issue-23 code path, unchanged), and the logits' max difference."""
import json, sys, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
import data, evaluation, lume
model, tok = lume.load_pretrained(sys.argv[1]); model.eval()
dev, test = data.load_mmlu(ROOT.parent / "shared" / "mmlu")
max_len = min(evaluation.MMLU_MAX_TOKENS, model.config.max_position_embeddings)
res = {"questions": 0, "pick_diffs": 0, "max_abs_logit_diff": 0.0, "whole_path_questions": 0, "t_shared": 0.0, "t_whole": 0.0}
with torch.inference_mode():
    for s in sorted(test):
        qs, shots = test[s], dev[s]
        enc = [evaluation.mmlu_encode(tok, s, shots, q, max_len) for q in qs]
        t = time.time()
        shared = evaluation.mmlu_shared_logits(model, tok, enc, evaluation.mmlu_prefix_ids(tok, s, shots, qs[0]), 32, None)
        res["t_shared"] += time.time() - t
        t = time.time()
        whole = evaluation.mmlu_choice_logits(model, tok, enc, 8, None)
        res["t_whole"] += time.time() - t
        res["questions"] += len(qs); res["whole_path_questions"] += len(qs) - len(shared)
        for i, row in shared.items():
            res["max_abs_logit_diff"] = max(res["max_abs_logit_diff"], (row - whole[i]).abs().max().item())
            res["pick_diffs"] += int(row.argmax() != whole[i].argmax())
        print(s, len(qs), len(shared), res, flush=True)
json.dump(res, open(sys.argv[2], "w"), indent=1)
print("DONE", res)
