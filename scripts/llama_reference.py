#!/usr/bin/env python3
"""An independent Llama forward in pure Python (stdlib only), for tests/cpu/test_interop.cpp.

    python3 scripts/llama_reference.py DIR --ids 3,1,4,1,5

reads DIR/config.json and DIR/model.safetensors itself (its own parser of the format) and prints
one JSON object: {"logits": [[V floats] per token], "safetensors_package": "..."}.

The forward is Hugging Face's LlamaForCausalLM written out from its definition (modeling_llama.py),
in float64, sharing no code with the C++ side:
    x = embed_tokens[ids]
    per layer: h = x + o_proj(attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))), n = RMSNorm(x)
               x = h + down_proj(silu(gate_proj(m)) * up_proj(m)), m = RMSNorm(h)
    logits = lm_head(RMSNorm(x))  (lm_head = embed_tokens when tie_word_embeddings)
RMSNorm(v) = v / sqrt(mean(v^2) + rms_norm_eps) * weight; RoPE rotates the pairs (i, i + hd/2) of
each head by pos * rope_theta^(-2i/hd) (HF's rotate_half); attention is causal with scale
1/sqrt(hd). When the `safetensors` package (with numpy) is importable, the file is also loaded
with it and compared with this parser's values; when `torch` and `transformers` are (the GPU
machine has both), LlamaForCausalLM itself loads DIR and its float64 logits are compared with
these ("transformers" in the output); otherwise each part is skipped with a message.
"""
import argparse
import json
import math
import os
import struct
import sys

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


def decode(dtype, raw):
    """Little-endian values of one tensor as Python floats."""
    n = len(raw) // DTYPE_BYTES[dtype]
    if dtype == "F32":
        return list(struct.unpack("<%df" % n, raw))
    if dtype == "F16":
        return list(struct.unpack("<%de" % n, raw))
    # bf16: the upper 16 bits of an f32
    halves = struct.unpack("<%dH" % n, raw)
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]


def read_safetensors(path):
    """name -> (shape, flat values) from the format's spec: u64 header length, JSON, data."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = (entry["shape"], decode(entry["dtype"], body[begin:end]))
    return tensors


def matrix(tensors, name):
    """A 2-D weight [out, in] as a list of rows."""
    shape, flat = tensors[name]
    rows, cols = shape
    return [flat[r * cols:(r + 1) * cols] for r in range(rows)]


def matvec(w, v):
    return [sum(a * b for a, b in zip(row, v)) for row in w]


def rmsnorm(v, weight, eps):
    r = 1.0 / math.sqrt(sum(a * a for a in v) / len(v) + eps)
    return [a * r * g for a, g in zip(v, weight)]


def rope(head, pos, base):
    """Rotate-half RoPE of one head vector at position pos."""
    hd = len(head)
    half = hd // 2
    out = list(head)
    for i in range(half):
        angle = pos * base ** (-2.0 * i / hd)
        c, s = math.cos(angle), math.sin(angle)
        x1, x2 = head[i], head[i + half]
        out[i] = x1 * c - x2 * s
        out[i + half] = x2 * c + x1 * s
    return out


def silu(a):
    return a / (1.0 + math.exp(-a))


def attention(xs, layer, cfg):
    """Causal multi-head self-attention of the normed inputs xs (one vector per token)."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = d // heads
    base = cfg.get("rope_theta", 10000.0)
    q = [matvec(layer["q"], x) for x in xs]
    k = [matvec(layer["k"], x) for x in xs]
    v = [matvec(layer["v"], x) for x in xs]
    out = []
    for t in range(len(xs)):
        o = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            qh = rope(q[t][sl], t, base)
            scores = [sum(a * b for a, b in zip(qh, rope(k[j][sl], j, base))) / math.sqrt(hd)
                      for j in range(t + 1)]
            m = max(scores)
            p = [math.exp(s - m) for s in scores]
            z = sum(p)
            o += [sum(p[j] * v[j][sl][i] for j in range(t + 1)) / z for i in range(hd)]
        out.append(matvec(layer["o"], o))
    return out


