import os
import signal

import pytest
import torch
from accelerate import Accelerator

from llmstack.trainers.base import StopOnSignal, batch_arithmetic, build_optimizer, lr_factor
from llmstack.trainers.checkpoint import Checkpointer, checkpoint_problem


def test_warmup_is_linear_from_first_update():
    assert [lr_factor(s, "cosine", 4, 20, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_reaches_min_ratio_and_passes_midpoint():
    # halfway through the decay the cosine sits exactly between peak and floor
    assert lr_factor(10 + 45, "cosine", 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, "cosine", 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, "cosine", 10, 100, 0.1) == pytest.approx(1.0)


def test_linear_and_constant_schedules():
    assert lr_factor(10 + 30, "linear", 10, 70, 0.0) == pytest.approx(0.5)
    assert lr_factor(69, "constant", 10, 70, 0.0) == 1.0


def test_norms_and_biases_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-3, [0.9, 0.95], 0.1)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert sorted(p.numel() for p in plain["params"]) == [4, 4, 4]
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0


def test_optimizer_steps_are_adamw_by_hand():
    """Two steps of decoupled-weight-decay Adam (Loshchilov & Hutter 2019, algorithm 2) written out."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, (b1, b2), wd, eps = 1e-2, (0.9, 0.95), 0.1, 1e-8
    opt = build_optimizer(model, lr, [b1, b2], wd)
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    for g in grads:
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        w, m, v = start[n].clone(), torch.zeros_like(start[n]), torch.zeros_like(start[n])
        decay = wd if p.ndim >= 2 else 0.0
        for t, g in enumerate(grads, 1):
            w = w * (1 - lr * decay)
            m, v = b1 * m + (1 - b1) * g[n], b2 * v + (1 - b2) * g[n] ** 2
            w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)


def test_batch_arithmetic_line():
    line = batch_arithmetic(8, 4, 2, 256)
    assert "8 per device x 4 accumulation x 2 processes = 64 sequences per step" in line
    assert f"{64 * 256:,} tokens per step" in line


@pytest.fixture
def checkpointer(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    ckpt = Checkpointer(tmp_path, acc, keep_last=2)
    ckpt.register(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    return ckpt, model


def test_checkpoints_are_pruned_to_keep_last_and_reload(checkpointer):
    ckpt, model = checkpointer
    saved = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, {"data": {"position": step}})
        saved[step] = model.weight.clone()
    names = sorted(p.name for p in ckpt.root.iterdir())
    assert names == ["step-00000002", "step-00000003"]
    with torch.no_grad():
        model.weight.zero_()
    state = ckpt.load(ckpt.latest())
    assert state["step"] == 3 and state["data"] == {"position": 3}
    assert torch.equal(model.weight, saved[3])


def test_truncated_checkpoint_is_skipped_with_a_warning(checkpointer):
    ckpt, _ = checkpointer
    ckpt.save(1, {})
    newest = ckpt.save(2, {})
    weights = next(newest.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"ignoring checkpoint .*step-00000002: {weights.name} has 100 bytes"):
        assert ckpt.latest().name == "step-00000001"


def test_partial_and_stateless_checkpoints_are_ignored(checkpointer):
    ckpt, _ = checkpointer
    ckpt.save(1, {})
    (ckpt.root / ".tmp-step-00000002").mkdir()
    (ckpt.root / "step-00000003").mkdir()
    assert checkpoint_problem(ckpt.root / "step-00000003").startswith("manifest.json is missing")
    with pytest.warns(UserWarning) as warned:
        assert ckpt.latest().name == "step-00000001"
    messages = " ".join(str(w.message) for w in warned)
    assert ".tmp-step-00000002" in messages and "step-00000003" in messages


def test_sigterm_becomes_a_stop_request_and_handlers_are_restored():
    acc = Accelerator(cpu=True)
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.requested(acc) == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(acc) == (True, False) and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_warmup_that_would_leave_no_decay_becomes_a_tenth_of_the_run(caplog, monkeypatch):
    import logging

    from llmstack.trainers.base import effective_warmup

    # a run earlier in this process may have set llmstack's logger to print on its own only
    monkeypatch.setattr(logging.getLogger("llmstack"), "propagate", True)

    assert effective_warmup(30, 100, "cosine") == 30
    assert effective_warmup(100, 100, "cosine") == 10 and effective_warmup(15, 3, "linear") == 0
    assert "train.warmup_steps=15 would leave no linear decay within train.max_steps=3" in caplog.text
    assert effective_warmup(100, 50, "constant") == 100  # a constant schedule has nothing to decay
