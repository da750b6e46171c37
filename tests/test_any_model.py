"""Drop-in on models nobody here wrote: transformers (BERT, GPT-2, ViT, ResNet, Whisper encoder, Llama, T5), PyTorch's
own TransformerEncoder and MultiheadAttention, and every conv/embedding kind. Random weights from tiny
configs; nothing is downloaded."""
import warnings

import pytest
import torch
import torch.nn as nn

import sparse_sam
from conftest import assert_same_bits, raw_bits, state_bits


class EmbedAttention(nn.Module):
    """nn.Embedding + nn.MultiheadAttention with separate q/k/v weights (kdim/vdim ≠ embed_dim)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(23, 12)
        self.mem = nn.Embedding(23, 10)
        self.att = nn.MultiheadAttention(12, 3, kdim=10, vdim=10, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, ids):
        q, kv = self.emb(ids), self.mem(ids.flip(-1))
        return self.head(self.att(q, kv, kv, need_weights=False)[0])


class AllConvs(nn.Module):
    """Conv1d/2d/3d and ConvTranspose1d/2d/3d with groups and dilation."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.t1 = nn.ConvTranspose1d(6, 4, 3, stride=2, groups=2)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, groups=2)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=2, dilation=1)
        self.c2 = nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3)
        self.t2 = nn.ConvTranspose2d(6, 3, 3, stride=2, output_padding=1, groups=3)

    def forward(self, a, b, c):
        return self.t1(self.c1(a)).mean() + self.t3(self.c3(b)).mean() + self.t2(self.c2(c)).mean()


def _transformers():
    return pytest.importorskip("transformers")


def make(name):
    """(model, inputs) for ``name``; inputs is a dict of keyword arguments."""
    if name == "torch_transformer_encoder":
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {"src": torch.randn(2, 5, 16)}
    if name == "embedding_mha":
        return EmbedAttention(), {"ids": torch.randint(0, 23, (2, 6))}
    if name == "all_convs":
        return AllConvs(), {"a": torch.randn(2, 4, 9), "b": torch.randn(1, 2, 5, 4, 3), "c": torch.randn(2, 3, 7, 6)}
    tf = _transformers()
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return tf.BertForMaskedLM(cfg), {"input_ids": torch.randint(0, 50, (2, 7))}
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 50, (2, 7))}
    if name == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, num_labels=3)
        return tf.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if name == "resnet":
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        return tf.ResNetForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "whisper_encoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = tf.WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=24,
                               num_mel_bins=8, max_source_positions=8, dropout=0.0)
        return WhisperEncoder(cfg), {"input_features": torch.randn(2, 8, 16)}
    if name == "llama":  # RMSNorm, rotary positions, grouped-query attention, untied head
        cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
        return tf.LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 50, (2, 7))}
    if name == "t5":  # encoder-decoder, relative attention bias (an Embedding), tied embeddings
        cfg = tf.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, dropout_rate=0.0)
        ids = torch.randint(0, 50, (2, 7))
        return tf.T5ForConditionalGeneration(cfg), {"input_ids": ids, "decoder_input_ids": ids}
    raise KeyError(name)


MODELS = ["torch_transformer_encoder", "embedding_mha", "all_convs", "bert", "gpt2", "vit", "resnet", "whisper_encoder",
          "llama", "t5"]


def output(y):
    if isinstance(y, torch.Tensor):
        return y
    logits = getattr(y, "logits", None)
    return logits if logits is not None else y.last_hidden_state


def big_float_weights(model):
    """Unique floating parameters of ≥ 2 dimensions (embeddings included): name → numel."""
    return {n: p.numel() for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2}