def forward(cfg, tensors, ids):
    eps = cfg.get("rms_norm_eps", 1e-6)
    for key in ("rope_scaling",):
        assert not cfg.get(key), "this reference has no %s" % key
    assert cfg.get("num_key_value_heads", cfg["num_attention_heads"]) == cfg["num_attention_heads"]
    embed = matrix(tensors, "model.embed_tokens.weight")
    head = embed if cfg.get("tie_word_embeddings", False) else matrix(tensors, "lm_head.weight")
    xs = [list(embed[i]) for i in ids]
    for n in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % n
        layer = {x: matrix(tensors, p + "self_attn.%s_proj.weight" % x) for x in "qkvo"}
        normed = [rmsnorm(x, tensors[p + "input_layernorm.weight"][1], eps) for x in xs]
        xs = [[a + b for a, b in zip(x, y)] for x, y in zip(xs, attention(normed, layer, cfg))]
        gate, up, down = (matrix(tensors, p + "mlp.%s_proj.weight" % x) for x in ("gate", "up", "down"))
        new = []
        for x in xs:
            m = rmsnorm(x, tensors[p + "post_attention_layernorm.weight"][1], eps)
            hidden = [silu(g) * u for g, u in zip(matvec(gate, m), matvec(up, m))]
            new.append([a + b for a, b in zip(x, matvec(down, hidden))])
        xs = new
    final = tensors["model.norm.weight"][1]
    return [matvec(head, rmsnorm(x, final, eps)) for x in xs]


def check_with_safetensors_package(path, tensors):
    """Loads the file with the `safetensors` package when it is importable; a message either way."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        return "skipped: the safetensors package (with numpy) is not importable (%s)" % e
    try:
        loaded = load_file(path)
    except (TypeError, ValueError) as e:  # numpy has no bfloat16
        return "skipped: the safetensors package cannot load this file into numpy (%s)" % e
    if sorted(loaded) != sorted(tensors):
        return "mismatch: tensor names differ"
    for name, (shape, flat) in tensors.items():
        arr = loaded[name].astype("float64")
        if list(arr.shape) != list(shape) or arr.reshape(-1).tolist() != flat:
            return "mismatch: tensor %s differs" % name
    return "ok: %d tensors equal" % len(tensors)


def check_with_transformers(path, ids, logits):
    """LlamaForCausalLM.from_pretrained(DIR) in float64 on the same ids: its logits vs ours."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError as e:
        return "skipped: torch and transformers are not importable (%s)" % e
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    except TypeError:  # transformers 4 spells it torch_dtype
        model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float64,
                                                 attn_implementation="eager")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].tolist()
    num = sum((a - b) ** 2 for ra, rb in zip(theirs, logits) for a, b in zip(ra, rb))
    den = sum(b * b for rb in logits for b in rb)
    err = math.sqrt(num / den) if den > 0 else float("inf")
    # HF computes RMSNorm statistics and the RoPE frequencies in float32 even for a float64 model,
    # so ~1e-7 is its agreement with an all-float64 forward; a layout error is O(1).
    verdict = "ok" if err < 1e-5 else "mismatch"
    return "%s: LlamaForCausalLM logits rel RMS %.3g vs this forward" % (verdict, err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="directory with config.json and model.safetensors")
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    a = ap.parse_args()
    with open(os.path.join(a.dir, "config.json")) as f:
        cfg = json.load(f)
    path = os.path.join(a.dir, "model.safetensors")
    tensors = read_safetensors(path)
    ids = [int(i) for i in a.ids.split(",")]
    logits = forward(cfg, tensors, ids)
    json.dump({"logits": logits,
               "safetensors_package": check_with_safetensors_package(path, tensors),
               "transformers": check_with_transformers(a.dir, ids, logits)}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
