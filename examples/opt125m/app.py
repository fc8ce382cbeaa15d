"""An app shaped like OPT-125m: a randomly initialised OPTForCausalLM (125M parameters,
~500 MB of float32), saved into its Volume on the first start and loaded from there with
from_pretrained on every start after; predict generates a few tokens.

Needs torch and transformers (not in requirements-dev.txt; a CPU build is enough):

    .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    .venv/bin/pip install transformers
    python -m beam serve examples/opt125m/app.py:predict
"""
import os

import torch
from transformers import OPTConfig, OPTForCausalLM

from beam import Volume, endpoint

CACHE = "./opt125m"
CONFIG = dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
              vocab_size=50272)


def load():
    path = os.path.join(CACHE, "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        OPTForCausalLM(OPTConfig(**CONFIG)).save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
    model = OPTForCausalLM.from_pretrained(path)
    model.eval()
    return {"model": model}


@endpoint(on_start=load, checkpoint_enabled=True, name="opt125m",
          volumes=[Volume(name="opt125m", mount_path=CACHE)])
def predict(context, tokens=None, new_tokens: int = 4):
    model = context.on_start_value["model"]
    ids = torch.tensor([tokens or [2, 100, 200, 300]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return {"tokens": out[0].tolist()}
