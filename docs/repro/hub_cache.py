"""Lay down a hub-shaped OLMo in a Hugging Face cache, under the repo ids `--model olmo-7b` and
`--model olmo-1b` resolve to (lume.ALIASES), so that an offline run takes the code path a user's
machine takes after `huggingface-cli download`:

    python docs/repro/hub_cache.py /tmp/hf                      # writes /tmp/hf/hub/models--*/...
    HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 python run.py --task 1 --method npo --model olmo-7b ...

The cache has the layout huggingface_hub writes (models--ORG--NAME/refs/main holding a commit,
snapshots/<commit>/<file> a relative symlink to blobs/<sha256>). Per alias two repos: the SemEval
target (config.json, generation_config.json, model.safetensors: no tokenizer, as on the hub) and its
base, from which the project loads the tokenizer (config.json, the real OLMo-0724 tokenizer.json from
../shared/olmo-tokenizer, tokenizer_config.json and special_tokens_map.json with the released fields).
The config has the released OLMo-0724 fields and names (OlmoForCausalLM, 50,304-row untied
vocabulary, 4,096 context, pad 1, EOS 50279, no BOS, no QKV clipping) at a tiny width (hidden 32,
8 layers: RMU's default layer 7 and AILS-NTUA's last 8 layers exist); the weights are random
(seeded), written with save_pretrained. Nothing is memorised: what this checks is that every path
runs and scores, not what the numbers are. tests/conftest.py's `hub_cache` fixture calls lay_down.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it
sys.path.insert(0, str(ROOT))

import lume  # noqa: E402  (after the path: run from anywhere)

# the released configs' fields (OLMo-7B-0724-hf / OLMo-1B-0724-hf), every size but the vocabulary
# and the context shrunk; the real sizes are memory.OLMO_CONFIGS
CONFIG = dict(architectures=["OlmoForCausalLM"], model_type="olmo", vocab_size=50304, max_position_embeddings=4096,
              hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=2,
              hidden_act="silu", attention_bias=False, attention_dropout=0.0, clip_qkv=None, rope_theta=10000.0,
              initializer_range=0.02, pad_token_id=1, eos_token_id=50279, bos_token_id=None, tie_word_embeddings=False,
              use_cache=True)
TOKENIZER_CONFIG = {"tokenizer_class": "GPTNeoXTokenizer", "add_bos_token": False, "add_eos_token": False,
                    "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "unk_token": None,
                    "clean_up_tokenization_spaces": True, "model_max_length": 1000000000000000019884624838656}
SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}


def revision(repo: str) -> str:
    """A stable 40-hex commit for repo (the hub's are git commits; any 40-hex name will do here)."""
    return hashlib.sha1(f"hub-cache:{repo}".encode()).hexdigest()


def add_repo(hub: Path, repo: str, files: dict[str, Path]) -> Path:
    """models--ORG--NAME with refs/main, blobs/<sha256> and snapshots/<commit>/<name> -> the blob
    (a relative symlink, as huggingface_hub makes them); returns the snapshot directory."""
    root = hub / ("models--" + repo.replace("/", "--"))
    rev = revision(repo)
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)  # no newline, as huggingface_hub writes it
    for name, src in files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snap / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    return snap


def tiny_olmo(tmp: Path, seed: int) -> dict[str, Path]:
    """config.json, generation_config.json and model.safetensors of a random tiny OLMo (save_pretrained)."""
    import torch
    from transformers import GenerationConfig, OlmoConfig, OlmoForCausalLM
    torch.manual_seed(seed)
    model = OlmoForCausalLM(OlmoConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}))
    model.generation_config = GenerationConfig(eos_token_id=CONFIG["eos_token_id"], pad_token_id=CONFIG["pad_token_id"])
    model.save_pretrained(tmp, safe_serialization=True)
    return {name: tmp / name for name in ("config.json", "generation_config.json", "model.safetensors")}


def tokenizer_files(tmp: Path, tokenizer_json: Path, config: Path) -> dict[str, Path]:
    """The base repo's files the project reads: its config and the tokenizer (released fields)."""
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    return {"config.json": config, "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": tmp / "tokenizer_config.json",
            "special_tokens_map.json": tmp / "special_tokens_map.json"}


def lay_down(hf_home, tokenizer_json, aliases=("olmo-7b", "olmo-1b")) -> dict[str, Path]:
    """Write each alias's target and tokenizer repos into HF_HOME/hub; returns {repo id: snapshot}."""
    hub = Path(hf_home) / "hub"
    lume.quiet_transformers()
    snaps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, alias in enumerate(aliases):
            target, tok_repo = lume.ALIASES[alias]
            work = Path(tmp) / alias
            model_files = tiny_olmo(work / "model", seed=k)
            snaps[target] = add_repo(hub, target, model_files)
            (work / "tok").mkdir()
            snaps[tok_repo] = add_repo(hub, tok_repo, tokenizer_files(work / "tok", Path(tokenizer_json),
                                                                     model_files["config.json"]))
    return snaps


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/repro/hub_cache.py HF_HOME")
    for repo, snap in lay_down(sys.argv[1], ROOT.parent / "shared" / "olmo-tokenizer" / "tokenizer.json").items():
        print(f"{repo}: {snap}")
    print(f"then: HF_HOME={sys.argv[1]} HF_HUB_OFFLINE=1 python run.py --task 1 --method npo --model olmo-7b ...")
