"""An independent float64 PyTorch SOAP, written from the paper's algorithm (Vyas et al., 2024).

It mirrors the structure of the official implementation (a torch.optim.Optimizer whose first
step only builds the preconditioner; exp_avg kept in the ROTATED basis and re-projected after
each step: back with the old basis, forward with the new one), so the parity test checks that
gqlm's original-space first moment is the same algorithm. Everything runs in float64.
"""

from __future__ import annotations

import torch


def merged_shape(shape, max_precond_dim):
    new_shape, current = [], 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                new_shape.append(current)
                current = size
            else:
                new_shape.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not new_shape:
        new_shape.append(current)
    return new_shape


class ReferenceSOAP(torch.optim.Optimizer):
    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8,
                 weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
                 merge_dims=False, precondition_1d=False, normalize_grads=False):
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                        precondition_1d=precondition_1d, normalize_grads=normalize_grads)
        super().__init__(params, defaults)

    # -- shapes ---------------------------------------------------------------------------
    def _work_shape(self, p, group):
        if p.dim() == 1:
            return list(p.shape)
        if group["merge_dims"]:
            return merged_shape(p.shape, group["max_precond_dim"])
        return list(p.shape)

    def _active(self, p, group):
        shape = self._work_shape(p, group)
        if p.dim() == 1:
            return [group["precondition_1d"] and shape[0] <= group["max_precond_dim"]]
        return [n <= group["max_precond_dim"] for n in shape]

    # -- rotations: mode-k products, cycling the dims as the official code does -------------
    @staticmethod
    def _rotate(x, bases, transpose):
        for q in bases:
            if q is None:
                x = x.permute(*range(1, x.dim()), 0)
            else:
                x = torch.tensordot(x, q, dims=([0], [0 if transpose else 1]))
        return x

    def project(self, x, state):
        shape = x.shape
        return self._rotate(x.reshape(state["work_shape"]), state["Q"], True).reshape(shape)

    def project_back(self, x, state):
        shape = x.shape
        return self._rotate(x.reshape(state["work_shape"]), state["Q"], False).reshape(shape)

    # -- preconditioner ---------------------------------------------------------------------
    def _accumulate(self, grad, state, beta):
        g = grad.reshape(state["work_shape"])
        for k, stat in enumerate(state["GG"]):
            if stat is None:
                continue
            others = [i for i in range(g.dim()) if i != k]
            outer = torch.tensordot(g, g, dims=(others, others))
            stat.mul_(beta).add_(outer, alpha=1 - beta)

    def _power_qr(self, state):
        v = state["exp_avg_sq"].reshape(state["work_shape"])
        new = []
        for k, (stat, q) in enumerate(zip(state["GG"], state["Q"])):
            if stat is None:
                new.append(None)
                continue
            estimate = torch.diag(q.T @ stat @ q)
            order = torch.argsort(estimate, descending=True)
            v = v.index_select(k, order)
            new.append(torch.linalg.qr(stat @ q[:, order])[0])
        state["exp_avg_sq"] = v.reshape(state["exp_avg_sq"].shape)
        state["Q"] = new

    def _after_step(self, grad, state, group):
        # Rotate the first moment back with the basis it was built in ...
        state["exp_avg"] = self.project_back(state["exp_avg"], state)
        self._accumulate(grad, state, state["shampoo_beta"])
        if state["step"] % group["precondition_frequency"] == 0:
            self._power_qr(state)
        # ... and forward into the (possibly new) basis.
        state["exp_avg"] = self.project(state["exp_avg"], state)

    def _first_call(self, p, grad, state, group):
        sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
        state["shampoo_beta"] = sb
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        state["work_shape"] = self._work_shape(p, group)
        state["GG"] = [torch.zeros(n, n, dtype=grad.dtype) if on else None
                       for n, on in zip(state["work_shape"], self._active(p, group))]
        self._accumulate(grad, state, sb)
        state["Q"] = [None if s is None else torch.flip(torch.linalg.eigh(s)[1], [1])
                      for s in state["GG"]]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                grad, state = p.grad, self.state[p]
                if "Q" not in state:
                    self._first_call(p, grad, state, group)
                    continue
                state["step"] += 1
                t = state["step"]
                rotated = self.project(grad, state)
                state["exp_avg"].mul_(b1).add_(rotated, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).add_(rotated.square(), alpha=1 - b2)
                ratio = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
                direction = self.project_back(ratio, state)
                if group["normalize_grads"]:
                    direction = direction / (1e-30 + direction.square().mean().sqrt())
                step_size = group["lr"] * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
                p.add_(direction, alpha=-step_size)
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                self._after_step(grad, state, group)
