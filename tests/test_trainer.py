"""``fx_bk.integrations.transformers.DPTrainer``: DP-SGD inside a Hugging Face Trainer.

Tiny models and generated data; each run is a few steps on one CPU thread. Checked: epsilon
against an independent Opacus accountant (and ``target_epsilon``), one step against a
per-sample loop by hand, exact resume (parameters and epsilon), PEFT LoRA (base weights
untouched), learning under noise, gradient accumulation (noise once per logical batch, same
update as one big batch), bf16 autocast, and the refused settings.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("opacus")

from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import fx_bk  # noqa: E402
from fx_bk.integrations.transformers import (  # noqa: E402
    DP_STATE_NAME,
    DPTrainer,
    _TrainerDPOptimizer,
    default_per_sample_loss,
)
from fx_bk.testing import loop_clipped_sum  # noqa: E402

V, T = 16, 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyLM(nn.Module):
    """A causal LM in Trainer's eyes (``loss_type``); logits ``[B, T, V]``."""

    loss_type = "ForCausalLM"

    def __init__(self, d: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, V)
        self.seen_dtypes: list = []

    def forward(self, input_ids, labels=None):
        assert labels is None, "DPTrainer must not pass labels to the model"
        h = torch.tanh(self.emb(input_ids))
        logits = self.head(h)
        self.seen_dtypes.append(logits.dtype)
        return {"logits": logits}


