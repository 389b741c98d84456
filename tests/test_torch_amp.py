"""``fastrms.torch.RMSprop`` with ``torch.amp.GradScaler``: the scaler hands over the loss scale
and its inf check (the fused-optimizer protocol), the kernel unscales inside the fused pass with
the bits of unscaling first, and a step whose scaled gradients hold an inf is skipped whole."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import fastrms.torch as fastrms_torch  # noqa: E402


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)


def scaled_backward(model, scale, step, autocast_dtype, poison):
    x, y = data(step)
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scale(loss).backward()
    if step == poison:
        next(model.parameters()).grad[0, 0] = float("inf")


def train_with_scaler(optimizer_class, autocast_dtype, steps=8, poison=3, **options):
    model = make_model()
    opt = optimizer_class(model.parameters(), lr=1e-2, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    scales = []
    for step in range(steps):
        opt.zero_grad()
        scaled_backward(model, scaler.scale, step, autocast_dtype, poison)
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    return model, opt, scales


def train_unscaling_first(autocast_dtype, scales, steps=8, poison=3, **options):
    """The same run, unscaling by hand (as GradScaler.unscale_ does) and skipping the poisoned
    step: what the fused pass must equal bit for bit."""
    model = make_model()
    opt = fastrms_torch.RMSprop(model.parameters(), lr=1e-2, **options)
    for step in range(steps):
        opt.zero_grad()
        scale = torch.full((), scales[step], dtype=torch.float32)
        scaled_backward(model, lambda loss: loss * scale, step, autocast_dtype, poison)
        if step == poison:
            continue
        inverse = torch.full((), scales[step], dtype=torch.float64).reciprocal().float()
        for p in model.parameters():
            p.grad.mul_(inverse)
        opt.step()
    return model, opt


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("options", [{}, dict(momentum=0.9, centered=True)],
                         ids=["plain", "momentum-centered"])
def test_scaler_step_equals_unscaling_first_and_skips_the_inf_step(autocast_dtype, options):
    ours, opt, scales = train_with_scaler(fastrms_torch.RMSprop, autocast_dtype, **options)
    assert scales[4] == scales[3] / 2  # the inf made the scaler back off
    twin, twin_opt = train_unscaling_first(autocast_dtype, scales, **options)
    for a, b in zip(ours.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert all(float(s["step"]) == 7.0 for s in opt.state.values())  # 8 steps, one skipped
    assert not opt.unfused_parameters()
    # And within torch's own rounding of torch.optim.RMSprop under the same scaler.
    theirs, _, their_scales = train_with_scaler(torch.optim.RMSprop, autocast_dtype, **options)
    assert their_scales == scales
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert float((a - b).detach().abs().max()) <= 1e-4 * float(b.detach().abs().max())


def test_the_protocol_attributes_are_gone_after_the_step():
    model, opt, _ = train_with_scaler(fastrms_torch.RMSprop, torch.bfloat16, steps=2)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert opt._step_supports_amp_scaling
