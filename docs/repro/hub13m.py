"""A 13M hub-shaped OLMo (real tokenizer, released config fields, vocab 50,304), trained briefly on
real LUME items so greedy outputs are text that ends; written with save_pretrained."""
import sys, time, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it
sys.path.insert(0, str(ROOT))
import data, lume, tiny
from transformers import GenerationConfig, OlmoConfig, OlmoForCausalLM, PreTrainedTokenizerFast
shared = ROOT.parent / "shared"; out = Path(sys.argv[1])
tok = PreTrainedTokenizerFast(tokenizer_file=str(shared / "olmo-tokenizer" / "tokenizer.json"),
                              eos_token="<|endoftext|>", pad_token="<|padding|>")
config = OlmoConfig(vocab_size=50304, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=4096, pad_token_id=1,
                    eos_token_id=50279, bos_token_id=None, tie_word_embeddings=False)
torch.manual_seed(0)
model = OlmoForCausalLM(config)
print("params", sum(p.numel() for p in model.parameters()) / 1e6)
rel = data.load_lume(shared / "lume-data" / "lume")
items = [it for it in rel if it.task in (1, 2, 3)][::40][:120]
seqs = [lume.encode_pair(tok, it.input, it.output)[0][:256] for it in items]
plan = lume.plan_steps(len(seqs), 0, 8, 1, 12, 0, 0, lengths=[len(s) for s in seqs])
steps = [[(lume.make_batch([seqs[i] for i in f], [0] * len(f), f, 1), None) for f, _ in micros] for micros in plan]
t = time.time()
lume.train(model, steps, tiny.finetune, lr=5e-3, warmup=10)
print("trained", len(steps), "steps", time.time() - t)
model.generation_config = GenerationConfig(eos_token_id=50279, pad_token_id=1)
model.save_pretrained(out); tok.save_pretrained(out)