def lm_data(n: int, seed: int = 0, learnable: bool = False) -> list[dict]:
    """Token sequences, labels = inputs with a sample-dependent number of -100 at the end."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if learnable:  # next token = 3 * token + 1 (mod V)
            ids = [int(torch.randint(0, V, (1,), generator=g))]
            for _ in range(T - 1):
                ids.append((3 * ids[-1] + 1) % V)
            ids = torch.tensor(ids)
        else:
            ids = torch.randint(0, V, (T,), generator=g)
        labels = ids.clone()
        labels[T - i % 3:] = -100  # 0, 1 or 2 padded positions
        out.append({"input_ids": ids, "labels": labels})
    return out


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                max_grad_norm=0.0, disable_tqdm=True, logging_steps=1000, seed=0,
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2)
    base.update(kw)
    return TrainingArguments(**base)


def per_sample_lm_loss(model, rows):
    ids, labels = rows
    return fx_bk.sequence_cross_entropy(model(ids)["logits"], labels, shift=True).sum()


def params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_opacus_accountant(tmp_path, accountant):
    # q = 1/16: some logical batches are empty, and still accounted
    data = lm_data(16)
    kw = {"target_epsilon": 4.0} if accountant == "rdp" else {"noise_multiplier": 0.9}
    trainer = DPTrainer(model=TinyLM(), train_dataset=data, max_grad_norm=1.0,
                        target_delta=1e-5, accountant=accountant, dp_seed=3,
                        args=targs(tmp_path, per_device_train_batch_size=1, max_steps=6,
                                   logging_steps=3), **kw)
    q, steps = 1 / 16, 6
    if accountant == "rdp":
        assert trainer.noise_multiplier == get_noise_multiplier(
            target_epsilon=4.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
    sizes = [len(trainer.poisson_sampler.logical_batch(t)) for t in range(steps)]
    assert 0 in sizes and max(sizes) > 0, sizes
    trainer.train()

    reference = create_accountant(accountant)
    logged = [h["epsilon"] for h in trainer.state.log_history if "loss" in h]
    expected = []
    for t in range(steps):
        reference.step(noise_multiplier=trainer.noise_multiplier, sample_rate=q)
        if (t + 1) % 3 == 0:
            expected.append(reference.get_epsilon(delta=1e-5))
    assert trainer.sample_rate == q and trainer.privacy_steps == steps
    assert logged == pytest.approx(expected, rel=1e-12)
    assert not any("grad_norm" in h for h in trainer.state.log_history)  # un-noised: not logged
    assert trainer.get_epsilon() == pytest.approx(expected[-1], rel=1e-12)
    if accountant == "rdp":
        assert 3.9 < trainer.get_epsilon() <= 4.0


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_one_step_equals_hand_computed_update(tmp_path, sigma):
    model, lr, R = TinyLM(), 0.5, 1.0
    before = copy.deepcopy(model)
    data = lm_data(24)
    with pytest.warns(UserWarning, match="no privacy") if sigma == 0 else nullcontext():
        trainer = DPTrainer(model=model, train_dataset=data, max_grad_norm=R,
                            noise_multiplier=sigma, dp_seed=0,
                            args=targs(tmp_path, max_steps=1, optim="sgd", learning_rate=lr,
                                       lr_scheduler_type="constant"))
    noise_state = trainer.noise_generator.get_state()
    trainer.train()
    assert (trainer.get_epsilon() == float("inf")) == (sigma == 0)

    idx = trainer.poisson_sampler.logical_batch(0)
    assert len(idx) > 1
    ids = torch.stack([data[i]["input_ids"] for i in idx])
    labels = torch.stack([data[i]["labels"] for i in idx])
    clipped = loop_clipped_sum(before, (ids, labels), None, R, loss_of=per_sample_lm_loss)
    norms = [torch.cat([g.flatten() for g in loop_clipped_sum(
        before, (ids[i:i + 1], labels[i:i + 1]), None, 1e9, loss_of=per_sample_lm_loss
    ).values()]).norm() for i in range(len(idx))]
    assert min(norms) < R < max(norms)  # some samples clipped, some not
    # the noise: N(0, (sigma R)^2) per coordinate, drawn once, in the optimizer's order
    names = {id(p): n for n, p in model.named_parameters()}
    g = torch.Generator().set_state(noise_state)
    noise = dict.fromkeys(names.values(), 0)
    if sigma:
        noise = {names[id(p)]: torch.normal(0, sigma * R, size=p.shape, generator=g)
                 for p in trainer.dp_optimizer.params}
    for n, p in model.named_parameters():
        expected = dict(before.named_parameters())[n] - lr * (clipped[n] + noise[n]) / 4  # L=4
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-5, atol=1e-7)


def test_resume_gives_same_parameters_and_epsilon(tmp_path, monkeypatch):
    # N=16, L=2*2: 4 logical batches per epoch; the checkpoint at step 5 is mid-epoch 1
    data = lm_data(16)
    rows = torch.stack([d["input_ids"] for d in data])
    assert len(torch.unique(rows, dim=0)) == len(data)
    seen, training_step = [], DPTrainer.training_step

    def recorded(self, model, inputs, *args):  # which examples each micro-batch holds
        match = (inputs["input_ids"][:, None, :] == rows[None]).all(-1)
        seen.append(match.nonzero()[:, 1].tolist())
        return training_step(self, model, inputs, *args)

    monkeypatch.setattr(DPTrainer, "training_step", recorded)
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=7,
              save_strategy="steps", save_steps=5)
    full = DPTrainer(model=TinyLM(seed=0), train_dataset=data, max_grad_norm=1.0,
                     noise_multiplier=0.7, accountant="rdp", dp_seed=11,
                     args=targs(tmp_path / "a", **kw))
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-5"
    assert (checkpoint / DP_STATE_NAME).is_file()
    logical = [full.poisson_sampler.logical_batch(t).tolist() for t in range(7)]
    assert [a + b for a, b in zip(seen[::2], seen[1::2])] == logical  # 2 epochs, no repeats

    seen.clear()
    resumed_model = TinyLM(seed=99)  # other weights: they must come from the checkpoint
    resumed = DPTrainer(model=resumed_model, train_dataset=data, max_grad_norm=1.0,
                        noise_multiplier=0.7, accountant="rdp",  # dp_seed: from the checkpoint
                        args=targs(tmp_path / "b", **kw))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [a + b for a, b in zip(seen[::2], seen[1::2])] == logical[5:]
    assert resumed.accountant.history == full.accountant.history
    assert resumed.get_epsilon() == full.get_epsilon()
    for n, p in full.model.named_parameters():
        assert torch.equal(p, dict(resumed_model.named_parameters())[n]), n


def test_lora_trains_only_adapters(tmp_path):
    """PEFT LoRA on a tiny Llama, under bf16 autocast, with empty Poisson batches."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = params(model)
    # under bf16 autocast, with q = 1/16: some Poisson batches are empty
    trainer = DPTrainer(model=model, train_dataset=lm_data(16), max_grad_norm=1.0,
                        noise_multiplier=1.0, dp_seed=3, args=targs(
                            tmp_path, per_device_train_batch_size=1, max_steps=4, bf16=True))
    sizes = [len(trainer.poisson_sampler.logical_batch(t)) for t in range(4)]
    assert 0 in sizes and max(sizes) > 0, sizes
    trainer.train()
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    dp_optimizer = trainer.dp_optimizer
    assert isinstance(dp_optimizer, _TrainerDPOptimizer)
    assert {id(p) for p in dp_optimizer.params} == \
        {id(p) for n, p in model.named_parameters() if n in adapters}
    for n, p in model.named_parameters():
        if n in adapters:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert trainer.state.log_history[-1]["epsilon"] > 0