@pytest.mark.parametrize("name", MODELS)
def test_real_model_zero_forget_and_exact_patch(name):
    torch.manual_seed(0)
    model, inputs = make(name)
    model.eval()
    before = state_bits(model)
    flags = [p.requires_grad for p in model.parameters()]
    types = [type(m) for m in model.modules()]
    reachable = big_float_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ViT's cls token / position table are skipped with a warning
        handle = sparse_sam.patch(model, 0.05, seed=0, delta_grad="dense")
    reached = sum(reachable.get(n, 0) for n in handle.layers)
    assert reached >= 0.9 * sum(reachable.values()), f"reached {reached} of {sum(reachable.values())}"
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.5, lr_delta=1e-2))
    model.train()
    for _ in range(3):
        loss = output(model(**inputs)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # With and without autograd: PyTorch's matmul folds 3-D inputs differently when an operand requires
    # grad, so the patched weight must carry the flag the base would have (docs/design-notes.md).
    y_patched = output(model(**inputs)).detach()
    with torch.no_grad():
        y_patched_ng = output(model(**inputs))
    patch = handle.export()
    assert patch.num_modified == round(0.05 * sum(pw.weight.numel() for pw in handle.layers.values()))
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [type(m) for m in model.modules()] == types
    y_base = output(model(**inputs)).detach()
    with patch.applied(model):
        y_applied = output(model(**inputs)).detach()
        with torch.no_grad():
            y_applied_ng = output(model(**inputs))
    assert torch.equal(raw_bits(y_patched), raw_bits(y_applied))
    assert torch.equal(raw_bits(y_patched_ng), raw_bits(y_applied_ng))
    assert not torch.equal(y_patched, y_base), "training changed nothing"
    assert_same_bits(before, state_bits(model))


def test_mha_reads_the_patched_in_proj_weight():
    """MultiheadAttention reads in_proj_weight directly: the patch must reach it (not a silent no-op)."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    handle = sparse_sam.patch(mha, 0.5, seed=1, layers=(nn.MultiheadAttention,), filter_fn=lambda n, m: n == "")
    assert list(handle.layers) == ["in_proj_weight"]
    with torch.no_grad():
        y0 = mha(x, x, x)[0]
        handle.layers["in_proj_weight"].delta.normal_()
        assert not torch.equal(mha(x, x, x)[0], y0)
    sparse_sam.unpatch(mha)


def test_gpt2_conv1d_dims_and_tied_head():
    model, _ = make("gpt2")
    handle = sparse_sam.patch(model, 0.01, seed=0)
    rows = {r["name"]: r for r in handle.summary()}
    c_attn = rows["transformer.h.0.attn.c_attn.weight"]  # Conv1D weight is (in, out) = (16, 48)
    assert (c_attn["d_in"], c_attn["d_out"]) == (16, 48)
    wte = handle.layers["transformer.wte.weight"]
    assert "lm_head.weight" in wte.names and "lm_head.weight" not in handle.layers
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert sum(1 for l in patch.layers if l.name == "transformer.wte.weight") == 1


def test_unsupported_weights_warn_once_listing_them():
    tf = _transformers()
    model, _ = make("vit")
    with pytest.warns(UserWarning, match="skipped") as rec:
        handle = sparse_sam.patch(model, 0.01)
    assert len(rec) == 1 and "vit.embeddings.position_embeddings" in str(rec[0].message)
    assert handle.skipped == ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"]
    sparse_sam.unpatch(model)
    assert isinstance(model, tf.ViTForImageClassification)


def test_target_parameters_globs():
    model, _ = make("vit")
    handle = sparse_sam.patch(model, 0.1, target_parameters=["*.position_embeddings", "vit.layers.0.*.weight"])
    names = list(handle.layers)
    assert "vit.embeddings.position_embeddings" in names
    assert all(n == "vit.embeddings.position_embeddings" or n.startswith("vit.layers.0.") for n in names)
    assert any(n.endswith("layernorm_before.weight") for n in names)  # 1-D weights too, when named
    assert handle.layers["vit.embeddings.position_embeddings"].d_out == 17  # (1, 17, 16): leading 1 dropped
    sparse_sam.unpatch(model)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_weights_named_are_trained_and_switch_exactly(kind):
    """nn.LSTM/GRU/RNN are not a default kind (they are skipped with the warning), but their weights can be
    named: the recurrent forward rebuilds its flat weight list when a weight is a new tensor, so it reads
    the patched W + m ⊙ v, and the exported patch reproduces the trained model bit for bit."""
    torch.manual_seed(3)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kind(7, 12, num_layers=2, batch_first=True)
            self.head = nn.Linear(12, 5)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model, x = Seq(), torch.randn(3, 6, 7)
    before = state_bits(model)
    with pytest.warns(UserWarning, match="rnn.weight_hh_l1"):
        handle = sparse_sam.patch(model, 0.05)  # the default skips them, naming each
    assert list(handle.layers) == ["head.weight"]
    sparse_sam.unpatch(model)
    with torch.no_grad():  # (the CPU LSTM itself computes other last bits with and without autograd)
        y_base = model(x)
    # Only the recurrent weights: whatever moves the output goes through the recurrent layer itself.
    handle = sparse_sam.patch(model, 0.05, seed=0, target_parameters=["rnn.weight_*"])
    assert sorted(handle.layers) == sorted(f"rnn.weight_{a}_l{i}" for a in ("ih", "hh") for i in (0, 1))
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.05, lr_delta=1e-2))
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Outside autograd: the head is left out of the selection and reads the LSTM's non-contiguous
    # batch-first output, the case _mirror_flags exists for.
    with torch.no_grad():
        y_patched = model(x)
        with handle.disabled():
            y_off = model(x)
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    assert all(l.deltas.abs().sum() > 0 for l in patch.layers), "no gradient reached a recurrent weight"
    assert not torch.equal(y_patched, y_base)
    assert torch.equal(raw_bits(y_off), raw_bits(y_base))
    with torch.no_grad():
        assert torch.equal(raw_bits(model(x)), raw_bits(y_base))
        with patch.applied(model):
            y_applied = model(x)
    assert torch.equal(raw_bits(y_patched), raw_bits(y_applied))
    assert_same_bits(before, state_bits(model))


def test_weights_left_out_compute_the_unpatched_bits_outside_autograd():
    """A 2-D weight the selection leaves out is frozen while patched, and PyTorch's matmul folds a
    non-contiguous 3-D input differently for a frozen weight, even under no_grad: outside autograd the
    patched model must still compute the applied patch's bits, and the flag must be frozen again after
    every forward (also one that raises), so that no gradient ever reaches the weight."""
    torch.manual_seed(5)
    lin = nn.Linear(12, 5)
    x = torch.randn(6, 3, 12).transpose(0, 1)  # (3, 6, 12), not contiguous
    with torch.no_grad():
        y_trainable = lin(x)
        lin.weight.requires_grad_(False)
        y_frozen = lin(x)
        lin.weight.requires_grad_(True)
    if torch.equal(y_trainable, y_frozen):
        pytest.skip("this PyTorch build folds the same way for frozen weights; nothing to mirror")

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 12), lin

        def forward(self, x, fail=False):
            y = self.b(self.a(x).transpose(0, 1).contiguous().transpose(0, 1))
            if fail:
                raise RuntimeError("in forward")
            return y

    model = TwoHeads()
    with torch.no_grad():
        y_base = model(x)
    handle = sparse_sam.patch(model, 0.2, seed=0, target_parameters=["a.weight"])
    with torch.no_grad():
        handle.layers["a.weight"].delta.normal_()
        y_patched = model(x)
        with handle.disabled():
            y_off = model(x)
        with pytest.raises(RuntimeError, match="in forward"):
            model(x, fail=True)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    model(x).sum().backward()  # grad mode: frozen throughout
    assert lin.weight.grad is None and handle.layers["a.weight"].delta.grad is not None
    assert torch.equal(raw_bits(y_off), raw_bits(y_base))
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert lin.weight.requires_grad and "_sparse_sam_frozen" not in lin.__dict__
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    with torch.no_grad(), patch.applied(model):
        y_applied = model(x)
    assert torch.equal(raw_bits(y_patched), raw_bits(y_applied))
