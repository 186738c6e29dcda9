"""The model zoo: architectures from Hugging Face transformers (and local modules written the
way timm and torchvision write theirs), built from tiny configs with random weights, each with
its inputs and a per-sample loss. ``tests/test_zoo.py`` checks fx_bk on every one against the
per-sample loop oracle; ``python -m tests.zoo`` prints the README's table.

An entry is ``Arch(name, family, build)``; ``build()`` returns ``(model, make_input, loss)``:
``make_input(generator, batch)`` gives a tensor or a tuple of tensors (sliced together per
sample) and ``loss(output, x)`` one loss per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

V, T, D = 40, 6, 16  # vocabulary, sequence length, hidden size


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # what the architecture exercises
    build: Callable
    ci: bool = True  # in the default test run (the rest: -m zoo_full)
    expect: str = "exact"  # or "rejected: <what the error names>"


def _hf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _ids(g, b, t=T, low=1):
    return torch.randint(low, V, (b, t), generator=g)


def _lm_loss(out, x):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                           reduction="none").view(x.shape[0], -1).mean(1)


def _cls_loss(out, x):
    x = x[0] if isinstance(x, tuple) else x
    label = (x.flatten(1)[:, 0] > x.flatten(1)[:, 1]).long() if x.is_floating_point() \
        else x[:, 0] % 3
    return F.cross_entropy(out.logits.float() if out.logits.dtype != torch.float64
                           else out.logits, label, reduction="none")


def _text(cls_name: str, config_name: str, loss=_cls_loss, **cfg):
    def build():
        tf = _hf()
        config = getattr(tf, config_name)(**cfg)
        model = getattr(tf, cls_name)(config)
        return model, _ids, loss
    return build


_SMALL = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              vocab_size=V, max_position_embeddings=32)
_DECODER = dict(_SMALL, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENCODER = dict(_SMALL, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0)


def _causal(config_name, cls_name, **extra):
    return _text(cls_name, config_name, _lm_loss, **{**_DECODER, **extra})


def _encoder(config_name, cls_name, **extra):
    return _text(cls_name, config_name, _cls_loss, **{**_ENCODER, **extra})


def _embeds_loss(out, x):
    """A regression of the pooled embedding on a function of the sample."""
    target = (x[:, :1] % 3).to(out.text_embeds.dtype)
    return (out.text_embeds - target).pow(2).mean(1)


def _vision(cls_name: str, config_name: str, **cfg):
    def build():
        tf = _hf()
        model = getattr(tf, cls_name)(getattr(tf, config_name)(**cfg))
        return model, _images, _cls_loss
    return build


def _t5():
    tf = _hf()
    cfg = tf.T5Config(vocab_size=V, d_model=D, d_kv=8, d_ff=32, num_layers=1,
                      num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = tf.T5ForConditionalGeneration(cfg)

    def forward_loss(out, x):  # teacher forcing on the input itself
        return _lm_loss(out, x[0] if isinstance(x, tuple) else x)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, decoder_input_ids=ids, use_cache=False)

    return Seq2Seq(), _ids, forward_loss


def _whisper():
    tf = _hf()
    cfg = tf.WhisperConfig(vocab_size=V, num_mel_bins=4, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, d_model=D,
                           encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=4,
                           max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1, dropout=0.0)
    model = tf.WhisperForConditionalGeneration(cfg)

    class SpeechToText(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, features, ids):
            return self.model(input_features=features, decoder_input_ids=ids, use_cache=False)

    def make_input(g, b):
        return torch.randn(b, 4, 8, generator=g), _ids(g, b)

    return SpeechToText(), make_input, lambda out, x: _lm_loss(out, x[1])


def _wav2vec2():
    tf = _hf()
    cfg = tf.Wav2Vec2Config(
        vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_labels=3,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, classifier_proj_size=8, final_dropout=0.0)
    model = tf.Wav2Vec2ForSequenceClassification(cfg)
    return model, lambda g, b: torch.randn(b, 40, generator=g), _cls_loss


def _lora(base: str, targets: list[str]):
    def build():
        import peft

        model, make_input, loss = by_name(base).build()
        config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
                                 fan_in_fan_out=base == "gpt2")
        return peft.get_peft_model(model, config), make_input, loss
    return build


class RecurrentTagger(nn.Module):
    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(4, 8, **kw)
        self.batch_first = kw.get("batch_first", False)
        self.head = nn.Linear(8 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


# ---- local modules written the way timm / torchvision write theirs --------------------------

class LayerScaleBlock(nn.Module):
    """ConvNeXt: depthwise conv, LayerNorm over channels, MLP, ``gamma`` layer scale."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))).permute(0, 3, 1, 2)
        return x + h * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtLike(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.blocks = nn.Sequential(LayerScaleBlock(c), LayerScaleBlock(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardized per output channel at every call."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ResNetV2Like(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = StdConv2d(3, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.conv = StdConv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.conv(F.relu(self.norm(h)))
        return self.head(h.mean((2, 3)))


class WindowAttention(nn.Module):
    """Swin: attention in windows of ``w x w`` tokens with a relative-position bias table
    gathered by a constant index buffer."""

    def __init__(self, c=8, heads=2, w=2):
        super().__init__()
        self.heads, self.w = heads, w
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
        rel = (coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]) + (w - 1)
        self.register_buffer("index", rel[0] * (2 * w - 1) + rel[1], persistent=False)

    def forward(self, x):  # x: [B*nW, N, C]
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinLike(nn.Module):
    def __init__(self, c=8, w=2):
        super().__init__()
        self.w = w
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.norm = nn.LayerNorm(c)
        self.attn = WindowAttention(c, w=w)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.embed(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        b, hh, ww, c = h.shape
        win = h.view(b, hh // self.w, self.w, ww // self.w, self.w, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, self.w * self.w, c)  # [B*nW, N, C]
        out = self.attn(self.norm(win)).view(b, -1, c)
        return self.head(out.mean(1))


class WeightNormConv(nn.Module):
    """wav2vec2's positional conv: ``weight_norm`` parametrization of a grouped Conv1d."""

    def __init__(self, c=8):
        super().__init__()
        self.inp = nn.Linear(4, c)
        conv = nn.Conv1d(c, c, 3, padding=1, groups=2)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.head = nn.Linear(c, 3)

    def forward(self, x):  # [B, T, 4]
        h = self.inp(x)
        h = h + F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h.mean(1))


class GemmaNormLike(nn.Module):
    """Gemma's RMSNorm: ``x * (1 + w)`` with ``w`` cast to the activation dtype."""

    def __init__(self, d=D):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.w = nn.Parameter(torch.zeros(d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head((h * (1.0 + self.w.to(h.dtype))).mean(1))


class ManualTiedLM(nn.Module):
    """A GPT-style head written ``h @ wte.weight.T`` (no F.linear)."""

    def __init__(self, d=D):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, ids):
        return torch.tanh(self.mlp(self.wte(ids))) @ self.wte.weight.T


def _local(cls, make_input, loss):
    def build():
        return cls(), make_input, loss
    return build


class _Logits:
    def __init__(self, logits):
        self.logits = logits


def _wrap(loss):
    return lambda out, x: loss(_Logits(out), x)


def _images(g, b):
    return torch.randn(b, 3, 8, 8, generator=g)


ZOO: list[Arch] = [
    # decoders (LLM families)
    Arch("gpt2", "tied embedding + Conv1D", _causal(
        "GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=D, n_head=2, n_positions=32,
        use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    Arch("llama", "RMSNorm, rotary, GQA", _causal("LlamaConfig", "LlamaForCausalLM")),
    Arch("mistral", "sliding-window GQA", _causal("MistralConfig", "MistralForCausalLM"),
         ci=False),
    Arch("qwen2", "biased q/k/v", _causal("Qwen2Config", "Qwen2ForCausalLM"), ci=False),
    Arch("gemma", "RMSNorm (1 + w): parameter-derived", _causal(
        "GemmaConfig", "GemmaForCausalLM", head_dim=8)),
    Arch("gpt_neox", "parallel residual, partial rotary", _causal(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.5), ci=False),
    Arch("phi3", "fused qkv, partial rotary", _causal(
        "Phi3Config", "Phi3ForCausalLM", partial_rotary_factor=0.5, pad_token_id=0), ci=False),
    Arch("opt", "LayerNorm and Linear on [B*T, d]", _causal(
        "OPTConfig", "OPTForCausalLM", ffn_dim=32, word_embed_proj_dim=D, dropout=0.0,
        attention_dropout=0.0)),
    # encoders
    Arch("bert", "absolute positions, token types",
         _encoder("BertConfig", "BertForSequenceClassification"), ci=False),
    Arch("roberta", "padding-offset positions", _encoder(
        "RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1)),
    Arch("distilbert", "sinusoid-free positions", _text(
        "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=V, dim=D,
        n_layers=2, n_heads=2, hidden_dim=32, num_labels=3, dropout=0.0, attention_dropout=0.0,
        max_position_embeddings=32, seq_classif_dropout=0.0), ci=False),
    Arch("albert", "shared layers (reused weights)", _encoder(
        "AlbertConfig", "AlbertForSequenceClassification", embedding_size=8,
        classifier_dropout_prob=0.0)),
    Arch("electra", "embedding projection", _encoder(
        "ElectraConfig", "ElectraForSequenceClassification", embedding_size=8), ci=False),
    Arch("deberta_v2", "disentangled relative attention", _encoder(
        "DebertaV2Config", "DebertaV2ForSequenceClassification", relative_attention=True,
        position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
        pooler_dropout=0.0, pooler_hidden_size=D), ci=False,
         expect="rejected: aten.repeat (relative embeddings repeated over batch x heads)"),
    Arch("convbert", "span convolution (unfold), in-place bias add", _encoder(
        "ConvBertConfig", "ConvBertForSequenceClassification", embedding_size=D,
        conv_kernel_size=3, head_ratio=2), ci=False),
    Arch("bart", "encoder-decoder, learned positions with offset", _text(
        "BartForSequenceClassification", "BartConfig", vocab_size=V, d_model=D,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, num_labels=3, dropout=0.0, attention_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2), ci=False,
         expect="rejected: mixes-samples (the eos-token pooling: a boolean mask over the batch)"),
    Arch("t5", "relative-position bucket embedding [T, T] -> [T, T, H]", _t5, ci=False),
    Arch("xlnet", "relative attention, seq-first layout", _text(
        "XLNetForSequenceClassification", "XLNetConfig", vocab_size=V, d_model=D, n_layer=2,
        n_head=2, d_inner=32, dropout=0.0, num_labels=3, summary_last_dropout=0.0),
         ci=False, expect="rejected: aten.einsum (a parameter contracted by einsum)"),
    Arch("clip_text", "causal text encoder with projection", _text(
        "CLIPTextModelWithProjection", "CLIPTextConfig", _embeds_loss, vocab_size=V,
        hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2), ci=False),
    Arch("mixtral", "mixture of experts, default grouped_mm experts", _causal(
        "MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
         ci=False, expect="rejected: trace-failed (asks for batched_mm experts)"),
    Arch("mixtral_batched_mm", "mixture of experts: expert weights gathered per token", _causal(
        "MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="batched_mm")),
    Arch("qwen2_moe_batched_mm", "mixture of experts + shared expert", _causal(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16,
        experts_implementation="batched_mm"), ci=False),
    Arch("whisper", "audio encoder-decoder, sinusoidal + learned positions", _whisper,
         ci=False),
    Arch("gpt2_default_config", "use_cache=True (a cache in the outputs), dropout 0.1",
         _causal("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=D, n_head=2,
                 n_positions=32), ci=False),
    Arch("phi3_default_rotary", "full rotary: an empty pass-through slice", _causal(
        "Phi3Config", "Phi3ForCausalLM"), ci=False),
    Arch("wav2vec2", "conv feature encoder, weight-normed positional conv", _wav2vec2,
         ci=False),
    # PEFT adapters (only the adapter weights train)
    Arch("peft_lora_gpt2", "LoRA on Conv1D attention (c_attn)", _lora(
        "gpt2", ["c_attn"])),
    Arch("peft_lora_llama", "LoRA on q/v projections", _lora("llama", ["q_proj", "v_proj"]),
         ci=False),
    # vision (Hugging Face)
    Arch("hf_vit", "patch conv, cls token expand", _vision(
        "ViTForImageClassification", "ViTConfig", hidden_size=D, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    Arch("hf_convnext", "depthwise conv, channels-last LayerNorm, layer scale", _vision(
        "ConvNextForImageClassification", "ConvNextConfig", num_channels=3,
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=8,
        patch_size=2, drop_path_rate=0.0), ci=False),
    Arch("hf_swin", "shifted windows, relative-position bias table", _vision(
        "SwinForImageClassification", "SwinConfig", image_size=8, patch_size=2,
        num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0), ci=False),
    Arch("hf_beit", "relative-position bias, layer scale, cached index", _vision(
        "BeitForImageClassification", "BeitConfig", image_size=8, patch_size=4,
        num_channels=3, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, use_relative_position_bias=True,
        layer_scale_init_value=0.1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0), ci=False,
         expect="rejected: vmap (the interpolated bias table's upsampling specializes the "
                "batch under vmap)"),
    Arch("hf_dinov2", "layer scale, interpolated positions", _vision(
        "Dinov2ForImageClassification", "Dinov2Config", image_size=8, patch_size=4,
        num_channels=3, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
        mlp_ratio=2, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0), ci=False),
    Arch("hf_resnet", "BatchNorm (batch statistics mix samples)", _vision(
        "ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=8,
        hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), ci=False,
         expect="rejected: BatchNorm2d"),
    # recurrent
    Arch("lstm", "fused nn.LSTM, 2 layers, bidirectional", _local(
        lambda: RecurrentTagger(nn.LSTM, num_layers=2, bidirectional=True),
        lambda g, b: torch.randn(b, T, 4, generator=g), _wrap(_cls_loss))),
    Arch("gru", "fused nn.GRU, batch-first", _local(
        lambda: RecurrentTagger(nn.GRU, batch_first=True),
        lambda g, b: torch.randn(b, T, 4, generator=g), _wrap(_cls_loss)), ci=False),
    Arch("rnn", "fused nn.RNN (tanh)", _local(
        lambda: RecurrentTagger(nn.RNN, batch_first=True),
        lambda g, b: torch.randn(b, T, 4, generator=g), _wrap(_cls_loss)), ci=False),
    # vision (local, timm-style)
    Arch("convnext_like", "layer scale gamma.reshape(1,-1,1,1)", _local(
        ConvNeXtLike, _images, _wrap(_cls_loss))),
    Arch("resnetv2_stdconv_like", "weight standardization (StdConv2d)", _local(
        ResNetV2Like, _images, _wrap(_cls_loss))),
    Arch("swin_like", "window partition + relative-position bias table", _local(
        SwinLike, _images, _wrap(_cls_loss))),
    Arch("weight_norm_conv", "weight_norm parametrization (wav2vec2 pos-conv)", _local(
        WeightNormConv, lambda g, b: torch.randn(b, T, 4, generator=g), _wrap(_cls_loss))),
    Arch("gemma_norm_like", "x * (1 + w.to(dtype))", _local(
        GemmaNormLike, _ids, _wrap(_cls_loss)), ci=False),
    Arch("manual_tied_lm", "h @ wte.weight.T next to the embedding", _local(
        ManualTiedLM, _ids, _wrap(_lm_loss))),
]


def by_name(name: str) -> Arch:
    return next(a for a in ZOO if a.name == name)


def _cast(x, dtype):
    """Floating inputs (a tensor or a tuple of them) in ``dtype``; ids stay integers."""
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype) for t in x)
    return x.to(dtype) if x.is_floating_point() else x


def model_floor(arch: Arch, *, batch: int = 3, seed: int = 0) -> float:
    """How far the model's own float64 gradient of a batch is from the sum of its per-sample
    gradients (non-private): nonzero where the model computes parts in float32 whatever its
    dtype (Gemma's RMSNorm), which rounds differently for a batch than for one sample."""
    torch.manual_seed(seed)
    model, make_input, loss = arch.build()
    model = model.double().eval()
    x = make_input(torch.Generator().manual_seed(seed + batch), batch)
    x = _cast(x, torch.float64)
    call = (lambda m, xi: m(*xi)) if isinstance(x, tuple) else (lambda m, xi: m(xi))
    params = [p for p in model.parameters() if p.requires_grad]
    batched = torch.autograd.grad(loss(call(model, x), x).sum(), params, allow_unused=True,
                                  materialize_grads=True)
    rows = [tuple(t[i:i + 1] for t in x) if isinstance(x, tuple) else x[i:i + 1]
            for i in range(batch)]
    looped = [torch.autograd.grad(loss(call(model, r), r).sum(), params, allow_unused=True,
                                  materialize_grads=True) for r in rows]
    summed = [sum(gs) for gs in zip(*looped)]
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
               for a, b in zip(batched, summed))


def check(arch: Arch, *, dtype=torch.float64, compiled: bool = False, batch: int = 3,
          max_grad_norm: float = 0.05, seed: int = 0) -> float:
    """fx_bk's clipped sum vs the per-sample loop: the largest relative error per parameter.

    The loss is summed over the batch (``loss_reduction="sum"``): several of these models
    compute parts of the forward in float32 whatever the parameters' dtype (Llama's RMSNorm,
    rotary tables), so a mean's 1/B in the output gradient is rounded there and a float64
    comparison with a mean differs at float32 precision from the loop's unscaled losses —
    the model's own rounding, not fx_bk's."""
    import fx_bk
    from fx_bk.testing import loop_clipped_sum, max_rel_err

    torch.manual_seed(seed)
    model, make_input, loss = arch.build()
    model = model.to(dtype).eval()  # dropout off; no BatchNorm in the zoo
    x = make_input(torch.Generator().manual_seed(seed + batch), batch)
    x = _cast(x, dtype)
    call = (lambda m, xi: m(*xi)) if isinstance(x, tuple) else (lambda m, xi: m(xi))
    bk = fx_bk.transform(model, max_grad_norm=max_grad_norm, loss_reduction="sum")
    if compiled:
        bk = torch.compile(bk, fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss(call(bk, x), x).sum().backward()
    got = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # unused: None
           for n, p in model.named_parameters() if p.requires_grad}
    ref = loop_clipped_sum(model, x, loss, max_grad_norm,
                           loss_of=lambda m, xi: loss(call(m, xi), xi).sum())
    return max_rel_err(got, ref)


def table() -> str:
    """The README's table of verified architectures (``python -m tests.zoo --table``)."""
    rows = ["| architecture | what it exercises | status | run |", "|---|---|---|---|"]
    for a in ZOO:
        status = "exact" if a.expect == "exact" else a.expect.replace("rejected: ", "rejected, ")
        rows.append(f"| {a.name} | {a.family} | {status} | {'CI' if a.ci else '-m zoo_full'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--table"]:
        print(table())
        raise SystemExit
    names = sys.argv[1:] or [a.name for a in ZOO]
    for name in names:
        try:
            print(f"{name:24s} f64 eager rel err {check(by_name(name)):.1e}", flush=True)
        except Exception as e:  # noqa: BLE001  (a survey: report and go on)
            msg = str(e).replace("\n", " ")
            print(f"{name:24s} {type(e).__name__}: {msg[:600]}", flush=True)