def test_learns_under_noise(tmp_path):
    data = lm_data(256, learnable=True)
    model = TinyLM(d=16)
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])

    def mean_loss():
        with torch.no_grad():
            return fx_bk.sequence_cross_entropy(model(ids)["logits"], labels, shift=True).mean()

    start = mean_loss()
    trainer = DPTrainer(model=model, train_dataset=data, max_grad_norm=1.0, noise_multiplier=0.5,
                        dp_seed=2, args=targs(tmp_path, per_device_train_batch_size=32,
                                              max_steps=40, learning_rate=0.05, logging_steps=20))
    trainer.train()
    assert mean_loss() < 0.5 * start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert 0 < trainer.get_epsilon() < 50


def test_accumulation_noises_once_per_logical_batch(tmp_path, monkeypatch):
    calls = {"noise": 0, "micro": 0}
    add_noise, training_step = _TrainerDPOptimizer.add_noise, DPTrainer.training_step

    def counted_noise(self):
        calls["noise"] += 1
        return add_noise(self)

    def counted_step(self, *args, **kwargs):
        calls["micro"] += 1
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(_TrainerDPOptimizer, "add_noise", counted_noise)
    monkeypatch.setattr(DPTrainer, "training_step", counted_step)
    data, results = lm_data(32), []
    for batch, accumulate in [(8, 1), (4, 2)]:  # the same L = 8, so the same q and batches
        calls.update(noise=0, micro=0)
        model = TinyLM()
        trainer = DPTrainer(model=model, train_dataset=data, max_grad_norm=0.5,
                            noise_multiplier=0.8, dp_seed=5, accountant="rdp",
                            args=targs(tmp_path / str(batch), per_device_train_batch_size=batch,
                                       gradient_accumulation_steps=accumulate, max_steps=3,
                                       optim="sgd", learning_rate=0.1))
        trainer.train()
        assert calls == {"noise": 3, "micro": 3 * accumulate}
        assert trainer.privacy_steps == 3
        results.append(params(model))
    for n in results[0]:  # k micro-batches + noise once == the logical batch in one step
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-5, atol=1e-6)


def test_bf16_autocast(tmp_path):
    model = TinyLM()
    before = params(model)
    trainer = DPTrainer(model=model, train_dataset=lm_data(16), max_grad_norm=1.0,
                        noise_multiplier=0.5, dp_seed=0,
                        args=targs(tmp_path, bf16=True, logging_steps=1))
    trainer.train()
    assert torch.bfloat16 in model.seen_dtypes  # the traced forward ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_compiled_equals_eager(tmp_path):
    """``compile=True`` (torch.compile of the fx_bk module): the same run as eager. Slow (the
    compiles), so kept out of CI: ``python -m pytest -m slow tests/test_trainer.py``."""
    results = []
    for compile in (False, True):
        model = TinyLM()
        DPTrainer(model=model, train_dataset=lm_data(32), max_grad_norm=1.0,
                  noise_multiplier=1.0, dp_seed=3, compile=compile,
                  args=targs(tmp_path / str(compile), per_device_train_batch_size=2,
                             max_steps=6)).train()
        results.append(params(model))
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-4, atol=1e-6)


