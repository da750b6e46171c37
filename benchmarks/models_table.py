"""One table over real architectures: does sparse_sam drop in, and what does it cost?

For each model (transformers models built from configs with random weights, nothing downloaded, and
PyTorch's own TransformerEncoder): patch at γ = 1 %, train 3 Adam steps, export, unpatch, and report

* ``exact``: every ``state_dict`` tensor bit-identical after unpatch, and the patched forward bit-identical
  to the forward with the exported patch applied;
* ``reached``: share of the model's ≥ 2-D floating weights (embeddings included) the patch can modify;
* ``patch bytes``: payload of the lossless patch file;
* ``ZFDA / dense step``: wall time of one training step (forward, backward, Adam) of the patched model over
  the same step of full fine-tuning, timed alternately in one run (median of ``--steps``).

Usage: ``python benchmarks/models_table.py [--steps 10] [--out FILE]``
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn

import sparse_sam
from common import emit, header, model_output as out


def models():
    """name → (model, inputs, loss_fn): small but not toy sizes (hidden 128, 4 layers)."""
    import transformers as tf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    def ids(n=32):
        return {"input_ids": torch.randint(0, 1000, (8, n))}

    h = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    yield "BERT (masked LM)", tf.BertForMaskedLM(tf.BertConfig(vocab_size=1000, max_position_embeddings=64, **h)), ids()
    yield "GPT-2", tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=1000, n_embd=128, n_layer=4, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)), ids()
    yield "ViT", tf.ViTForImageClassification(tf.ViTConfig(image_size=64, patch_size=8, num_labels=10, **h)), \
        {"pixel_values": torch.randn(8, 3, 64, 64)}
    yield "ResNet", tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                                                    depths=[1, 1, 1, 1], num_labels=10)), \
        {"pixel_values": torch.randn(8, 3, 64, 64)}
    yield "Whisper encoder", WhisperEncoder(tf.WhisperConfig(d_model=128, encoder_layers=4, encoder_attention_heads=4,
                                                             encoder_ffn_dim=512, num_mel_bins=40,
                                                             max_source_positions=100)), \
        {"input_features": torch.randn(8, 40, 200)}
    layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)
    yield "nn.TransformerEncoder", nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), \
        {"src": torch.randn(8, 32, 128)}


def bits(model):
    return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in model.state_dict().items()}


def row(name, model, inputs, steps):
    torch.manual_seed(0)
    model.train()
    dense = copy.deepcopy(model)
    big = {n: p.numel() for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2}
    before = bits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = sparse_sam.patch(model, 0.01, seed=0, delta_grad="dense")
    reached = sum(big.get(n, 0) for n in handle.layers) / sum(big.values())
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.5, lr_delta=1e-3))
    dopt = torch.optim.Adam(dense.parameters(), lr=1e-4)

    def step(m, o):
        loss = out(m(**inputs)).float().square().mean()
        o.zero_grad()
        loss.backward()
        o.step()

    t_sam, t_dense = [], []
    for i in range(steps + 1):
        for m, o, ts in ((model, opt, t_sam), (dense, dopt, t_dense)):
            t0 = time.perf_counter()
            step(m, o)
            if i:  # the first step of each warms up
                ts.append(time.perf_counter() - t0)
    model.eval()
    y_patched = out(model(**inputs)).detach()
    patch = handle.export()
    sparse_sam.unpatch(model)
    same = all(torch.equal(before[k], v) for k, v in bits(model).items())
    with patch.applied(model):
        y_applied = out(model(**inputs)).detach()
    exact = same and torch.equal(y_patched.view(torch.uint8), y_applied.view(torch.uint8))
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "exact": exact, "reached": reached, "bytes": patch.nbytes,
            "ratio": statistics.median(t_sam) / statistics.median(t_dense),
            "sam_ms": statistics.median(t_sam) * 1e3, "dense_ms": statistics.median(t_dense) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="append the table to this file")
    args = ap.parse_args()
    rows = [row(name, m, x, args.steps) for name, m, x in models()]
    lines = header("models", f"python benchmarks/models_table.py --steps {args.steps}") + [
        "", "| model | params | exact (unpatch + applied forward) | weights reached | patch bytes (γ = 1 %) "
        "| ZFDA step / dense step (ms) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {'yes' if r['exact'] else 'NO'} | "
                     f"{r['reached']:.1%} | {r['bytes']:,} | {r['ratio']:.2f} ({r['sam_ms']:.0f} / {r['dense_ms']:.0f}) |")
    emit(lines, args.out)

if __name__ == "__main__":
    main()
