"""``fastrms.torch.RMSprop(flatten=True)``: a bucket whose parameters, gradients and state are views
of one flat buffer each (with each parameter's shape and strides), so a step is one kernel call."""
from __future__ import annotations

import torch

from ..engine import STATE_BUFFERS
from ._buckets import STALE, TensorBucket
from ._tensors import SPARSE, get_grad, same


class FlatTensorBucket(TensorBucket):
    """A :class:`TensorBucket` in the engine's flat layout."""

    def _place_params(self):
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self.offsets = offsets
        self.flat_tensors = dict.fromkeys(("param", "grad") + STATE_BUFFERS)
        self.grad_views = [None] * self.count
        for name in ("param", "grad"):
            self.flat_tensors[name] = torch.zeros(offsets[-1], dtype=self.torch_dtype)
        for k, p in enumerate(self.params):
            view = self._slot("param", k)
            view.copy_(p.detach())
            p.data = view
            g = p.grad
            if g is not None and g.layout == torch.strided and g.shape == p.shape:
                self._install(k, g)  # sparse or mis-shaped ones fail at step()
        return self.flat_tensors["param"].numpy(), self.flat_tensors["grad"].numpy()

    def _slot(self, name: str, k: int) -> torch.Tensor:
        flat = self.flat_tensors[name]
        if flat is None:  # allocated on first use: momentum / centered may never be used
            flat = self.flat_tensors[name] = torch.zeros(self.offsets[-1],
                                                         dtype=self.torch_dtype)
        p = self.params[k]
        return flat.as_strided(p.shape, p.stride(), self.offsets[k])

    def _flat_state(self, name: str):
        return self.flat_tensors[name].numpy()

    # Compact state (state_format) stays per parameter: each tensor its own (TensorBucket's).

    def _install(self, k: int, g) -> None:
        view = self._slot("grad", k)
        view.copy_(g.detach())
        self.params[k].grad = view
        self.grad_views[k] = view

    def _new_buffer(self, name: str, k: int) -> torch.Tensor:
        if self.compact:
            return TensorBucket._new_buffer(self, name, k)
        return self._slot(name, k).zero_()

    def _usable(self, name: str, k: int, tensor) -> torch.Tensor:
        if self.compact:
            return TensorBucket._usable(self, name, k, tensor)
        view = self._slot(name, k)
        if tensor is not view:
            with torch.no_grad():
                view.copy_(tensor)
        return view

    def zero_grads(self) -> set:
        """Zero the flat gradient buffer in place; the ids of the gradient views it holds."""
        installed = [v for v in self.grad_views if v is not None]
        if installed:
            self.flat_tensors["grad"].zero_()  # one memset for the whole bucket
        return set(map(id, installed))

    def select(self, state, coeffs, dicts_unchanged: bool = False):
        if not self.unchanged(state, dicts_unchanged):
            return STALE
        if (coeffs.uses_momentum and not self.momentum_on) or \
                (coeffs.centered and not self.centered_on):
            self.switch_on(coeffs.uses_momentum, coeffs.centered)
        params = self.params
        grads = list(map(get_grad, params))
        if not all(map(same, grads, self.grad_views)):
            # Gradients that are not our views: new ones are copied into the buffer and the
            # views installed, so that the next backward accumulates into the buffer again.
            for k, g in enumerate(grads):
                if g is not None and g.layout != torch.strided:
                    raise RuntimeError(SPARSE)
                if g is not None and g.shape != params[k].shape:
                    raise RuntimeError(f"the gradient of {self.label(k)} has shape "
                                       f"{tuple(g.shape)} but the parameter has shape "
                                       f"{tuple(params[k].shape)}")
            with torch.no_grad():
                for k, g in enumerate(grads):
                    if g is None:
                        self.grad_views[k] = None
                    elif g is not self.grad_views[k]:
                        self._install(k, g)
        present = [v is not None for v in self.grad_views]
        if present != self.present:
            self.present = present
            if any(present):
                self._initialize_present(state, present)
                self.bucket.select([k for k, here in enumerate(present) if here])
        if not any(present):
            return None
        if self.watch is None:
            self._watch()
        return ()

    def job(self, coeffs, module, grads, regions):
        return self.bucket, coeffs, module, None, None