def test_default_per_sample_losses():
    F = torch.nn.functional
    logits = torch.randn(3, 4)
    classes = torch.tensor([0, 3, 1])
    fn = default_per_sample_loss()
    torch.testing.assert_close(fn({"logits": logits}, classes),
                               F.cross_entropy(logits, classes, reduction="none"))
    target = torch.randn(3, 4)
    torch.testing.assert_close(fn((logits,), target), (logits - target).pow(2).mean(1))
    multi = default_per_sample_loss(problem_type="multi_label_classification")
    bits = (target > 0).float()
    torch.testing.assert_close(multi({"logits": logits}, bits), F.binary_cross_entropy_with_logits(
        logits, bits, reduction="none").mean(1))
    seq, labels = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    for shift in (False, True):
        torch.testing.assert_close(
            default_per_sample_loss(shift_labels=shift)({"logits": seq}, labels),
            fx_bk.sequence_cross_entropy(seq, labels, shift=shift))
    with pytest.raises(fx_bk.ConfigError, match="per_sample_loss"):
        fn({"logits": seq}, classes)


class _OwnSampler(DPTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(lm_data(8))


REFUSED = {
    "no noise setting": ({}, {"noise_multiplier": None}),
    "both noise settings": ({}, {"target_epsilon": 1.0}),
    "negative noise": ({}, {"noise_multiplier": -1.0}),
    "Trainer clipping": ({"max_grad_norm": 0.5}, {}),
    "drop last": ({"dataloader_drop_last": True}, {}),
    "sampling strategy": ({"train_sampling_strategy": "group_by_length"}, {}),
    "fp16": ({"fp16": True}, {}),
    "label smoothing": ({"label_smoothing_factor": 0.1}, {}),
    "auto batch size": ({"auto_find_batch_size": True}, {}),
    "compute_loss_func": ({}, {"compute_loss_func": lambda out, labels, **kw: 0}),
    "iterable dataset": ({}, {"train_dataset": _Stream()}),
    "batch above N": ({"per_device_train_batch_size": 32}, {}),
    "model_init": ({}, {"model": None, "model_init": TinyLM}),
    "checkpoints to the hub": ({"push_to_hub": True, "hub_strategy": "checkpoint",
                                "hub_model_id": "x/y"}, {}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_settings(tmp_path, case):
    arg_kw, trainer_kw = REFUSED[case]
    kw = {"model": TinyLM(), "train_dataset": lm_data(16), "max_grad_norm": 1.0,
          "noise_multiplier": 1.0, **trainer_kw}
    if kw["noise_multiplier"] is None:
        del kw["noise_multiplier"]
    with pytest.raises(fx_bk.ConfigError):
        DPTrainer(args=targs(tmp_path, **arg_kw), **kw)


def test_refused_at_train_time(tmp_path):
    kw = {"model": TinyLM(), "train_dataset": lm_data(16), "max_grad_norm": 1.0,
          "noise_multiplier": 1.0}
    with pytest.raises(fx_bk.ConfigError, match="overrides _get_train_sampler"):
        _OwnSampler(args=targs(tmp_path), **kw)
    # the default clipping of TrainingArguments is turned off, with a warning
    with pytest.warns(UserWarning, match="max_grad_norm"):
        trainer = DPTrainer(args=targs(tmp_path, max_grad_norm=1.0), **kw)
    assert trainer.args.max_grad_norm == 0
    # a loss that is not a sum of per-sample losses is rejected by its proof
    batch_mean = DPTrainer(args=targs(tmp_path), per_sample_loss=lambda out, labels: (
        fx_bk.sequence_cross_entropy(out["logits"], labels, shift=True).mean()), **kw)
    with pytest.raises(fx_bk.UnsupportedModelError, match="mean"):
        batch_mean.train()
    # no labels in the batch: the model would compute its own loss
    unlabelled = [{"input_ids": d["input_ids"]} for d in lm_data(16)]
    kw["train_dataset"] = unlabelled
    with pytest.raises(fx_bk.ConfigError, match="label"):
        DPTrainer(args=targs(tmp_path), **kw).train()
    # a checkpoint without the DP state cannot be resumed (epsilon would restart at 0)
    os.makedirs(tmp_path / "plain")
    with pytest.raises(fx_bk.ConfigError, match=DP_STATE_NAME):
        DPTrainer(args=targs(tmp_path), **{**kw, "train_dataset": lm_data(16)}).train(
            resume_from_checkpoint=str(tmp_path / "plain"))
    assert issubclass(DPTrainer, Trainer)
